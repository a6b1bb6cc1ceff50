"""One atomic file writer for every artefact (checkpoints, weights, metrics): a reader sees the old file or the
new one, never half of one, and a kill at any moment leaves at least one complete file. A write that fails (a full
disk, a read-only or unwritable directory) is a WriteError naming the path, and leaves the old file in place."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import WriteError


def atomic_write(path, write: Callable[[Path], None], *, previous=None) -> Path:
    """``write(tmp)`` a temporary file beside ``path``, fsync it, then rename it over ``path`` (the file it
    replaces becomes ``previous`` when given). ``write`` gets a path, not a handle: ``torch.save`` names its
    archive after the file, so a handle would change the bytes (and the sha256) of saved weights.

    An OSError on the way (ENOSPC, EACCES, EROFS, ...) raises WriteError naming ``path``; the temporary file is
    removed and ``path`` (or, if the failure came between the two renames, ``previous``) still holds the last
    complete file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        kept = f"; {path.name} is unchanged" if path.exists() else ""
        raise WriteError(f"{path}: cannot write: {e}{kept}") from e
    finally:
        try:
            if tmp.exists():
                tmp.unlink()
        except OSError:
            pass
    return path


def ensure_dir(path) -> Path:
    """``path`` as a directory (created with its parents if missing) that this process can write; else a
    WriteError naming it (a file in its place, a read-only filesystem, no permission). Creates nothing else."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise WriteError(f"{path}: exists and is not a directory: remove it or choose another path") from None
    except NotADirectoryError:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise WriteError(f"{path}: cannot create this directory: {blocker} is a file, not a directory") from None
    except OSError as e:
        raise WriteError(f"{path}: cannot create this directory: {e.strerror or e}") from e
    if not os.access(path, os.W_OK | os.X_OK):  # EROFS counts: access() checks the mount too
        raise WriteError(f"{path}: directory is not writable (read-only filesystem or no permission)")
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save(obj, path, *, previous=None) -> Path:
    """``torch.save(obj)`` atomically."""
    import torch

    def save(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) as a RuntimeError
            if not any(m in str(e) for m in ("inline_container", "PytorchStreamWriter", "write failed")):
                raise
            raise _write_failure(tmp, e) from e

    return atomic_write(path, save, previous=previous)


def _write_failure(tmp: Path, e: Exception) -> OSError:
    """The OSError behind a failed torch.save: ENOSPC when the filesystem is (nearly) full, else EIO."""
    try:
        st = os.statvfs(tmp.parent)
        full = st.f_bavail * st.f_frsize < (1 << 20)
    except OSError:
        full = False
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, f"{os.strerror(code)} (torch.save: {str(e).splitlines()[-1].strip()})")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """This process's umask (read from /proc where it can be: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
