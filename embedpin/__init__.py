"""embedpin: pin a diffusion model's prompt conditioning to a visual target.

``embedpin.optimize``, ``resume``, ``load_pinned`` and ``export`` are the Python API
(:mod:`embedpin.api`); they load lazily, so ``import embedpin`` stays light."""

from embedpin.version import __version__ as __version__

__all__ = ["optimize", "resume", "load_pinned", "export", "run_config"]


def __getattr__(name):
    if name in __all__:
        from embedpin import api

        return getattr(api, name)
    raise AttributeError(f"module 'embedpin' has no attribute {name!r}")
