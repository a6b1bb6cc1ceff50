"""DVC the way its users expect, in a temporary git repo: `dvc repro` (all stages, then nothing), a committed
baseline and `dvc exp run -S distill=soft` compared with `dvc exp show` / `exp diff` / `plots diff`, a failed
experiment that leaves the workspace as it was, and `dvc exp apply` bringing an experiment's outputs back."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.params import composed

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


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def _git(work, *args):
    return _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], work)


def _snapshot(work: Path) -> dict:
    """Every file of the workspace that an experiment could touch (git's and DVC's), by content."""
    files = [work / "params.yaml", work / "dvc.lock", *(work / "metrics").rglob("*"), *(work / "runs").rglob("*"),
             *(work / "cache").rglob("*")]
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


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
    work = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file() and not f.startswith("metrics/"):
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, work / f)
    _run([sys.executable, "-m", "pipeline.params", "--write", *SMALL], work)
    _run(["git", "init", "-q"], work)
    _git(work, "add", "-A")
    _git(work, "commit", "-qm", "init")

    # dvc repro: every stage, then nothing.
    first = _run([DVC, "repro"], work)
    assert _stages_run(first) == {"make_shards", "train_teacher", "teacher_cache", "train_student", "evaluate",
                                  "export"}
    assert (work / "runs" / "export" / "toy-hard-cache" / "model.safetensors").is_file()
    assert "student (hard, cache) class head" in first  # the summary table
    assert _stages_run(_run([DVC, "repro"], work)) == set()

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
    diff = json.loads(_run([DVC, "exp", "diff", "HEAD", "soft", "--json"], work))
    assert "acc" in diff["metrics"]["metrics/student.json"] and "distill.mode" in diff["params"]["params.yaml"]
    plots = json.loads(_run([DVC, "plots", "diff", "HEAD", "soft", "--json"], work))["data"]
    curve = next(v for k, v in plots.items() if k.endswith("val/acc.tsv"))  # one plot, both runs' curves
    assert {r["rev"] for r in curve[0]["content"]["data"]["values"]} == {"HEAD", "soft"}

    # A failed experiment (a typo) leaves the workspace exactly as it was: params.yaml, dvc.lock, outputs, metrics.
    before, status = _snapshot(work), _run(["git", "status", "--porcelain"], work)
    failed = _run([DVC, "exp", "run", "-S", "distill.mode=sotf"], work, check=False)
    assert failed.returncode != 0 and "distill.mode='sotf' is not one of" in failed.stdout + failed.stderr
    assert _snapshot(work) == before and _run(["git", "status", "--porcelain"], work) == status
    assert set(_rows(work)) == set(rows)  # no experiment recorded

    # Back to the baseline (git + dvc checkout), then `dvc exp apply soft` brings the soft run's outputs back.
    soft_student = {p: h for p, h in before.items() if p.startswith("runs/student/toy-soft-cache/")}
    assert soft_student and any(p.endswith("/student.pt") for p in soft_student)
    _git(work, "reset", "-q", "--hard")
    _run([DVC, "checkout", "--force"], work)
    assert yaml.safe_load((work / "params.yaml").read_text())["distill"]["mode"] == "hard"
    assert json.loads((work / "metrics/student.json").read_text()) == baseline["student"]
    assert (work / "runs/student/toy-hard-cache/student.pt").is_file()
    shutil.rmtree(work / "runs" / "student" / "toy-soft-cache", ignore_errors=True)
    _run([DVC, "exp", "apply", "soft"], work)
    assert yaml.safe_load((work / "params.yaml").read_text())["distill"]["mode"] == "soft"
    assert json.loads((work / "metrics/student.json").read_text()) == rows["soft"]["student"]
    after = _snapshot(work)
    assert {p: after.get(p) for p in soft_student} == soft_student
    print(f"test_dvc: {time.time() - t0:.0f} s")
