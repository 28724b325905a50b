"""The one exception type this plugin raises for bad input, and how commands report it."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

TRACEBACK_ENV = "MERGEKIT_SIGMOID_DIFF_TRACEBACK"


class SigmoidDiffError(ValueError):
    """A bad recipe, model or tensor. The message is one line naming the culprit.

    ``mergekit-yaml``, ``mergekit-multi`` and ``python -m mergekit_sigmoid_diff`` print it as
    ``Error: <message>`` without a traceback (set ``MERGEKIT_SIGMOID_DIFF_TRACEBACK=1`` to
    see one) and exit with status 1.
    """


def wants_traceback() -> bool:
    return bool(os.environ.get(TRACEBACK_ENV))


@contextmanager
def reported() -> Iterator[None]:
    """Turn a :class:`SigmoidDiffError` into ``Error: <message>`` on stderr and exit status 1."""
    try:
        yield
    except SigmoidDiffError as error:
        if wants_traceback():
            raise
        sys.exit(f"Error: {error}")
