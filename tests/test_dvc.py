"""DVC the way its users expect, in a temporary git repo: `dvc repro` (all stages, then nothing, no warnings), a
committed baseline and `dvc exp run -S distill=soft` compared with README's `dvc exp show` command (120 columns) /
`exp diff` / `plots diff`, config errors as one line that change nothing, an experiment that would delete
hand-made shards refused, a failed stage undone by README's one command, and `dvc exp apply` bringing an
experiment's outputs back; a comment in one file per room marks exactly the stages whose bytes that room decides."""

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.params import composed
from readme_blocks import copy_checkout

REPO = Path(__file__).resolve().parents[1]
DVC = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")

# Small sizes so the whole pipeline runs in about a minute here; the defaults run in .ci/run.
SMALL = ["data.train_size=512", "data.val_size=128", "data.shard_size=64", "teacher.train.epochs=1",
         "teacher.input_size=32", "cache.num_seeds=2", "train.epochs=2", "train.batch_size=64",
         "++student.kwargs.depth=2"]
# What each metrics file holds: flat numbers only (provenance, recipes and byte tables live elsewhere).
METRICS = {"metrics/teacher.json": {"acc", "img_per_s", "seconds"},
           "metrics/cache.json": {"bytes_per_view", "img_per_s", "seconds", "views"},
           "metrics/student.json": {"acc", "acc_cls", "acc_dist", "agreement", "img_per_s", "seconds"}}


def test_committed_params_yaml_is_the_composition_of_conf():
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert committed == composed(config_name="dvc"), "params.yaml is stale: run `python -m pipeline.params --write`"


def test_composing_conf_validates_it():
    """eval.out resolves through pipeline_checked: a bad value fails the composition itself, as DVC resolves it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    from pipeline.compose import compose

    for name in ("config", "dvc"):
        with pytest.raises(InterpolationResolutionError, match=r"distill.mode='sotf' is not one of"):
            OmegaConf.resolve(compose(["distill.mode=sotf"], config_name=name))
        with pytest.raises(InterpolationResolutionError, match=r"train.epochs=0 must be >= 1"):
            OmegaConf.resolve(compose(["train.epochs=0"], config_name=name))


def _run(cmd, cwd, timeout=900, check=True):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHON=sys.executable, COLUMNS="120")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc if not check else proc.stdout + proc.stderr


def small_repo(work: Path) -> Path:
    """A copy of the checkout (less metrics/) at the SMALL sizes, committed in a new git repo."""
    copy_checkout(work, leave_out=("metrics/",))
    _run([sys.executable, "-m", "pipeline.params", "--write", *SMALL], work)
    _run(["git", "init", "-q"], work)
    _git(work, "add", "-A")
    _git(work, "commit", "-qm", "init")
    return work


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def _git(work, *args):
    return _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], work)


def _snapshot(work: Path) -> dict:
    """Every file of the workspace that an experiment could touch (git's and DVC's), by content."""
    files = [work / "params.yaml", work / "dvc.lock",
             *(p for d in ("metrics", "runs", "cache", "data") for p in (work / d).rglob("*"))]
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def _status(work: Path) -> str:
    return _run(["git", "status", "--porcelain", "--untracked-files=all"], work)


def _readme_command(start: str) -> list[str]:
    """The documented command (README.md, docs/operations.md) that begins with ``start`` (`\\|` in a table cell is a
    literal |), as argv."""
    text = (REPO / "README.md").read_text() + (REPO / "docs" / "operations.md").read_text()
    spans = [c for line in text.splitlines() for c in re.findall(r"`([^`]+)`", line)]
    argv = shlex.split(next(c for c in spans if c.startswith(start)).replace("\\|", "|"))
    return [DVC, *argv[1:]] if argv[0] == "dvc" else argv


def _image_folder(root: Path) -> Path:
    """<root>/{train,val}/{a,b}/*.jpg: two classes, three small JPEGs each."""
    import numpy as np
    from PIL import Image

    for i, (split, cls) in enumerate((s, c) for s in ("train", "val") for c in ("a", "b")):
        (root / split / cls).mkdir(parents=True)
        for j in range(3):
            pixels = np.random.default_rng(10 * i + j).integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / cls / f"{j}.jpg")
    return root


def _rows(work: Path) -> dict:
    """`dvc exp show --json`: {name (branch, experiment, "workspace"): {"mode": distill.mode, "teacher": teacher
    metrics, "cache": ..., "student": ...}}."""
    rows = {}
    for commit in json.loads(_run([DVC, "exp", "show", "--json"], work)):
        for rec in [commit, *[e for ex in commit.get("experiments") or [] for e in ex.get("revs") or []]]:
            data = rec.get("data") or {}
            metrics = {path: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()}
            params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
            name = rec.get("name") or rec.get("rev", "")
            rows[name] = {"mode": params.get("distill", {}).get("mode"),
                          **{Path(p).stem: metrics.get(p) for p in METRICS}}
    return rows


@pytest.mark.slow
def test_dvc_repro_experiments_and_a_failed_experiment(tmp_path):
    assert DVC, "dvc is not installed (pip install -e '.[dev]')"
    t0 = time.time()
    work = small_repo(tmp_path / "repo")

    # dvc repro: every stage, then nothing; no DVC warning (an empty package __init__.py was one per dep).
    first = _run([DVC, "repro"], work)
    assert _stages_run(first) == {"make_shards", "train_teacher", "teacher_cache", "train_student", "evaluate",
                                  "export"}
    assert "WARNING:" not in first and "is empty" not in first, first
    assert (work / "runs" / "export" / "toy-hard-cache" / "model.safetensors").is_file()
    assert "student (hard, cache) class head" in first  # the summary table
    assert _stages_run(_run([DVC, "repro"], work)) == set()
    _check_stale_by_room(work)

    # Metrics: flat, short files, git-tracked where DVC reads them; `dvc metrics show` fits a terminal.
    for path, keys in METRICS.items():
        assert set(json.loads((work / path).read_text())) == keys, path
    table = _run([DVC, "metrics", "show"], work)
    assert max(len(line) for line in table.splitlines()) <= 120, table
    assert "!!" not in _run(["git", "status", "--porcelain", "--ignored", "metrics"], work)  # not git-ignored

    # The baseline is a commit (DVC's way); an experiment changes the mode and reruns only the student.
    _git(work, "add", "dvc.lock", "metrics")
    _git(work, "commit", "-qm", "baseline: distill=hard")
    soft = _run([DVC, "exp", "run", "-n", "soft", *[a for o in SMALL + ["distill=soft"] for a in ("-S", o)]], work)
    assert _stages_run(soft) == {"train_student", "evaluate", "export"}, soft
    rows = _rows(work)
    baseline = next(r for name, r in rows.items() if name not in ("workspace", "soft") and r["mode"] == "hard")
    assert rows["soft"]["mode"] == "soft"
    for row in (baseline, rows["soft"]):
        student = row["student"]
        assert 0 <= student["acc"] <= 1 and 0 <= student["acc_dist"] <= 1 and student["img_per_s"] > 0, row
        assert 0 <= row["teacher"]["acc"] <= 1 and row["cache"]["bytes_per_view"] > 0, row
    assert baseline["teacher"] == rows["soft"]["teacher"] and baseline["cache"] == rows["soft"]["cache"]
    _check_compare(work)

    # Config errors and experiments that would lose data: refused before DVC changes anything.
    before = _snapshot(work)
    _check_config_errors(work)
    _check_hand_made_shards_kept(work, _image_folder(tmp_path / "imgs"))
    assert set(_rows(work)) == set(rows)  # no experiment recorded

    # Back to the baseline (git + dvc checkout); a stage failing after DVC started is undone by README's command;
    # then `dvc exp apply soft` brings the soft run's outputs back.
    soft_student = {p: h for p, h in before.items() if p.startswith("runs/student/toy-soft-cache/")}
    assert soft_student and any(p.endswith("/student.pt") for p in soft_student)
    _git(work, "reset", "-q", "--hard")
    _run([DVC, "checkout", "--force"], work)
    assert yaml.safe_load((work / "params.yaml").read_text())["distill"]["mode"] == "hard"
    assert json.loads((work / "metrics/student.json").read_text()) == baseline["student"]
    assert (work / "runs/student/toy-hard-cache/student.pt").is_file()
    _check_failed_stage_restored(work, tmp_path / "imgs")
    shutil.rmtree(work / "runs" / "student" / "toy-soft-cache", ignore_errors=True)
    _run([DVC, "exp", "apply", "soft"], work)
    assert yaml.safe_load((work / "params.yaml").read_text())["distill"]["mode"] == "soft"
    assert json.loads((work / "metrics/student.json").read_text()) == rows["soft"]["student"]
    after = _snapshot(work)
    assert {p: after.get(p) for p in soft_student} == soft_student
    print(f"test_dvc: {time.time() - t0:.0f} s")


STAGES = {"make_shards", "train_teacher", "teacher_cache", "train_student", "evaluate", "export"}
# A comment added to one file per room, and the stages `dvc status` then marks stale: code decides a stage's bytes
# through its room's folder or its room's contract file (dvc.yaml); plumbing re-runs nothing.
STALE_AFTER_A_COMMENT = {
    "pipeline/data/shards.py": {"make_shards"},
    "pipeline/replay/pixels.py": set(),  # stands behind pipeline/replay/contract.py
    "pipeline/replay/contract.py": {"train_teacher", "teacher_cache", "train_student", "evaluate"},
    "pipeline/models/teacher.py": STAGES - {"make_shards"},
    "pipeline/cache/lease.py": set(),
    "pipeline/cache/targets.py": {"teacher_cache", "train_student", "evaluate"},
    "pipeline/cache/contract.py": {"teacher_cache", "train_student"},
    "pipeline/train/loop.py": {"train_teacher", "train_student", "evaluate"},
    "pipeline/config.py": set(),
    "stages/launch.sh": STAGES,
}


def _check_stale_by_room(work: Path) -> None:
    for path, expected in STALE_AFTER_A_COMMENT.items():
        file = work / path
        text = file.read_text()
        file.write_text(text + "# a comment\n")
        try:
            status = _run([DVC, "status", "--json"], work, check=False)
            assert status.returncode == 0, status.stderr
            stale = set(json.loads(status.stdout or "{}"))
        finally:
            file.write_text(text)
        assert stale == expected, f"a comment in {path} marks {sorted(stale)} stale, expected {sorted(expected)}"
    assert json.loads(_run([DVC, "status", "--json"], work, check=False).stdout or "{}") == {}


def _check_compare(work: Path) -> None:
    """README's compare command fits 120 columns and shows the param that differs; exp diff and plots diff compare
    the two runs; `dvc plots diff` leaves git status as it was (dvc_plots/ is git-ignored)."""
    table = _run(_readme_command("dvc exp show --only-changed"), work)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 120 and "distill.mode" in table, table
    modes = {line.split()[-1] for line in lines if re.search(r"\d\.\d", line)}  # the rows' last column
    assert modes == {"hard", "soft"}, table  # distill.mode: the baseline's and `soft`'s
    assert "…" not in table, table
    diff = json.loads(_run([DVC, "exp", "diff", "HEAD", "soft", "--json"], work))
    assert "acc" in diff["metrics"]["metrics/student.json"] and "distill.mode" in diff["params"]["params.yaml"]
    plots = json.loads(_run([DVC, "plots", "diff", "HEAD", "soft", "--json"], work))["data"]
    curve = next(v for k, v in plots.items() if k.endswith("val/acc.tsv"))  # one plot, both runs' curves
    assert {r["rev"] for r in curve[0]["content"]["data"]["values"]} == {"HEAD", "soft"}
    status = _status(work)
    _run([DVC, "plots", "diff", "HEAD", "soft"], work)
    assert (work / "dvc_plots" / "index.html").is_file() and _status(work) == status


def _refused(work: Path, *overrides: str) -> str:
    """`dvc exp run -S ...` that must fail as one line, exit 2, with the workspace left exactly as it was."""
    before, status = _snapshot(work), _status(work)
    proc = _run([DVC, "exp", "run", *[a for o in overrides for a in ("-S", o)]], work, check=False)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2 and len(out.splitlines()) == 1 and out.startswith("dvc exp run: error: "), out
    assert _snapshot(work) == before and _status(work) == status
    return out


def _check_config_errors(work: Path) -> None:
    """A bad value and a typo: DVC's "unexpected error" dump and support banner become one line naming the key."""
    assert "distill.mode='sotf' is not one of" in _refused(work, "distill.mode=sotf")
    assert "distill.moed=soft: no such key (did you mean distill.mode?)" in _refused(work, "distill.moed=soft")


def _check_hand_made_shards_kept(work: Path, images: Path) -> None:
    """Shards made by hand at the path an experiment would build (DVC's forced checkout would delete them, and
    nothing could restore them) refuse the experiment; so does a data.root that does not exist."""
    folder = ["data=folder", f"data.root={images}", "data.num_classes=2"]
    _run([sys.executable, "-m", "pipeline.make_shards", *folder], work)
    shards = work / "data" / "shards" / images.name
    assert (shards / "train" / "manifest.json").is_file()
    out = _refused(work, *folder)
    assert f"data.shards=data/shards/{images.name} exists and dvc.lock does not list it" in out, out
    shutil.rmtree(shards)
    out = _refused(work, "data=folder", f"data.root={images}-missing", "data.num_classes=2")
    assert f"data.root={images}-missing: no such directory" in out, out


def _check_failed_stage_restored(work: Path, images: Path) -> None:
    """A stage that fails once DVC has started (make_shards: 3 classes declared, 2 class folders) leaves what DVC
    leaves: the experiment's params.yaml, and the outs DVC had checked out that the experiment does not declare
    deleted. README's one command brings back every file byte for byte."""
    before, status = _snapshot(work), _status(work)
    proc = _run([DVC, "exp", "run", "-S", "data=folder", "-S", f"data.root={images}", "-S", "data.num_classes=3"],
                work, check=False)
    assert proc.returncode != 0 and "data.num_classes=3 but source folder has 2 classes" in proc.stdout + proc.stderr
    assert not (work / "runs/student/toy-hard-cache").exists() and _status(work) != status  # DVC's doing
    _run(_readme_command("dvc exp apply HEAD"), work)
    assert _snapshot(work) == before and _status(work) == status
