"""The project's one error policy (pipeline.cli): a `UserError` is a condition the user can fix (bad input, bad
config, a refused action); entry modules print its one-line message, naming the file, key, unit or field, and
exit 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json


class UserError(Exception):
    """Bad input, bad configuration or a refused action; the message names the object at fault."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value; the message names the key."""


class MissingInput(UserError, FileNotFoundError):
    """An input file or folder that does not exist; the message names the path."""


class WriteError(UserError, OSError):
    """A file or directory that cannot be written (disk full, permissions, read-only filesystem): names the path;
    what was there before is left intact."""


class StorageError(UserError, OSError):
    """Object storage that refuses or fails a request (no credentials, no such bucket, access denied, an endpoint
    that fails or stays silent past the retry budget): names the URL and what to do. An OSError, so a unit being
    written stays pending as for a local write error."""


class ShardError(UserError, RuntimeError):
    """Invalid, missing, corrupt or mismatching shard data; the message names the file (and key)."""


class DigestMismatch(UserError, RuntimeError):
    """A stored target belongs to another view than the one replayed."""


class CacheError(UserError, RuntimeError):
    """The cache store is missing, not a cache store, unwritable, incomplete or misused (message names the path)."""


class ProvenanceMismatch(CacheError):
    """A store's provenance differs from the configuration: names the field and both values."""

    def __init__(self, path, field: str, store_value, config_value, fix: str = ""):
        self.path, self.field, self.store_value, self.config_value = str(path), field, store_value, config_value
        super().__init__(f"{path}: provenance field '{field}' differs: store has {as_text(store_value)}, "
                         f"config has {as_text(config_value)}" + (f" ({fix})" if fix else ""))


class PixelMismatch(CacheError):
    """The replay path renders other pixels here than where the store was built (pipeline.replay.fingerprint)."""


class TeacherError(UserError, RuntimeError):
    """A teacher that cannot be built or loaded as configured (missing or mismatched checkpoint)."""


class ScheduleError(UserError, ValueError):
    """The seed schedule needs seed indices that are not cached."""


class CheckpointError(UserError, ValueError):
    """A training checkpoint that does not belong to this run, or a resume target that does not exist."""


def as_text(v) -> str:
    """A provenance value in a message: a string as it is, anything else as JSON."""
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
