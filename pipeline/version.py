"""The project's version, as pyproject.toml declares it and pip installed it (a leaf: every room may import it)."""

from importlib import metadata

try:
    __version__ = metadata.version("pipeline")
except metadata.PackageNotFoundError:  # a checkout on sys.path that was never pip-installed
    __version__ = "unknown"
