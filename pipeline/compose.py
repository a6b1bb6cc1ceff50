"""The one configuration rule: every command composes pipeline/conf/ with the overrides on its command line.

DVC's stages run the same commands with ``--params params.yaml``: the configuration `dvc exp run -S`
composed from pipeline/conf/dvc.yaml (pipeline/conf/config.yaml plus the git-tracked metrics/ paths) with its own
overrides, and that `dvc repro` reads as committed. Nothing else reads params.yaml.

Composition errors become one line naming the override at fault (with the closest valid key or option), never
Hydra's multi-line message and its `+key=value` hint.
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import ConfigError, MissingInput

# Package data (pyproject's package-data): found the same way in a checkout, an editable install and a wheel.
# Hydra reads a directory, so the package must be installed unzipped (pip always does).
CONF = Path(str(resources.files("pipeline") / "conf"))
PARAMS_FLAG = "--params"


def compose(overrides: list[str] | tuple[str, ...] = (), params: str | None = None,
            config_name: str = "config") -> DictConfig:
    """pipeline/conf/<config_name> (or the composed ``params`` file) with ``overrides``, not yet resolved."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException

    if params is not None:
        path = Path(params).resolve()
        if not path.is_file():
            raise MissingInput(f"{params}: no such params file (python -m pipeline.params --write composes it)")
        config_dir, config_name = path.parent, path.stem
        group = next((o for o in overrides if "." not in _key_of(o) and (CONF / _key_of(o)).is_dir()), None)
        if group is not None:
            raise ConfigError(f"{group}: {PARAMS_FLAG} {params} holds an already composed config; group overrides "
                              f"compose pipeline/conf/: run the command without {PARAMS_FLAG}")
    else:
        config_dir = CONF
    try:
        with initialize_config_dir(str(config_dir), version_base=None):
            return hydra_compose(config_name, overrides=list(overrides))
    except HydraException as exc:
        raise ConfigError(_message(exc, list(overrides), params)) from None


def split_params(args: list[str]) -> tuple[str | None, list[str]]:
    """(``--params`` file or None, the overrides) from a stage's command line."""
    params, rest, it = None, [], iter(args)
    for arg in it:
        if arg == PARAMS_FLAG:
            params = next(it, None)
            if params is None:
                raise ConfigError(f"{PARAMS_FLAG} needs a file (e.g. {PARAMS_FLAG} params.yaml)")
        elif arg.startswith(PARAMS_FLAG + "="):
            params = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return params, rest


def keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of ``cfg``, nodes and leaves."""
    out = []
    for k in cfg.keys():
        full = f"{prefix}{k}"
        out.append(full)
        node = cfg._get_node(k)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            out.extend(keys(node, f"{full}."))
    return out


def suggest(key: str, cfg: DictConfig | None = None) -> str:
    """`` (did you mean <closest key>?)`` for a misspelled ``key``, or ''."""
    try:
        known = keys(cfg if cfg is not None else compose())
    except ConfigError:
        return ""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _message(exc: Exception, overrides: list[str], params: str | None) -> str:
    text = str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    m = re.search(r"Could not override '([^']+)'", text)
    if m and "No match in the defaults list" in text:
        group = m.group(1)
        where = f"{PARAMS_FLAG} {params} holds an already composed config" if params else "not a config group"
        return (f"{_override(overrides, group)}: {where}; group overrides (e.g. {group}=<option>) compose "
                f"pipeline/conf/: run the command without {PARAMS_FLAG}")
    if m:
        key = m.group(1)
        base = [o for o in overrides if _key_of(o) != key]
        try:
            known = compose(base, params) if params is None else OmegaConf.load(params)
        except ConfigError:
            known = None
        return f"{_override(overrides, key)}: no such key{suggest(key, known) if known is not None else ''}"
    m = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if m:
        group, option = m.groups()
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        close = difflib.get_close_matches(option, options, n=1)
        hint = f"; did you mean {group}={close[0]}?" if close else ""
        return f"{group}={option}: no such option (one of {', '.join(options)}){hint}"
    return f"overrides {' '.join(overrides)}: {first}" if overrides else first


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _override(overrides: list[str], key: str) -> str:
    return next((o for o in overrides if _key_of(o) == key), key)
