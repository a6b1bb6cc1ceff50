"""The batched replay backend through the loader and the stages (CPU): the same batches as the per-sample
backend, and a cache remembers which backend rendered its views."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.replay.loader import ViewLoader
from pipeline.replay.view_params import AugmentConfig

REPO = Path(__file__).resolve().parents[1]
TOY = AugmentConfig.from_cfg(__import__("yaml").safe_load((REPO / "pipeline/conf/augment/toy.yaml").read_text()), 32)


@pytest.mark.parametrize("workers,shuffle", [(0, True), (1, False)])
def test_batched_loader_gives_the_per_sample_batches(toy_shards, workers, shuffle):
    """Same samples in the same order, same targets and digests, and (full-size PNG decode) the same pixels."""
    def batches(backend):
        loader = ViewLoader(toy_shards.root / "train", TOY, run_seed=3, batch_size=48, num_workers=workers,
                            shuffle=shuffle, backend=backend)
        return list(loader.epoch(1, 0))

    ours, ref = batches("batched"), batches("per_sample")
    assert len(ours) == len(ref) == 11  # 512 samples / 48
    for a, b in zip(ours, ref):
        assert set(a) == set(b)
        for key in b:
            assert torch.equal(a[key], b[key]), key


def test_unknown_backend_is_named(toy_shards):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="replay.backend='gpu'"):
        ViewLoader(toy_shards.root / "train", TOY, run_seed=0, batch_size=8, backend="gpu")


def _stage(module, *overrides, cwd):
    return subprocess.run([sys.executable, "-m", f"pipeline.{module}", *overrides], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_a_cache_remembers_its_backend(toy_shards, tmp_path):
    """Stage one with replay.backend=batched records it; a per-sample student is refused naming both backends,
    and accepted with replay.allow_backend_mismatch=true."""
    import timm

    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), teacher)
    common = ["teacher=resnet_toy", f"workdir={tmp_path}", f"data.shards={toy_shards.root}",
              f"teacher.checkpoint={teacher}",
              f"cache.path={tmp_path / 'c.zarr'}", "cache.num_seeds=1", "cache.num_workers=0", "cache.batch_size=128",
              "num_threads=1"]
    built = _stage("teacher_cache", *common, "replay.backend=batched", cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    student = [*common, "train.epochs=1", "train.max_steps_per_epoch=2", "train.num_workers=0", "train.val=false",
               f"train.out_dir={tmp_path / 's'}", "++student.kwargs.depth=1"]
    refused = _stage("train_student", *student, cwd=tmp_path)
    assert refused.returncode == 2 and "replay.backend=batched" in refused.stderr, refused.stderr[-2000:]
    assert "replay.backend=per_sample" in refused.stderr and "Traceback" not in refused.stderr
    allowed = _stage("train_student", *student, "replay.allow_backend_mismatch=true", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    same = _stage("train_student", *student, "replay.backend=batched", f"train.out_dir={tmp_path / 'b'}",
                  cwd=tmp_path)
    assert same.returncode == 0, same.stderr[-3000:]
    # the teacher's agreement across backends on the same params (toy PNGs: the same pixels, so all agree)
    across = _stage("verify_cache", *common, "replay.backend=per_sample", "cache.verify_fraction=1.0", cwd=tmp_path)
    assert across.returncode == 0, across.stderr[-3000:]
    report = json.loads(across.stdout[across.stdout.index("{"):])
    recheck = report.get("teacher", report)
    assert recheck["argmax_agreement"] == 1.0, report
