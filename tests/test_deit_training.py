"""DeiT's training keys: train.lr_step (cosine stepped per epoch), train.decay_dist_token, augment.mix_pairing.

Under the DeiT recipe (pipeline/conf/train/deit.yaml, pipeline/conf/augment/deit.yaml) they do what DeiT does; under the toy recipe
they keep the toy's behaviour bit for bit: the toy's augment hash, views, loss trajectory and weights are pinned
below at their values from before the keys existed (measured on x86_64, 2 cores, no GPU, torch 1 thread).
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf.errors import ValidationError

from pipeline.config import validate
from pipeline.replay.view_params import augment_config
from pipeline.errors import ConfigError
from pipeline.replay import batched
from pipeline.replay.mixing import block_mixes
from pipeline.replay.view_params import AugmentConfig
from pipeline.replay.views import block_views
from pipeline.train.loop import LoopConfig, make_optimizer
from pipeline.train.student_run import train_student

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "pipeline" / "conf"

# The toy recipe before these keys existed (commit b2eba3a): augment hash, sha256 of a block's views (images,
# targets, digests) under seed indices 0 and 1, and the first run below (losses of its 8 updates, weights).
TOY_AUGMENT_HASH = "96381bf6b881bb81"
TOY_VIEWS_SHA = "6d6bb8af797f77df"
TOY_LOSSES = [2.2915788, 2.3131511, 2.3322916, 2.3606346, 2.3044174, 2.0923626, 2.2427008, 2.3626413]
TOY_WEIGHTS_SHA = "9d9d3275ac33d05f"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_cfg(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """128 toy train samples in 2 shards, 32 val."""
    from pipeline.data import shard_writer as writer, sources

    root = tmp_path_factory.mktemp("deit_shards")
    for split, n in (("train", 128), ("val", 32)):
        src = sources.toy(0, n, split)
        writer.write_shards(src, root / split, shard_size=64, num_classes=len(src.class_names),
                            class_names=src.class_names, source=src.source)
    return root


def train(root: Path, out: Path, *extra, crash_at=None):
    """A stage-two run without a teacher (distill=none); returns (metrics, [(epoch, step, lr, loss)])."""
    steps = []

    def on_step(info):
        if crash_at == (info["epoch"], info["step"]):
            raise KeyboardInterrupt("crash")
        steps.append((info["epoch"], info["step"], info["lr"], info["loss"]))

    cfg = make_cfg([f"workdir={root}", f"data.shards={root}", "distill=none", "train.batch_size=16",
                    "train.max_steps_per_epoch=4", "train.num_workers=0", "num_threads=1", f"train.out_dir={out}",
                    "train.dvclive=false", *extra])
    return train_student(cfg, step_callback=on_step), steps


def by_epoch(steps) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for epoch, _, lr, _ in steps:
        out.setdefault(epoch, []).append(lr)
    return out


# ------------------------------------------------------------------------------------------------ toy pinned


def test_toy_recipe_is_bit_identical_to_before_the_keys(shards, tmp_path):
    cfg = validate(make_cfg())
    assert (cfg.train.lr_step, cfg.train.decay_dist_token, cfg.augment.mix_pairing) == ("update", False, "pair")
    aug = augment_config(cfg)
    assert aug.hash() == TOY_AUGMENT_HASH and "mix_pairing" not in aug.canonical()
    from pipeline.data.sources import toy

    items = [(100 + i, data, label) for i, (data, _e, label) in enumerate(toy(0, 32, "train"))]
    h = hashlib.sha256()
    for s in (0, 1):
        for v in block_views(items, run_seed=0, seed_index=s, cfg=aug, num_classes=10):
            h.update(v["image"].numpy().tobytes())
            h.update(v["target"].numpy().tobytes())
            h.update(str(v["digest"]).encode())
    assert h.hexdigest()[:16] == TOY_VIEWS_SHA

    _, steps = train(shards, tmp_path / "run", "train.epochs=2")
    assert [loss for *_, loss in steps] == pytest.approx(TOY_LOSSES, abs=1e-6)
    state = torch.load(tmp_path / "run" / "student.pt", map_location="cpu")
    weights = hashlib.sha256(b"".join(t.numpy().tobytes() for _, t in sorted(state.items()))).hexdigest()[:16]
    assert weights == TOY_WEIGHTS_SHA
    assert all(len(set(lrs)) == len(lrs) for lrs in by_epoch(steps).values())  # per update: a new lr every step


# ------------------------------------------------------------------------------------------------ lr stepping


def deit_epoch_lrs(base: float, epochs: int, warmup: float = 1.0, warmup_lr: float = 1e-6, min_lr: float = 1e-5):
    """The lr of each epoch under DeiT's main.py: the scheduler starts at warmup_lr and `step(e)` after epoch e
    sets the cosine's value at t = e (linear warmup below t = warmup) for epoch e + 1."""
    def at(t):
        if t < warmup:
            return warmup_lr + t * (base - warmup_lr) / warmup
        return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / epochs))
    return [warmup_lr] + [at(e) for e in range(epochs - 1)]


def test_lr_step_epoch_is_constant_within_each_epoch_as_deit(shards, tmp_path):
    metrics, steps = train(shards, tmp_path / "run", "train.epochs=4", "train.lr_step=epoch")
    want = deit_epoch_lrs(0.008 * 16 / 512, 4)  # train.lr x global batch / 512 (student_run.py)
    got = by_epoch(steps)
    assert sorted(got) == [0, 1, 2, 3]
    for epoch, lrs in got.items():
        assert len(lrs) == 4 and lrs == pytest.approx([want[epoch]] * 4, rel=1e-12), epoch
    assert [m["lr"] for m in metrics["history"]] == pytest.approx(want, rel=1e-12)


def test_lr_step_epoch_resumes_at_the_lr_of_an_uninterrupted_run(shards, tmp_path):
    _, whole = train(shards, tmp_path / "whole", "train.epochs=4", "train.lr_step=epoch", "train.val=false")
    with pytest.raises(KeyboardInterrupt):
        train(shards, tmp_path / "cut", "train.epochs=4", "train.lr_step=epoch", "train.val=false", crash_at=(2, 1))
    _, rest = train(shards, tmp_path / "cut", "train.epochs=4", "train.lr_step=epoch", "train.val=false")
    assert [s[0] for s in rest][0] == 2
    assert rest == whole[8:]  # epochs 2 and 3: same lr and loss at every step


def test_checkpoint_of_another_lr_step_is_refused(shards, tmp_path):
    from pipeline.errors import CheckpointError

    train(shards, tmp_path / "run", "train.epochs=2", "train.val=false")
    with pytest.raises(CheckpointError, match="lr_step"):
        train(shards, tmp_path / "run", "train.epochs=2", "train.val=false", "train.lr_step=epoch")


# ------------------------------------------------------------------------------------------------ weight decay


def _decay_by_name(model, opt) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}


def test_dist_token_decayed_only_with_decay_dist_token():
    from timm.optim import create_optimizer_v2

    from pipeline.models.student import create_student

    cfg = make_cfg()
    torch.manual_seed(0)
    model = create_student(cfg.student, 10)
    loop = dict(epochs=1, lr=1e-3, weight_decay=0.05, min_lr=0.0, warmup_epochs=0.0, warmup_lr=0.0, out_dir=Path())
    timm_way = _decay_by_name(model, make_optimizer(model, LoopConfig(**loop)))
    deit_way = _decay_by_name(model, make_optimizer(model, LoopConfig(**loop, decay_dist_token=True)))
    # Off (the toy): timm's own groups, unchanged.
    assert timm_way == _decay_by_name(model, create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05))
    assert timm_way["dist_token"] == 0.0 and deit_way["dist_token"] == 0.05
    assert deit_way["cls_token"] == deit_way["pos_embed"] == 0.0
    assert {k: v for k, v in deit_way.items() if k != "dist_token"} == {k: v for k, v in timm_way.items()
                                                                        if k != "dist_token"}
    # The decay is real: one AdamW step on zero gradients shrinks the decayed token by lr x wd, nothing else.
    for decay, factor in ((False, 1.0), (True, 1 - 1e-3 * 0.05)):
        opt = make_optimizer(model, LoopConfig(**loop, decay_dist_token=decay))
        before = model.dist_token.detach().clone()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        assert torch.allclose(model.dist_token.detach(), before * factor, rtol=0, atol=1e-9)


def test_deit_recipe_sets_the_keys():
    cfg = validate(make_cfg(["data=imagenet", "data.root=/x", "teacher=regnety_160", "student=deit_small",
                             "train=deit", "augment=deit"]))
    assert (cfg.train.lr_step, cfg.train.decay_dist_token, cfg.augment.mix_pairing) == ("epoch", True, "block")
    assert cfg.teacher.train.lr_step == "update"


# ------------------------------------------------------------------------------------------------ mixup pairing


def deit_augment(size: int = 32, **changes) -> AugmentConfig:
    d = yaml.safe_load((CONF / "augment" / "deit.yaml").read_text())
    return AugmentConfig.from_cfg({**d, **changes}, size)


def test_block_pairing_one_draw_per_block_partners_a_matching():
    cfg = deit_augment()
    assert cfg.mix_pairing == "block"
    pairings, draws = set(), []
    for s in range(6):
        for first in (0, 32, 640):
            partner, mixes = block_mixes([(first + i,) for i in range(32)], run_seed=7, seed_index=s, cfg=cfg)
            assert sorted(partner) == list(range(32))
            assert all(partner[partner[a]] == a != partner[a] for a in range(32))  # a matching, both ways
            assert all(m == mixes[0] for m in mixes) and mixes[0] is not None  # one draw (mix_prob 1.0)
            pairings.add(tuple(partner))
            draws.append(mixes[0])
    assert len(pairings) == 18  # other partners at every seed index and block
    assert len({(d["mode"], d["lam"]) for d in draws}) == 18
    partner, mixes = block_mixes([(i,) for i in range(7)], run_seed=7, seed_index=0, cfg=cfg)
    alone = [a for a in range(7) if partner[a] == a]
    assert len(alone) == 1 and mixes[alone[0]] is None and len({repr(m) for m in mixes if m is not None}) == 1


def test_block_pairing_draw_follows_timm_mixup():
    cfg = deit_augment(mix_prob=0.5)
    blocks = [block_mixes([(32 * b + i,) for i in range(32)], run_seed=0, seed_index=0, cfg=cfg)[1]
              for b in range(2000)]
    assert all(all(m is None for m in ms) or all(m == ms[0] is not None for m in ms) for ms in blocks)
    mixed = [ms[0] for ms in blocks if ms[0] is not None]
    assert abs(len(mixed) / 2000 - 0.5) < 4 * math.sqrt(0.25 / 2000)  # mix_prob, per block
    cut = sum(m["mode"] == "cutmix" for m in mixed) / len(mixed)
    assert abs(cut - 0.5) < 4 * math.sqrt(0.25 / len(mixed))  # switch_prob
    lam = [m["lam"] for m in mixed if m["mode"] == "mixup"]
    assert abs(sum(lam) / len(lam) - 0.5) < 0.05  # Beta(0.8, 0.8)


def test_block_pairing_views_identical_in_both_backends():
    from pipeline.data.sources import toy

    items = [(100 + i, data, label) for i, (data, _e, label) in enumerate(toy(0, 32, "train"))]
    block, pair = deit_augment(), deit_augment(mix_pairing="pair")
    for s in (0, 3):
        kw = dict(run_seed=5, seed_index=s, num_classes=10)
        views = block_views(items, cfg=block, **kw)
        plan = batched.plan_block(items, cfg=block, **kw)
        assert plan["mix"] == [v["mix"] for v in views] and plan["digest"] == [v["digest"] for v in views]
        assert len({(v["mix"]["mode"], v["mix"]["lam"]) for v in views}) == 1
        assert torch.equal(plan["target"], torch.stack([v["target"] for v in views]))
        assert torch.equal(batched.render_plan(plan), torch.stack([v["image"] for v in views]))
        others = block_views(items, cfg=pair, **kw)
        assert [v["digest"] for v in views] != [v["digest"] for v in others]


def test_block_pairing_enters_the_augment_hash_and_pair_does_not():
    block, pair = deit_augment(), deit_augment(mix_pairing="pair")
    assert block.canonical()["mix_pairing"] == "block" and "mix_pairing" not in pair.canonical()
    assert block.hash() != pair.hash()  # a store of pair views is refused for block views (augment_hash)
    with pytest.raises(ValueError, match="augment.mix_pairing"):
        deit_augment(mix_pairing="batch")


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("override, key", [("augment.mix_pairing=batch", "augment.mix_pairing"),
                                           ("train.lr_step=step", "train.lr_step"),
                                           ("teacher.train.lr_step=step", "teacher.train.lr_step"),
                                           ("train.decay_dist_token=maybe", "train.decay_dist_token")])
def test_bad_values_are_one_line_exit_2(override, key):
    out = subprocess.run([sys.executable, "-m", "pipeline.params", override], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and out.stdout == "", out.stderr
    with pytest.raises((ConfigError, ValidationError), match=key.replace(".", r"\.")):  # cli: both one line
        validate(make_cfg([override]))
