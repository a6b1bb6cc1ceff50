"""Stage one renders a group of seed indices per decode: grouped views are the per-seed views bit for
bit, a grouped build writes the very store a per-seed build writes, and a half-done grouped build resumes.

Small on purpose (2 shared cores): 128 toy samples in 4 shards, S = 3, a seeded random regnety_002 at 32 px.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import zarr
from hydra import compose, initialize_config_dir
from PIL import Image

from pipeline.cache.builder import build_cache, group_units
from pipeline.cache.store import CacheStore
from pipeline.data import shard_writer, sources
from pipeline.replay.loader import ViewLoader
from pipeline.replay import pixels
from pipeline.replay.view_params import AugmentConfig
from pipeline.replay.views import block_views, group_views
from toy_data import write_toy

REPO = Path(__file__).resolve().parents[1]
SEEDS = 3


# ------------------------------------------------------------------------------------------- views


def _photos(size: tuple[int, int], n: int) -> list[bytes]:
    """n JPEGs (q 90) of scikit-image photos resized to `size` (w, h), each rotated a little (distinct bytes)."""
    from skimage import data

    base = [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")]
    out = []
    for i in range(n):
        img = Image.fromarray(base[i % len(base)]).convert("RGB").resize(size).rotate(5 * i)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = pixels.decode_drafted

    def counted(img, scale):
        calls.append(scale)
        return real(img, scale)

    monkeypatch.setattr(pixels, "decode_drafted", counted)
    return calls


@pytest.mark.parametrize("size,out", [((500, 375), 224), ((1000, 750), 112), ((500, 375), 64)],
                         ids=["500x375@224", "1000x750@112", "500x375@64"])
def test_grouped_views_bit_identical_to_per_seed(size, out, count_decodes):
    """Every view (pixels, target, digest, params) equals the one rendered for its seed alone, and equals the
    pre-grouping path (pixels.render on a fresh lazy image); each image is decoded once per distinct scale."""
    cfg = AugmentConfig(image_size=out)
    items = [(100 + i, data, i % 10) for i, data in enumerate(_photos(size, 8))]
    seeds = [0, 3, 5, 6]
    grouped = list(group_views(items, run_seed=1, seed_indices=seeds, cfg=cfg, num_classes=10))
    decodes_grouped = list(count_decodes)
    count_decodes.clear()
    alone = [block_views(items, run_seed=1, seed_index=s, cfg=cfg, num_classes=10) for s in seeds]
    assert len(count_decodes) == len(seeds) * len(items)  # per seed: one decode per view, as before
    for s, g_views, a_views in zip(seeds, grouped, alone):
        for g, a, (_, data, _) in zip(g_views, a_views, items):
            assert g["digest"] == a["digest"] and g["params"] == a["params"] and g["mix"] == a["mix"], s
            assert torch.equal(g["image"], a["image"]) and torch.equal(g["target"], a["target"]), s
            legacy = pixels.render(pixels.open_image(data), g["params"], cfg)
            if g["mix"] is None:
                assert torch.equal(g["image"], legacy)
    # One decode per distinct scale per image: at 224 from 500x375 no crop allows a reduced scale (one decode
    # per image for all four seeds); at 64 px crops pick 1/2, 1/4 or full size, each decoded once.
    scales_per_image = [{_scale(it, v["params"], cfg) for v in (views[a] for views in grouped)}
                        for a, it in enumerate(items)]
    assert len(decodes_grouped) == sum(len(s) for s in scales_per_image)
    if out == 224:
        assert len(decodes_grouped) == len(items)
    else:
        assert len(decodes_grouped) < len(seeds) * len(items)


def _scale(item, params, cfg) -> float:
    return pixels.draft(pixels.open_image(item[1]), params, cfg.image_size)


def test_grouped_eval_and_png_views_identical():
    """PNG sources (toy) and eval views go through the same shared decode."""
    cfg = AugmentConfig(image_size=32)
    items = [(i, data, label) for i, (data, _, label) in enumerate(sources.toy(0, 40, "train"))]
    for train in (True, False):
        grouped = list(group_views(items, run_seed=0, seed_indices=[2, 0], cfg=cfg, num_classes=10, train=train))
        for s, g_views in zip([2, 0], grouped):
            a_views = block_views(items, run_seed=0, seed_index=s, cfg=cfg, num_classes=10, train=train)
            assert [g["digest"] for g in g_views] == [a["digest"] for a in a_views]
            assert all(torch.equal(g["image"], a["image"]) for g, a in zip(g_views, a_views))


# ------------------------------------------------------------------------------------------- units


def test_group_units_cover_pending_chunks_once():
    pending = [(s, k) for s in range(5) for k in range(3) if (s, k) not in {(1, 0), (4, 2), (3, 1)}]
    assert group_units(pending, 5, None) == [((0, 2, 3, 4), 0), ((0, 1, 2, 4), 1), ((0, 1, 2, 3), 2)]
    two = group_units(pending, 5, 2)
    assert two == [((0,), 0), ((0, 1), 1), ((0, 1), 2), ((2, 3), 0), ((2,), 1), ((2, 3), 2), ((4,), 0),
                   ((4,), 1)]
    for g in (None, 1, 2, 3, 5, 8):
        units = group_units(pending, 5, g)
        for world in (1, 2, 3):  # torchrun: work units round-robin over ranks; every chunk on exactly one rank
            chunks = [(s, k) for r in range(world) for seeds, k in units[r::world] for s in seeds]
            assert sorted(chunks) == sorted(pending)
    assert group_units(pending, 5, 1) == [((s,), k) for s, k in sorted(pending)]  # per seed: one seed index a unit
    with pytest.raises(ValueError, match="seeds_per_pass"):
        group_units(pending, 5, 0)


def test_loader_units_grouped_equal_per_seed(tmp_path):
    """Stage one's batches: a grouped unit yields exactly the (seed, sample) views of its per-seed units."""
    root = tmp_path / "data"
    src = sources.toy(3, 96, "train")
    shard_writer.write_shards(src, root / "train", shard_size=48, num_classes=10, class_names=src.class_names,
                        source=src.source)
    loader = ViewLoader(root / "train", AugmentConfig(image_size=32), run_seed=0, batch_size=40)

    def views(units):
        out = {}
        for b in loader.units(units):
            for j, (s, i) in enumerate(zip(b["seed"].tolist(), b["index"].tolist())):
                assert (s, i) not in out
                out[(s, i)] = (int(b["digest"][j]), b["image"][j])
        return out

    grouped = views([((0, 1, 2), 0), ((1, 2), 1)])
    single = views([(0, 0), (1, 0), (2, 0), (1, 1), (2, 1)])
    assert grouped.keys() == single.keys() and len(grouped) == 5 * 48
    for key, (digest, image) in single.items():
        assert grouped[key][0] == digest and torch.equal(grouped[key][1], image), key


# ------------------------------------------------------------------------------------------- stores


def make_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "pipeline" / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grouped")
    write_toy(tmp / "data", 128, 32, shard_size=32)
    torch.manual_seed(0)
    teacher = tmp / "teacher.pt"
    torch.save(timm.create_model("regnety_002", num_classes=10).state_dict(), teacher)

    def cfg(store, *extra):
        return make_cfg(["teacher=regnety_002", "augment=deit", f"workdir={tmp}", f"data.shards={tmp / 'data'}",
                         f"teacher.checkpoint={teacher}", "teacher.input_size=32", f"cache.path={store}",
                         f"cache.num_seeds={SEEDS}", "cache.batch_size=64", "cache.num_workers=0", "num_threads=1",
                         *extra])

    per_seed = tmp / "per_seed.zarr"
    summary = build_cache(cfg(per_seed, "cache.seeds_per_pass=1"))
    assert summary["units_computed"] == SEEDS * 4 and summary["views_written"] == SEEDS * 128
    return tmp, cfg, per_seed


def _arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(arr[...]) for name, arr in group.arrays()}


def _assert_same_store(a, b):
    x, y = _arrays(a), _arrays(b)
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].dtype == y[name].dtype and np.array_equal(x[name], y[name]), name
    assert dict(zarr.open_group(str(a), mode="r").attrs) == dict(zarr.open_group(str(b), mode="r").attrs)


@pytest.mark.parametrize("seeds_per_pass", ["null", "2"])
def test_grouped_build_equals_per_seed_build(env, seeds_per_pass):
    tmp, cfg, per_seed = env
    store = tmp / f"grouped-{seeds_per_pass}.zarr"
    summary = build_cache(cfg(store, f"cache.seeds_per_pass={seeds_per_pass}"))
    assert summary["units_computed"] == SEEDS * 4 and summary["units_skipped"] == 0
    assert summary["views_written"] == SEEDS * 128
    assert CacheStore.open(store).pending_units() == []
    _assert_same_store(store, per_seed)


def test_half_done_grouped_build_resumes_only_pending_chunks(env):
    """A grouped build killed midway leaves some (seed, shard) chunks done: the re-run renders only the pending
    seeds of each shard (its units hold fewer seeds) and ends with the per-seed store."""
    tmp, cfg, per_seed = env
    store = tmp / "half.zarr"
    shutil.copytree(per_seed, store)
    pending = [(0, 1), (2, 1), (1, 3), (2, 0)]
    done = zarr.open_array(str(store / "done"), mode="r+")
    for s, k in pending:  # what a kill leaves: marker cleared first, then garbage in the chunk
        done[s, k] = False
        zarr.open_array(str(store / "argmax"), mode="r+")[s, k * 32:(k + 1) * 32] = 7
        zarr.open_array(str(store / "digest"), mode="r+")[s, k * 32:(k + 1) * 32] = 0
    summary = build_cache(cfg(store))
    assert summary["units_computed"] == len(pending) and summary["units_skipped"] == SEEDS * 4 - len(pending)
    assert summary["views_written"] == len(pending) * 32
    _assert_same_store(store, per_seed)
