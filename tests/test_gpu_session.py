"""bench/gpu_session.sh, the prepared first GPU run, on CPU (SMOKE=1): every phase must finish, so that a session
lent a GPU spends its minutes measuring, not fixing renamed keys. Its GPU numbers cannot be tested here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_session_dry_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "PY": sys.executable, "PYTHONPATH": str(REPO)}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh"), "run"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    summary = (out / "summary.txt").read_text()
    for phase in ("cuda_tests", "stages", "bench_gpu"):
        assert f"=== {phase}: rc=0 " in summary, (phase, summary, r.stdout[-3000:])
    stages = (out / "stages.log").read_text()
    assert "metrics ->" in stages and '"agreement"' in stages  # train_student and evaluate ran to the end
    for stage in ("make_shards", "train_teacher", "teacher_cache", "train_student", "evaluate"):
        assert f"--- {stage}: " in stages  # each stage's seconds (where torch.compile's time goes, on the GPU)
    # one deadline (555 s): the stages get what the tests left but the bench's 200 s, the bench all the rest
    limits = {m[0]: int(m[1]) for m in re.findall(r"=== (\w+) \(limit (\d+) s\)", summary)}
    assert limits["cuda_tests"] == 90 and 555 - 90 - 200 <= limits["stages"] <= 555 - 200
    assert 200 < limits["bench_gpu"] < 555  # the time the stages did not use went to the bench
    res = json.loads((out / "gpu.json").read_text())
    assert set(res["students"]["deit_tiny"]) == {"pure", "cached, per-sample", "cached, batched", "online"}
    assert res["stage_one"]["views"] > 0


def test_gpu_session_without_a_mode_prints_its_usage():
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and "bench/gpu_session.sh run" in r.stdout
