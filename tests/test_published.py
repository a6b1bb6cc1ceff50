"""Our shards in timm's WebDataset layout (``_info.json``, ``.json`` sidecars, umask-made folders) on real files."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import sources
from pipeline.data.shards import load_manifest, verify_shards, write_shards

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, umask=None, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.make_shards", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def _timm_samples(root, name, split):
    import timm.data

    ds = timm.data.create_dataset(f"wds/{name}", root=str(root), split=split)
    return [(img, int(target)) for img, target in ds]


def _our_samples(m):
    return [(data, label) for k in range(m.num_shards) for _, _, data, label in m.iter_shard(k)]


def _modes(root):
    dirs = {oct(stat.S_IMODE(os.stat(d).st_mode)) for d, _, _ in os.walk(root)}
    files = {oct(stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode)) for d, _, fs in os.walk(root) for f in fs}
    return dirs, files


def test_timm_opens_our_shards_by_name(tmp_path):
    r = _cli("data=toy", f"workdir={tmp_path}", "data.train_size=70", "data.val_size=20", "data.shard_size=32",
             umask=0o022)
    assert r.returncode == 0, r.stderr
    root = tmp_path / "data" / "shards" / "toy"
    info = json.loads((root / "_info.json").read_text())
    assert info["splits"]["train"] == {"name": "train", "num_samples": 70, "shard_lengths": [32, 32, 6],
                                       "filenames": [f"train/shard-0000{k}.tar" for k in range(3)]}
    assert info["splits"]["validation"]["num_samples"] == info["splits"]["val"]["num_samples"] == 20
    for split in ("train", "val", "validation"):
        m = load_manifest(root / ("val" if split == "validation" else split))
        ours = _our_samples(m)
        got = _timm_samples(root, "toy", split)
        assert [label for _, label in got] == [label for _, label in ours]  # every sample, in order
        for (img, _), (data, _) in zip(got, ours):
            assert isinstance(img, Image.Image) and img.size == (32, 32)
        assert np.array_equal(np.asarray(got[5][0]), np.asarray(Image.open(__import__("io").BytesIO(ours[5][0]))))
    dirs, files = _modes(root)
    assert dirs == {"0o755"} and files == {"0o644"}, (dirs, files)  # umask 022, as any folder the user makes


def test_shard_folders_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        s = sources.toy(0, 10, "train")
        write_shards(s, tmp_path / "out" / "train", shard_size=4, num_classes=10, class_names=s.class_names,
                     source=s.source)
    finally:
        os.umask(old)
    assert _modes(tmp_path / "out" / "train") == ({"0o750"}, {"0o640"})


def _tree(root, classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    names = {}
    for split in ("train", "val"):
        for label, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for j in range(per_class):
                p = root / split / c / f"{c}_{j}.JPEG"
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(p, format="JPEG")
                names[p.read_bytes()] = (f"{c}/{p.name}", label)
    return names


def test_folder_shards_keep_file_names(tmp_path):
    names = _tree(tmp_path / "tree")
    r = _cli("data=folder", f"data.root={tmp_path / 'tree'}", "data.num_classes=2", "data.shard_size=4",
             f"data.shards={tmp_path / 'shards'}", f"workdir={tmp_path}")
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "shards" / "train")
    verify_shards(m, deep=True)  # our reader takes the .json sidecar
    import webdataset as wds

    seen = 0
    for k in range(m.num_shards):
        for sample in wds.WebDataset(str(m.shard_path(k)), shardshuffle=False):
            name, label = names[sample["jpg"]]
            assert json.loads(sample["json"]) == {"filename": name} and int(sample["cls"]) == label
            seen += 1
    assert seen == 6
    got = _timm_samples(tmp_path / "shards", "tree", "train")
    assert [label for _, label in got] == [label for _, label in _our_samples(m)]
