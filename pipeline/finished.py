"""Finished runs in a workdir, for the commands that read one (export and evaluate read a student, train_student
and verify_cache a cache store). Each command reads the run its own configuration names; when that run does not
exist, the error lists the runs that do, with the overrides that select each, instead of suggesting a retrain.

A student run records its composed configuration (``config.yaml`` in ``train.out_dir``), so the overrides are
the keys where it differs from this command's configuration, less the keys pipeline/conf/ derives (paths that follow
other keys) and where metrics are written.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import CacheError, MissingInput

RUN_CONFIG = "config.yaml"  # beside a student's weights: the configuration that trained it
SHOWN = 6  # overrides listed per run; more are elided


def write_run_config(cfg: DictConfig, out_dir: Path) -> None:
    from pipeline.atomic import atomic_write_text

    atomic_write_text(Path(out_dir) / RUN_CONFIG, OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))


def overrides_for(run: DictConfig, cfg: DictConfig) -> list[str]:
    """The ``key=value`` overrides that turn ``cfg`` into the configuration ``run`` was trained with."""
    from pipeline.compose import compose

    derived = compose()  # pipeline/conf/ unresolved: an interpolated key follows the keys it names
    out = []
    for key in _leaves(run):
        if key.startswith("eval.") or key.endswith(".metrics"):
            continue
        if _derived(derived, key):
            continue
        theirs, ours = OmegaConf.select(run, key), OmegaConf.select(cfg, key, default=None)
        if _plain(theirs) != _plain(ours):
            out.append(f"{key}={_value(theirs)}")
    return out


def missing_student(cfg: DictConfig, path: Path) -> MissingInput:
    """The error for a student checkpoint ``path`` that does not exist: the trained students of this workdir."""
    found = []
    for config in sorted((Path(str(cfg.workdir)) / "runs" / "student").glob(f"*/{RUN_CONFIG}")):
        if (config.parent / "student.pt").is_file():
            found.append(f"{config.parent} ({_shown(overrides_for(OmegaConf.load(config), cfg))})")
    if not found:
        return MissingInput(f"{path}: no trained student (run python -m pipeline.train_student with the same "
                            f"overrides)")
    return MissingInput(f"{path}: no trained student for this configuration; trained here: {'; '.join(found)}: "
                        f"add those overrides")


def require_store(cfg: DictConfig) -> None:
    """A CacheError listing this workdir's stores when ``cache.path`` (local) does not exist."""
    path = str(cfg.cache.path)
    if "://" in path or Path(path).is_dir():
        return
    stores = sorted(str(p) for p in (Path(str(cfg.workdir)) / "cache").glob("*.zarr") if p.is_dir())
    there = f"; stores here: {', '.join(f'cache.path={s}' for s in stores)}" if stores else ""
    raise CacheError(f"{path}: no cache store here (python -m pipeline.teacher_cache with the same overrides "
                     f"builds it){there}")


def _leaves(cfg: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for k in cfg.keys():
        v = cfg[k]
        out.extend(_leaves(v, f"{prefix}{k}.") if isinstance(v, DictConfig) else [f"{prefix}{k}"])
    return out


def _derived(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node and OmegaConf.is_interpolation(node, leaf)


def _plain(v):
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def _value(v) -> str:
    v = _plain(v)
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v).replace(" ", "")


def _shown(overrides: list[str]) -> str:
    if not overrides:
        return "this configuration"
    more = f" and {len(overrides) - SHOWN} more" if len(overrides) > SHOWN else ""
    return " ".join(overrides[:SHOWN]) + more
