"""DeiT distillation from a precomputed, replayable teacher cache."""

from pipeline.version import __version__

# The public API for your own training loop (pipeline.api), loaded on first use: `import pipeline` (every stage's
# entry) neither pays for it nor runs it (so no stage depends on pipeline/api.py; tests/test_layout.py).
__all__ = ["CachedViews", "distillation_targets", "__version__"]


def __getattr__(name):
    if name in ("CachedViews", "distillation_targets"):
        import importlib

        return getattr(importlib.import_module("pipeline.api"), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
