"""`dvc repro` end to end in a temporary git repo: all stages, then nothing, then only the student on a mode change."""

import json
import os
import re
import shutil
import subprocess
import sys
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


def test_committed_params_yaml_is_the_composition_of_conf():
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert committed == composed(), "params.yaml is stale: run `python -m pipeline.params`"


def _run(cmd, cwd, timeout=900):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHON=sys.executable)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


@pytest.mark.slow
def test_dvc_repro_then_noop_then_mode_change(tmp_path):
    assert DVC, "dvc is not installed (pip install -e '.[dev]')"
    work = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, work / f)
    _run([sys.executable, "-m", "pipeline.params", *SMALL], work)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        _run(cmd, work)

    first = _run([DVC, "repro"], work)
    assert _stages_run(first) == {"make_shards", "train_teacher", "teacher_cache", "train_student", "evaluate"}
    assert "student (hard, cache) class head" in first  # the summary table

    second = _run([DVC, "repro"], work)
    assert _stages_run(second) == set(), second

    third = _run([DVC, "exp", "run", *[a for o in SMALL + ["distill=soft"] for a in ("-S", o)]], work)
    assert _stages_run(third) == {"train_student", "evaluate"}, third
    assert yaml.safe_load((work / "params.yaml").read_text())["distill"]["mode"] == "soft"

    metrics = json.loads(_run([DVC, "metrics", "show", "--json"], work))
    flat = json.dumps(metrics)
    for key in ("val_acc", "student_acc_avg", "student_acc_dist", "teacher_agreement", "total", "img_per_s"):
        assert f'"{key}"' in flat, f"metric {key} missing from dvc metrics show"
    summary = json.loads((work / "runs" / "eval" / "toy-soft-cache.json").read_text())
    assert summary["distill_mode"] == "soft" and 0 <= summary["student_acc_avg"] <= 1
