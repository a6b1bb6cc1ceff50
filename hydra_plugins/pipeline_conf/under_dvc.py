"""What the DVC process itself needs, installed only when DVC composes pipeline/conf/ (`dvc exp run -S ...`):

- a workspace experiment that would delete what DVC cannot restore is refused before DVC touches anything. DVC's
  workspace executor first runs a forced `dvc checkout`, which deletes every out path the new params declare that
  dvc.lock does not list (a folder built by hand, e.g. `python -m pipeline.make_shards data=folder ...`), and a
  stage that cannot start (`data.root` missing) fails only after that;
- a config error (bad value, unknown key, missing value, refused experiment) is one line naming the key, exit 2,
  instead of DVC's "unexpected error" dump and support banner.

Nothing here runs in a stage: hydra_plugins/pipeline_conf imports this module only inside the `dvc` command."""

from __future__ import annotations

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
                f"{key}={path} exists and dvc.lock does not list it (made by hand, or left by a failed run): DVC "
                "would delete it before running any stage and could not restore it; move it away, or add --temp")
    src, data_root, shards = (OmegaConf.select(cfg, k) for k in ("data.source", "data.root", "data.shards"))
    if src == "folder" and data_root and "://" not in str(data_root) and not (root / str(data_root)).is_dir():
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
    print(f"dvc exp run: error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(2)  # out of DVC's handler, before it writes its support banner; DVC's cleanup still runs


def config_error_line(exc: BaseException) -> str | None:
    """One line for a config error raised while DVC composes pipeline/conf/, naming the key; None for anything else. The
    wording is the stages' own (pipeline.cli, pipeline.compose)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.cli import config_message
    from pipeline.errors import UserError

    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    user = next((e for e in chain if isinstance(e, UserError)), None)
    if user is not None:  # validate()'s ConfigError, or refuse_unrestorable's
        return str(user).splitlines()[0]
    if isinstance(chain[0], HydraException):  # composing: an unknown key or group option, a bad override
        return _composition_line(chain[0])
    keyed = [e for e in chain if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None)]
    if keyed:  # resolving: the innermost error naming its key (OmegaConf wraps it in an interpolation error)
        return config_message(keyed[-1])
    return None


def _composition_line(exc: BaseException) -> str:
    """Hydra's composition error (unknown key, no such group option) as pipeline.compose words it."""
    from pipeline.compose import compose
    from pipeline.errors import UserError

    try:
        compose(set_params(sys.argv), config_name=_hydra_config_name(_repo_root()))
    except UserError as err:
        return str(err)
    except Exception:  # noqa: BLE001  (no better line than Hydra's own first one)
        pass
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def set_params(argv: list[str]) -> list[str]:
    """The Hydra overrides of `dvc exp run -S/--set-param [params.yaml:]key=value ...`."""
    values, it = [], iter(argv)
    for arg in it:
        if arg in ("-S", "--set-param"):
            values.append(next(it, ""))
        elif arg.startswith("--set-param="):
            values.append(arg.split("=", 1)[1])
    return [re.sub(r"^[\w./-]+\.(yaml|yml|json|toml|py):", "", v) for v in values if v]


def _hydra_config_name(root: Path) -> str:
    """DVC's `hydra.config_name` (.dvc/config, then config.local), default ``config``."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read([root / ".dvc" / "config", root / ".dvc" / "config.local"])
    return parser.get("hydra", "config_name", fallback="config").strip("'\"")
