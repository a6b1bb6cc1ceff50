"""DeiT's recipe with its repeated augmentation (`train=deit augment=deit`: train.repeat_mode=ranks), end to end on
the CPU through the real commands on photos: a class-per-folder tree of scikit-image's photos (JPEG), shards, a
cache of the teacher's targets (a random small teacher: the pipeline, not its accuracy, is the point), the DeiT-Ti
student under torchrun with 3 ranks for one epoch, evaluate. Small: 64 px views, one transformer block.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photo_tree(root: Path) -> None:
    """2 classes x 12 train / 4 val JPEGs: each photo, flipped and shifted variants."""
    import skimage.data

    for c, name in enumerate(("people", "things")):
        photos = [getattr(skimage.data, p)() for p in PHOTOS[2 * c:2 * c + 2]]
        for split, n in (("train", 12), ("val", 4)):
            (root / split / name).mkdir(parents=True)
            for k in range(n):
                img = np.roll(photos[k % 2], 7 * k, axis=1)[:, ::(-1) ** k]
                Image.fromarray(np.ascontiguousarray(img)).save(root / split / name / f"{k}.jpg", quality=90)


def run(*args: str, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, **(env_extra or {})}
    return subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_deit_recipe_end_to_end_on_photos(tmp_path):
    photo_tree(tmp_path / "photos")
    common = [f"workdir={tmp_path}", "data=folder", f"data.root={tmp_path / 'photos'}", "data.num_classes=2",
              "data.shard_size=8", "data.image_size=64", "augment=deit", "train=deit", "student=deit_tiny",
              "student.img_size=64", "++student.kwargs.depth=1", "teacher=regnety_toy", "teacher.checkpoint=null",
              "teacher.input_size=64", "cache.num_seeds=3", "num_threads=1"]
    made = run(sys.executable, "-m", "pipeline.make_shards", *common)
    assert made.returncode == 0, made.stderr[-3000:]
    cached = run(sys.executable, "-m", "pipeline.teacher_cache", *common, "cache.num_workers=0", "cache.batch_size=24")
    assert cached.returncode == 0, cached.stderr[-3000:]

    out = tmp_path / "run"
    train = [*common, "train.epochs=1", "train.batch_size=4", "train.num_workers=0", "train.dvclive=false",
             "train.log_indices=true", f"train.out_dir={out}"]
    trained = run("bash", str(REPO / "stages" / "launch.sh"), "train_student", *train, env_extra={"NPROC": "3"})
    assert trained.returncode == 0, trained.stderr[-3000:]
    where = defaultdict(list)
    for rank in range(3):
        (line,) = [json.loads(x) for x in (out / "indices" / f"rank{rank}.jsonl").read_text().splitlines()]
        for step, i, s in line["views"]:
            where[i].append((step, rank, s))
    assert len(where) == 24 // 3  # epoch 0: a third of the 24 photos, 3 copies each
    for i, copies in where.items():  # copy c on rank c under seed c, all in one step
        assert sorted((rank, s) for _, rank, s in copies) == [(0, 0), (1, 1), (2, 2)], copies
        assert len({step for step, _, _ in copies}) == 1, copies
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["img_per_s"] > 0, metrics

    evaluated = run(sys.executable, "-m", "pipeline.evaluate", *train)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert 0 <= result["acc"] <= 1, result
