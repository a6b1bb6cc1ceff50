"""DeiT distillation from a precomputed, replayable teacher cache."""

from pipeline.version import __version__

# The public API for your own training loop (docs/api.md), loaded on first use: `import pipeline` (every stage's
# entry) neither pays for it nor runs it (so no stage depends on pipeline/api.py; tests/test_layout.py).
_LAZY = {"CachedViews": "pipeline.api", "ValViews": "pipeline.api", "distillation_targets": "pipeline.api",
         "CachedTokenDistillationTask": "pipeline.train.timm_task",
         "CachedLogitDistillationTask": "pipeline.train.timm_task"}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
