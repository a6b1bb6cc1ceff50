"""Shared entry-module behaviour: known errors become one clear line on stderr and exit status 2."""

import contextlib
import sys


@contextlib.contextmanager
def fail_cleanly():
    from omegaconf.errors import MissingMandatoryValue

    from pipeline.cache_store import CacheError
    from pipeline.loader import DigestMismatch
    from pipeline.shards import ShardError
    from pipeline.teacher import TeacherError

    try:
        yield
    except (ShardError, CacheError, TeacherError, DigestMismatch, MissingMandatoryValue, FileNotFoundError,
            ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
