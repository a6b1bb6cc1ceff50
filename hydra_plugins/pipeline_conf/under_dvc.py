"""What the DVC process itself needs, installed only when DVC composes conf/ (`dvc exp run -S ...`):

- a workspace experiment that would delete what DVC cannot restore is refused before DVC touches anything. DVC's
  workspace executor first runs a forced `dvc checkout`, which deletes every out path the new params declare that
  dvc.lock does not list (a folder built by hand, e.g. `python -m pipeline.make_shards data=folder ...`), and a
  stage that cannot start (`data.root` missing) fails only after that;
- a config error (bad value, unknown key, missing value, refused experiment) is one line naming the key, exit 2,
  instead of DVC's "unexpected error" dump and support banner.

Nothing here runs in a stage: hydra_plugins/pipeline_conf imports this module only inside the `dvc` command."""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# `dvc exp run` options whose experiment runs in a temporary copy: the workspace is never checked out.
_ELSEWHERE = ("--temp", "--queue")


def install() -> None:
    """Wrap the ``pipeline_checked`` resolver with the workspace check and make DVC print config errors in one
    line (a filter on the logger DVC's CLI reports unexpected errors with)."""
    from pipeline.config import checked

    def checked_then_safe(value, *, _root_: DictConfig):
        value = checked(value, _root_=_root_)
        if not _in_schema(_root_) and not set(_ELSEWHERE) & set(sys.argv):
            refuse_unrestorable(_root_, _repo_root())
        return value

    OmegaConf.register_new_resolver("pipeline_checked", checked_then_safe, replace=True)
    logging.getLogger("dvc.cli").addFilter(_one_line)


def _in_schema(root: DictConfig) -> bool:
    from pipeline.config import RunSchema

    return OmegaConf.get_type(root) is RunSchema  # validate()'s typed copy: only the real composition is checked


def _repo_root() -> Path:
    here = Path.cwd().resolve()
    return next((p for p in (here, *here.parents) if (p / ".dvc").is_dir()), here)


def refuse_unrestorable(cfg: DictConfig, root: Path) -> None:
    """Raise a ConfigError when this experiment, run in the workspace, would lose data DVC cannot bring back."""
    from pipeline.errors import ConfigError

    owned = _lock_outs(root)
    for key, path in _cached_outs(cfg, root):
        if (root / path).exists() and path not in owned:
            raise ConfigError(
                f"{key}={path} exists and dvc.lock does not list it (made by hand?): a workspace experiment would "
                "delete it before any stage runs, and DVC cannot restore it; move it away, or add --temp")
    src, data_root, shards = (OmegaConf.select(cfg, k) for k in ("data.source", "data.root", "data.shards"))
    if src == "folder" and data_root and "://" not in str(data_root) and not Path(data_root).is_dir():
        if not (root / os.path.normpath(shards)).exists():
            raise ConfigError(f"data.root={data_root}: no such directory (make_shards would fail after DVC "
                              "removed the outputs the experiment replaces)")


def _cached_outs(cfg: DictConfig, root: Path) -> list[tuple[str, str]]:
    """(config key, normalised path) of every DVC-cached out that dvc.yaml declares through ``${key}``."""
    import yaml

    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    found = []
    for stage in (spec.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            entry, opts = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            match = re.fullmatch(r"\$\{([\w.]+)\}", str(entry).strip())
            if match and (opts or {}).get("cache", True):
                value = OmegaConf.select(cfg, match.group(1))
                if value is not None:
                    found.append((match.group(1), os.path.normpath(str(value))))
    return found


def _lock_outs(root: Path) -> set[str]:
    import yaml

    lock = root / "dvc.lock"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    return {os.path.normpath(o["path"]) for s in stages.values() for o in s.get("outs") or []}


def _one_line(record: logging.LogRecord) -> bool:
    """DVC's "unexpected error" record: one line instead, when the error is the config's."""
    exc = record.exc_info[1] if record.exc_info else None
    line = config_error_line(exc) if record.msg == "unexpected error" and exc is not None else None
    if line is None:
        return True
    print(f"dvc: error: config: {line}", file=sys.stderr, flush=True)
    raise SystemExit(2)  # out of DVC's handler, before it writes its support banner; DVC's cleanup still runs


def config_error_line(exc: BaseException) -> str | None:
    """One line for a config error raised while DVC composes conf/, naming the key; None for anything else."""
    from hydra.errors import HydraException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from pipeline.errors import UserError

    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    user = next((e for e in chain if isinstance(e, UserError)), None)
    if user is not None:
        return str(user).splitlines()[0]
    keyed = [e for e in chain if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None)]
    if keyed:  # the innermost error that names its key (OmegaConf wraps it, Hydra adds its own first line)
        key, exc = keyed[-1].full_key, keyed[-1]
        if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
            near = closest_key(key)
            return f"{key}: no such key" + (f" (did you mean {near}?)" if near else "")
        return f"{key}: {str(exc).splitlines()[0]}"
    hydra = next((e for e in chain if isinstance(e, HydraException)), None)
    if hydra is None:
        return None
    parts: list[str] = []
    for line in filter(None, (line.strip() for line in str(hydra).splitlines())):
        if line.startswith(("Config search path", "See https://")):
            break
        listing = bool(parts) and (parts[-1].endswith(":") or parts[-1].endswith(","))
        parts.append((" " if listing else "; ") + line if parts else line)
        if listing and not parts[-1].endswith(":"):
            parts[-1] += ","
    return "".join(parts).rstrip(",")


def closest_key(key: str) -> str | None:
    """The valid key of conf/'s default composition nearest to ``key``."""
    from hydra import compose, initialize_config_dir

    from pipeline.params import CONF

    with initialize_config_dir(str(CONF), version_base=None):
        cfg = OmegaConf.to_container(compose("config"), resolve=False)
    keys = list(_flat(cfg))
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return near[0] if near else None


def _flat(node, prefix=""):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _flat(v, f"{prefix}{k}.")
    elif prefix:
        yield prefix.rstrip(".")
