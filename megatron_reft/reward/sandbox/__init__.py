"""Sandbox for model-written programs: `SandboxPool(SandboxConfig(...)).run(programs)`.
See docs/rewards.md for what it guarantees. Lazy exports keep the worker process small."""
_EXPORTS = {"SandboxPool": "pool", "SandboxConfig": "pool", "ProgramResult": "pool",
            "SandboxError": "pool"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
