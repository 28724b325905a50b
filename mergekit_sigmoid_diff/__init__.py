"""sigmoid_diff: a mergekit merge method that transfers a donor's feature onto a target.

Importing this package is cheap: it imports neither torch nor mergekit. ``register()``
makes the methods known to mergekit's registry in this process (idempotent); after
``pip install`` plain ``mergekit-yaml`` does this by itself through a lazy import hook
(see :mod:`mergekit_sigmoid_diff._hook`).
"""

__version__ = "0.1.0"


def register() -> None:
    """Register this package's merge methods with mergekit; safe to call repeatedly."""
    from mergekit_sigmoid_diff.plugin import activate

    activate()


__all__ = ["register", "__version__"]
