"""bench/bench_decode.py --quick end to end (a few seconds): the JSON has every section, and every decoder that is
installed decodes the same pixels as Pillow. Numbers are checked for consistency, never for speed.

Tolerance: a full-size decode may differ from Pillow's by at most bench_decode.FULL_TOL (2) levels per channel and
0.05 on average (libjpeg-turbo builds of different versions could round a few pixels differently; today's
Pillow 3.2 / torchvision 3.1 / simplejpeg 3.1 / system 2.1 builds agree bit for bit). Scaled decodes must match
Pillow's draft within the same tolerance, and the crop-then-decode must equal the same library's full decode
exactly (its region keeps the chroma-upsampling context), so it never changes a view. The same holds on 4:4:4,
4:2:2, progressive and greyscale JPEGs."""

import json

import pytest
import torch

from bench import bench_decode, decode_levers

# torchvision 0.29 warns on every torchvision.io decode (deprecated for TorchCodec); the pipeline's path uses it
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def test_bench_decode_quick(tmp_path, capsys):
    out = tmp_path / "bench_decode.json"
    threads = torch.get_num_threads()
    try:  # in-process (the bench's module is imported anyway): saves a second torch start-up
        bench_decode.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "JPEG decode levers" in printed and "Pre-resized" in printed
    res = json.loads(out.read_text())

    assert {"config", "env", "decoders", "sources", "rows", "pixel_diff", "capped_quality",
            "replica_matches_pipeline", "wall_s"} <= set(res)
    assert res["config"]["quick"] and res["config"]["image_size"] == 224
    for k in ("pillow", "torchvision", "pillow_libjpeg_turbo", "simplejpeg", "pyturbojpeg"):
        assert k in res["env"]
    decoders = [d for d, ok in res["decoders"].items() if ok]
    assert {"current", "pil_full", "pil_draft", "tv_full"} <= set(decoders)

    rows = res["rows"]
    for src in ("500x375", "1000x750"):
        for stage in ("decode", "render"):
            for d in decoders:
                row = rows[f"{stage}:{d}@{src}"]
                assert row["img_per_s_median"] > 0 and len(row["img_per_s_rounds"]) == res["config"]["rounds"]
            assert rows[f"{stage}:current@{src}"]["ratio_to_current"] == 1.0
    for cap in bench_decode.CAPS:
        assert rows[f"render:current@cap{cap}"]["ratio_to_current_1000x750"] > 0
        q = res["capped_quality"][f"cap{cap}"]
        assert 0 <= q["upsampled_fraction"] <= 1 and q["mean_abs"] >= 0
    assert res["capped_quality"]["cap256"]["upsampled_fraction"] == 1.0  # 256x192: short side < 224

    px = res["pixel_diff"]
    full = px["full_vs_pillow"]
    for d in ("tv_full", "sj_full", "tj_full"):
        if res["decoders"][d]:
            assert full[d]["max_abs"] <= bench_decode.FULL_TOL and full[d]["mean_abs"] <= 0.05, (d, full[d])
    for d, per in px["scaled_vs_pillow_draft"].items():
        assert set(per) == {"1/2", "1/4", "1/8"}
        for scale, v in per.items():
            assert v["max_abs"] <= bench_decode.FULL_TOL and v["mean_abs"] <= 0.05, (d, scale, v)
    for src, c in px["crop_decode_vs_full_scaled"].items():
        if c:
            assert c["mismatching_crops"] == 0 and c["max_abs"] == 0, (src, c)
    assert set(px["other_flavours"]) == {"4:4:4", "4:2:2", "progressive 4:2:0", "greyscale"}
    for flavour, per_dec in px["other_flavours"].items():
        for d, per in per_dec.items():
            for scale, v in per.items():
                if d == "tj_crop_mismatching_crops":
                    assert v == 0, (flavour, scale)
                else:  # [max_abs, mean_abs]; a string would be a decoder that refused the flavour
                    assert v[0] <= bench_decode.FULL_TOL and v[1] <= 0.05, (flavour, d, scale, v)
    for src, per in px["views_vs_current"].items():  # the same 1/d as current: the very same views
        for d in ("pil_draft", "sj_scaled", "tj_scaled", "tj_crop"):
            if d in per:
                assert per[d]["max_abs"] <= bench_decode.FULL_TOL, (src, d, per[d])
    if res["replica_matches_pipeline"]["matches"] is not None:  # pipeline importable: our mirror is its path
        assert res["replica_matches_pipeline"]["matches"]


def test_scale_rule_is_pillows():
    """draft_denom is Pillow's own choice (Plan asserts it against Image.draft) for every scale."""
    import io

    import numpy as np
    from PIL import Image

    for wh in ((1000, 750), (2000, 1500)):
        g = np.add.outer(np.arange(wh[1]) % 256, np.arange(wh[0]) % 256).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(np.stack([g, g, 255 - g], -1)).save(buf, "JPEG")
        boxes = decode_levers.sample_boxes(32, wh) + [[0, 0, wh[1], wh[1]], [0, 0, 447, 447], [0, 0, 448, 448]]
        plans = decode_levers.make_plans([buf.getvalue()] * len(boxes), boxes)
        assert {p.d for p in plans} <= {1, 2, 4, 8} and max(p.d for p in plans) == (2 if wh[0] == 1000 else 4)
    assert decode_levers.draft_denom([0, 0, 447, 447], (1000, 750)) == 1
    assert decode_levers.draft_denom([0, 0, 448, 448], (1000, 750)) == 2
    assert decode_levers.draft_denom([0, 0, 1500, 1500], (2000, 1500)) == 4
