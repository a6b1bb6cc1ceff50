"""DeiT distillation from a precomputed, replayable teacher cache."""

__version__ = "0.1.0"
