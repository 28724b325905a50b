"""The one exception type this plugin raises for bad input."""


class SigmoidDiffError(ValueError):
    """A bad recipe, model or tensor. The message is one line naming the culprit.

    ``mergekit-yaml`` and ``python -m mergekit_sigmoid_diff`` print it without a
    traceback (set ``MERGEKIT_SIGMOID_DIFF_TRACEBACK=1`` to see one) and exit non-zero.
    """
