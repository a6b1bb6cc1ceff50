"""Resumable training state: one checkpoint per epoch (atomic; the previous one kept), the newest loadable one
found at start-up, and a run key that refuses a checkpoint written by another run."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.atomic import atomic_save
from pipeline.errors import CheckpointError

CHECKPOINT_LAST = "checkpoint-last.pt"
CHECKPOINT_PREV = "checkpoint-prev.pt"
CHECKPOINT_FORMAT = "pipeline-student-checkpoint"  # also the teacher's (one loop); renaming it would refuse every checkpoint
CHECKPOINT_VERSION = 1
_KEYS = ("epoch", "step", "model", "optimizer", "scheduler", "history", "run")


def save_checkpoint(state: dict, out_dir: Path) -> Path:
    """Write ``checkpoint-last.pt``; the one it replaces becomes ``checkpoint-prev.pt``."""
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    return atomic_save(state, Path(out_dir) / CHECKPOINT_LAST, previous=Path(out_dir) / CHECKPOINT_PREV)


def load_checkpoint_file(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not a training checkpoint of this pipeline")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {state.get('version')}, this code reads {CHECKPOINT_VERSION}")
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise ValueError(f"incomplete checkpoint (no {missing[0]!r})")
    return state


def find_checkpoint(out_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest loadable checkpoint in ``out_dir`` (by completed epochs) and warnings about skipped files."""
    best, best_epoch, notes = None, -1, []
    for name in (CHECKPOINT_LAST, CHECKPOINT_PREV):
        path = Path(out_dir) / name
        if not path.exists():
            continue
        try:
            state = load_checkpoint_file(path)
        except Exception as exc:  # noqa: BLE001 - a truncated/corrupt file raises many kinds
            notes.append(f"skipping checkpoint {path}: cannot be loaded ({type(exc).__name__}: {exc})")
            continue
        if int(state["epoch"]) > best_epoch:
            best, best_epoch = path, int(state["epoch"])
    return best, notes


def resume_mode(value) -> str:
    """``auto`` (newest good checkpoint), ``never``, or a checkpoint path."""
    if value is None or value is False or str(value).lower() in ("never", "false", "no", "off", "none"):
        return "never"
    if value is True or str(value).lower() in ("auto", "true", "yes", "on"):
        return "auto"
    return str(value)


def choose_checkpoint(out_dir: Path, resume, say) -> Path | None:
    mode = resume_mode(resume)
    if mode == "never":
        return None
    if mode == "auto":
        chosen, notes = find_checkpoint(out_dir)
        for note in notes:
            say(f"warning: {note}")
        return chosen
    if not Path(mode).is_file():
        raise CheckpointError(f"train.resume={mode}: no such checkpoint")
    return Path(mode)


def check_run(state: dict, run_key: dict, path, key: str = "train") -> None:
    """Refuse a checkpoint written by a run with another configuration (names the field and both values)."""
    have = state["run"]
    for field in list(have) + [k for k in run_key if k not in have]:
        if have.get(field) != run_key.get(field):
            raise CheckpointError(
                f"{path}: written by a run with {field}={have.get(field)!r}, this config has "
                f"{run_key.get(field)!r}; set {key}.resume=never or use another {key}.out_dir")
