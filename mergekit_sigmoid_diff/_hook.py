"""Lazy import hook that plugs this package into mergekit in every Python process.

``mergekit_sigmoid_diff_hook.pth`` (installed into site-packages) calls :func:`install`
at interpreter start-up. That adds one finder to ``sys.meta_path`` which answers only
for the mergekit modules in ``_CALLBACKS``: for any other import it does one dict
lookup and returns None. When one of those modules is first imported, the module runs
as usual and then the named callback of :mod:`mergekit_sigmoid_diff.plugin` gets it.

Why a hook: mergekit 0.1.5 has no plugin discovery, and an eager import of torch and
mergekit from a ``.pth`` file costs every Python start-up more than a second.
This module imports nothing but ``sys`` and never raises: a broken plugin must not
break unrelated programs (a failing callback only warns).
"""

import sys

# module imported by mergekit -> function of mergekit_sigmoid_diff.plugin called with it
# (the same table as plugin.CALLBACKS, which a test compares; kept here so that start-up
# imports nothing)
_CALLBACKS = {
    "mergekit.merge_methods.registry": "on_registry",
    "mergekit.merge": "on_merge",
    "mergekit.scripts.run_yaml": "on_cli",
    "mergekit.scripts.multimerge": "on_cli",
}


def _run_callback(name, module):
    try:
        from mergekit_sigmoid_diff import plugin

        getattr(plugin, name)(module)
    except Exception as error:  # never break the importing program
        import warnings

        warnings.warn(f"mergekit-sigmoid-diff could not plug into {module.__name__}: {error!r}")


class _Loader:
    """Delegates to the real loader; runs the callback after the module executed."""

    def __init__(self, loader, callback):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _run_callback(self._callback, module)

    def __getattr__(self, name):  # get_source, is_package, resource readers, ...
        return getattr(self._loader, name)


class _Finder:
    def find_spec(self, fullname, path=None, target=None):
        callback = _CALLBACKS.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, callback)
        return spec


def install():
    """Add the finder once (also if mergekit is already imported: then plug in now)."""
    try:
        if any(isinstance(f, _Finder) for f in sys.meta_path):
            return
        sys.meta_path.insert(0, _Finder())
        for name, callback in _CALLBACKS.items():
            module = sys.modules.get(name)
            if module is not None:
                _run_callback(callback, module)
    except Exception:
        pass
