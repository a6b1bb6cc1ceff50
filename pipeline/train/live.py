"""Per-epoch logging: dvclive (metrics and plots for DVC) and the optional per-rank index log."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

log = logging.getLogger("pipeline")


def dvclive_blocker(cwd: Path | None = None) -> Path | None:
    """The Git work tree dvclive would turn into a DVC repository, or None when dvclive is safe to use.

    dvclive opens the DVC repository around the working directory; when there is none but a Git repository
    is, it runs ``dvc init`` at the Git root (dvclive.dvc.get_dvc_repo). A training run must not do that."""
    cwd = Path.cwd() if cwd is None else cwd
    for d in (cwd, *cwd.parents):
        if (d / ".dvc").is_dir():
            return None
        if (d / ".git").exists():
            return d
    return None


def open_live(out_dir: Path, history: list[dict]):
    """dvclive in ``out_dir/dvclive``, rebuilt from the checkpoint's history (so a resumed run never logs an
    epoch twice). Writes no dvc.yaml and saves no DVC experiment; skipped (history.json has the same numbers)
    where dvclive would ``dvc init`` a Git repository."""
    try:
        from dvclive import Live
    except ImportError:
        log.info("note: dvclive is not installed; per-epoch metrics are in history.json")
        return None
    blocker = dvclive_blocker()
    if blocker is not None:
        log.info(f"note: dvclive skipped: {blocker} is a Git repository without DVC and dvclive would run "
                 f"`dvc init` there; per-epoch metrics are in history.json")
        return None
    live_dir = out_dir / "dvclive"
    if live_dir.exists():
        shutil.rmtree(live_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    for metrics in history:
        log_live(live, metrics)
    return live


def log_live(live, metrics: dict) -> None:
    for key, value in metrics.items():
        if key in ("epoch", "seed", "steps", "updates", "epoch_seconds"):
            continue
        group = "val" if key.startswith("val_") else "train"
        name = key[4:] if key.startswith("val_") else key.removeprefix("train_")
        live.log_metric(f"{group}/{name}", float(value))
    live.next_step()


class IndexLog:
    """``<out_dir>/indices/rank<r>.jsonl``: the sample indices one rank trained on, one line per epoch, with each
    view's step and seed index (tests)."""

    def __init__(self, out_dir: Path, rank: int, start_epoch: int):
        self.path = out_dir / "indices" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = []  # a killed run may have logged a later epoch than its checkpoint
        if start_epoch > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["epoch"] < start_epoch:
                        keep.append(line)
                except (ValueError, KeyError):
                    continue
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, epoch: int, seed: int, steps: int, indices: list[int], views: list | None = None) -> None:
        """views: [step, sample index, seed index] of every view trained on."""
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "seed": seed, "steps": steps, "indices": indices,
                                "views": views or []}) + "\n")
