"""Shards read verified: each shard hashed as it streams and checked before its last sample, a tampered shard
or an image that does not decode named by shard and key, and make_shards' input checks (truncated images,
16-bit and float images, empty class folders)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from pipeline.cache.integrity import check_store
from pipeline.cache.store import CacheStore
from pipeline.config import validate
from pipeline.errors import ShardError
from store_env import make_cfg, run, flip_byte


# ------------------------------------------------------------------------------------- shards read verified
def _copy_train(toy_shards, dst: Path):
    shutil.copytree(toy_shards.root / "train", dst / "train")
    from pipeline.data.shards import load_manifest

    return load_manifest(dst / "train")


def test_each_shard_is_hashed_as_it_streams_and_checked_before_its_last_sample(toy_shards, tmp_path):
    m = _copy_train(toy_shards, tmp_path)
    assert len(list(m.iter_shard(2))) == 64
    path = m.shard_path(2)
    raw = path.read_bytes()
    label_at = raw.index(b"000130.cls") + 512  # a label's data block: still a valid tar, a valid label
    for what, offset in (("tar padding", len(raw) - 1), ("a label", label_at)):
        bad = bytearray(raw)
        bad[offset] = ord("5") if bad[offset] != ord("5") else ord("6")
        path.write_bytes(bytes(bad))
        got = []
        with pytest.raises(ShardError, match=rf"{path}: sha256 [0-9a-f]{{64}} does not match the manifest's"):
            for sample in m.iter_shard(2):
                got.append(sample)
        assert len(got) == 63, what  # the last sample is never handed out from a shard that fails its hash
    path.write_bytes(raw)


@pytest.mark.slow
def test_stage_one_commits_nothing_computed_from_a_tampered_shard(env, tmp_path):
    data = tmp_path / "data"
    m = _copy_train(env.toy, data)
    shard = m.shard_path(3)
    raw = shard.read_bytes()
    flip_byte(shard, at=-1)  # the tar's last padding byte: every sample still reads
    store = tmp_path / "c.zarr"
    proc = run("teacher_cache", *env.overrides(store, "cache.num_workers=1", shards=data))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"teacher_cache: error: {shard}: sha256 " in proc.stderr
    assert not np.asarray(zarr.open_array(str(store / "done"), mode="r")[:, 3]).any()
    report = check_store(CacheStore.open(store))
    assert report["damaged"] == [] and report["array_problems"] == []  # what was committed (other shards) is intact
    assert not report["ok"] and {"seed": 0, "shard": 3} in report["incomplete"]  # shard 3: not ok, incomplete


def test_a_decode_error_names_shard_and_key(toy_shards, tmp_path):
    from pipeline.data.images import decode_error

    m = _copy_train(toy_shards, tmp_path)
    items = [(i, data, label) for i, _, data, label in m.iter_shard(1)][:8]
    assert decode_error(m.shard_path(1), items, m.key_width) is None
    items[5] = (items[5][0], items[5][1][:60], items[5][2])
    err = decode_error(m.shard_path(1), items, m.key_width)
    assert isinstance(err, ShardError) and str(err).startswith(f"{m.shard_path(1)}: key 000069: image does not decode")


@pytest.mark.parametrize("backend", ["per_sample", "batched"])
def test_the_loader_names_shard_and_key_of_an_image_that_does_not_decode(tmp_path, backend):
    from pipeline.data import sources
    from pipeline.replay.loader import ViewLoader
    from pipeline.data.shard_writer import write_shards
    from pipeline.replay.view_params import AugmentConfig

    good = list(sources.toy(0, 32, "train"))
    good[9] = (good[9][0][:50], "png", good[9][2])  # the manifest is right: only a decode can tell
    write_shards(good, tmp_path / "train", shard_size=32, num_classes=10, class_names=sources.TOY_CLASSES,
                 source={"name": "t"})
    loader = ViewLoader(tmp_path / "train", AugmentConfig(image_size=32), run_seed=0, batch_size=32, backend=backend)
    with pytest.raises(ShardError, match=rf"{tmp_path / 'train' / 'shard-00000.tar'}: key 000009"):
        list(loader.units([(0, 0)]))


# ------------------------------------------------------------------------------------------- make_shards input
def _jpeg(seed: int, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tree(root: Path, empty: str | None = None) -> Path:
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True)
            for j in range(3 if split == "train" else 1):
                (d / f"{j}.jpg").write_bytes(_jpeg(10 * c + j))
    if empty:
        (root / "train" / empty).mkdir()
    return root


@pytest.mark.slow
def test_make_shards_refuses_a_truncated_image_by_path_and_installs_nothing(tmp_path):
    from pipeline.data.images import check_decodes

    tree = _tree(tmp_path / "tree")
    bad = tree / "val" / "dog" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:-200])
    check_decodes(bad.read_bytes(), str(bad))  # Pillow's verify() passes a truncated JPEG: only a decode tells
    with pytest.raises(ShardError, match="truncated"):
        check_decodes(bad.read_bytes(), str(bad), full=True)
    proc = run("make_shards", "data=folder", f"data.root={tree}", "data.num_classes=2", f"workdir={tmp_path}",
               "data.shard_size=4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"make_shards: error: {bad}: image does not decode" in proc.stderr
    out = tmp_path / "data" / "shards" / "tree"  # a folder data set is named after its root
    assert not out.exists() or not any(out.iterdir())  # train (read first, and fine) is not installed either


def test_sixteen_bit_and_float_images_render_like_their_8bit_versions(tmp_path):
    from pipeline.data import sources
    from pipeline.data.images import normalised
    from pipeline.replay.pixels import SourceImage

    grey = (np.add.outer(np.arange(24), np.arange(32)) * 5 % 256).astype(np.uint8)  # mean ~127
    d = tmp_path / "tree" / "train" / "grey"
    d.mkdir(parents=True)
    Image.fromarray(grey).save(d / "a8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(d / "b16.png")  # a 16-bit greyscale PNG
    assert Image.open(d / "b16.png").mode == "I;16"
    naive = np.asarray(Image.open(d / "b16.png").convert("RGB"))
    assert naive.mean() > 250  # what the replay would render from the 16-bit bytes as they are
    samples = [data for data, *_ in sources.folder(tmp_path / "tree", "train")]
    buf = io.BytesIO()
    Image.fromarray(grey.astype(np.float32) / 255.0).save(buf, format="TIFF")  # a float image (mode F) in [0, 1]
    data, ext = normalised(buf.getvalue(), "tif", "float.tif")
    assert ext == "png" and Image.open(io.BytesIO(data)).mode == "L"
    assert normalised(samples[0], "png", "a8.png") == (samples[0], "png")  # 8-bit bytes are kept as they are
    rendered = [SourceImage(data).decode()[0] for data in [*samples, data]]
    assert len(rendered) == 3
    for image in rendered:
        assert tuple(image.shape) == (3, 24, 32)
        assert np.array_equal(image[0].numpy(), grey), np.abs(image[0].numpy().astype(int) - grey).max()
        assert abs(float(image.float().mean()) - grey.mean()) < 0.5 and 120 < grey.mean() < 135


def test_an_empty_class_folder_is_refused_by_name_unless_allowed(tmp_path):
    from pipeline.data import sources

    tree = _tree(tmp_path / "tree", empty="eel")
    with pytest.raises(ShardError, match=rf"{tree / 'train' / 'eel'}: class folder holds no images.*"
                                         r"data.allow_empty_classes=true"):
        sources.folder(tree, "train")
    s = sources.folder(tree, "train", allow_empty_classes=True)
    assert s.class_names == ["cat", "dog", "eel"] and len(s) == 6
    cfg = validate(make_cfg(["data=folder", f"data.root={tree}", "data.num_classes=3",
                             "data.allow_empty_classes=true"]))
    assert len(sources.from_config(cfg.data, "train")) == 6
    cfg = validate(make_cfg(["data=imagenet", f"data.root={tree}"]))
    assert cfg.data.allow_empty_classes is False
