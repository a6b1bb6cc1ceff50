"""`data.max_side`: images larger than the cap are re-encoded once at ingest; the rest keep their bytes."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline.data.shards import load_manifest
from pipeline.replay.pixels import decode, open_image

REPO = Path(__file__).resolve().parents[1]


def _save(arr, path, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Real photos (scikit-image): a 600x400 and a 512x512 JPEG, a 451x300 PNG, and a 200x133 JPEG under the cap."""
    root = tmp_path_factory.mktemp("photos")
    small = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((200, 133)))
    inputs = {("a", "coffee.jpg"): (skimage.data.coffee(), "JPEG"), ("a", "small.jpg"): (small, "JPEG"),
              ("b", "astronaut.jpg"): (skimage.data.astronaut(), "JPEG"), ("b", "chelsea.png"): (skimage.data.chelsea(), "PNG")}
    originals = {}
    for split in ("train", "val"):
        for (cls, name), (arr, fmt) in inputs.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            originals[name] = _save(arr, root / split / cls / name, fmt)
    return root, originals


def _make_shards(work, root, *extra):
    return subprocess.run([sys.executable, "-m", "pipeline.make_shards", "data=folder", f"data.root={root}",
                           "data.num_classes=2", "data.shard_size=4", f"workdir={work}", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def _images(split_dir):
    m = load_manifest(split_dir)
    return m, [(data, key) for k in range(m.num_shards) for _, key, data, _ in m.iter_shard(k)]


@pytest.mark.slow
def test_max_side_caps_large_images_and_keeps_small_ones(tree, tmp_path):
    root, originals = tree
    assert _make_shards(tmp_path / "full", root).returncode == 0
    r = _make_shards(tmp_path / "cap", root, "data.max_side=256", "data.max_side_quality=85")
    assert r.returncode == 0, r.stderr
    full, full_images = _images(tmp_path / "full" / "data" / "shards" / root.name / "train")
    cap, cap_images = _images(tmp_path / "cap" / "data" / "shards" / root.name / "train")
    assert cap.source["max_side"] == 256 and cap.source["max_side_quality"] == 85
    assert cap.fingerprint != full.fingerprint   # a capped set is another shard set: a cache of it is another cache
    by_bytes = {v: k for k, v in originals.items()}
    sizes = {}
    for (orig, key), (data, _) in zip(full_images, cap_images):
        name = by_bytes[orig]
        with Image.open(io.BytesIO(data)) as im:
            sizes[name] = (im.format, im.size)
        if name == "small.jpg":
            assert data == orig          # within the cap: the very bytes
        else:
            assert data != orig
        pixels, _ = decode(open_image(data))   # the replay decodes what was stored
        assert max(pixels.shape[1:]) <= 256
    assert sizes == {"coffee.jpg": ("JPEG", (256, 171)), "astronaut.jpg": ("JPEG", (256, 256)),
                     "chelsea.png": ("PNG", (256, 170)), "small.jpg": ("JPEG", (200, 133))}
    # The cap is a resize, not a different picture: the capped coffee equals a LANCZOS downscale up to JPEG q85.
    coffee = next(d for (o, _), (d, _) in zip(full_images, cap_images) if by_bytes[o] == "coffee.jpg")
    ref = np.asarray(Image.open(io.BytesIO(originals["coffee.jpg"])).convert("RGB").resize((256, 171), Image.LANCZOS))
    got = np.asarray(Image.open(io.BytesIO(coffee)).convert("RGB"))
    assert np.abs(got.astype(int) - ref).mean() < 5          # JPEG q85 at 256 px: ~3.8 levels measured
    assert np.abs(got.astype(int) - ref[:, ::-1]).mean() > 20  # while another picture is far off


@pytest.mark.parametrize("override, key", [("data.max_side=8", "data.max_side"),
                                           ("data.max_side_quality=101", "data.max_side_quality")])
def test_max_side_bad_values_named(tree, tmp_path, override, key):
    r = _make_shards(tmp_path, tree[0], "data.max_side=256", override)
    assert r.returncode == 2 and key in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists()
