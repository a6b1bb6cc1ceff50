"""What the code does, read from the code itself, for the recipe card (pipeline.train.recipe_card).

Each probe runs or parses the real function it describes, never a restatement of it: the optimiser and the LR
schedule are the ones pipeline/train/loop.py's make_optimizer and make_scheduler build for the run's train.* (on
a meta-device student: no memory, no weights), mixing is `block_mixes` on a block under several seed indices, RandAugment's resampling is a rotation rendered by `pixels.apply` compared with both
filters, the eval rule is the DeiT student's own forward, the learning rate is student_run.py's own expression.
"""

from __future__ import annotations

import ast
import inspect

import torch
import torchvision.transforms.v2.functional as F
from omegaconf import OmegaConf


def calls(module, callee: str) -> list[tuple[list, dict]]:
    """(positional, keyword) arguments of every call to ``callee`` in ``module``'s source, in source order:
    literals as values, anything else as its source text."""
    found = []
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == callee:
            found.append((node.lineno, [_literal(a) for a in node.args],
                          {k.arg: _literal(k.value) for k in node.keywords if k.arg is not None}))
    return [(args, kw) for _, args, kw in sorted(found, key=lambda f: f[0])]


def call_arguments(module, callee: str) -> tuple[list, dict] | None:
    """The first call's arguments (see `calls`), or None when there is none."""
    found = calls(module, callee)
    return found[0] if found else None


def student_lr(train_cfg, global_batch: int) -> tuple[str, float | None]:
    """(expression, value) of the student's learning rate as pipeline/train/student_run.py computes it from train.lr and
    the global batch: the expression is evaluated on them; (expression or 'not found', None) if it reads more."""
    from pipeline.train import student_run

    student = [args for args, _ in calls(student_run, "loop_config") if len(args) > 2 and args[1] == "train"]
    if not student:
        return "not found in pipeline/train/student_run.py", None
    expr = student[0][2]
    try:
        value = eval(expr, {"__builtins__": {}, "float": float, "int": int},  # our own source; other names raise
                     {"tr": train_cfg, "global_batch": int(global_batch)})
    except Exception:  # noqa: BLE001 - an expression over other names: shown, not evaluated
        return expr, None
    return expr, float(value)


def _literal(node: ast.AST):
    return node.value if isinstance(node, ast.Constant) else ast.unparse(node)


def meta_student(cfg):
    """The run's student as `create_student` builds it, on the meta device (shapes only: no memory, no init)."""
    from pipeline.models.student import create_student

    with torch.device("meta"):
        return create_student(cfg.student, int(cfg.data.num_classes))


def dropout(model) -> float:
    """The largest dropout probability in ``model`` (0.0 without dropout layers)."""
    return max((float(m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)), default=0.0)


def loop_config(cfg):
    """The student's LoopConfig as pipeline/train/student_run.py builds it from train.* (lr 1.0: only its groups and
    schedule shape are probed)."""
    from pathlib import Path

    from pipeline.train.run_setup import loop_config as build

    return build(cfg.train, "train", 1.0, Path("."))


def optimizer(cfg, model) -> dict:
    """The student's optimiser as the loop builds it for ``model`` (pipeline.train.loop.make_optimizer): {name,
    type, eps, betas, no_decay (token parameters without weight decay)}."""
    from pipeline.train import loop

    found = call_arguments(loop, "create_optimizer_v2")
    if found is None or len(found[0]) < 2:
        return {"name": "not found in pipeline/train/loop.py"}
    opt = loop.make_optimizer(model, loop_config(cfg))
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = sorted(names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]
                      if "." not in names[id(p)])
    return {"name": found[0][1], "type": type(opt).__name__, "eps": opt.defaults.get("eps"),
            "betas": tuple(opt.defaults.get("betas", ())), "no_decay": no_decay}


def scheduler(cfg) -> dict:
    """The loop's LR scheduler for this run (pipeline.train.loop.make_scheduler): {class, per_update}."""
    from pipeline.train import loop

    cfg_loop = loop_config(cfg)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = loop.make_scheduler(opt, cfg_loop, [1] * cfg_loop.epochs)
    return {"class": type(sched).__name__, "per_update": not sched.t_in_epochs}


def mixing(aug, seeds: int = 8) -> dict:
    """How `block_mixes` pairs one block, over ``seeds`` seed indices: {block, matching (every position paired
    with another, both ways), draws (the most distinct mode/lambda/box draws in one block), partners (distinct
    pairings seen)}."""
    from pipeline.replay.mixing import block_mixes

    n = int(aug.mix_block)
    matching, draws, pairings = True, 0, set()
    for s in range(seeds):
        partner, mixes = block_mixes([(i,) for i in range(n)], run_seed=0, seed_index=s, cfg=aug)
        matching &= all(partner[partner[a]] == a and (partner[a] != a or n % 2) for a in range(n))
        draws = max(draws, len({repr(sorted(m.items())) for m in mixes if m is not None}))
        pairings.add(tuple(partner))
    return {"block": n, "matching": matching, "draws": draws, "partners": len(pairings)}


def rand_augment_filter(aug) -> str:
    """The filter `pixels.apply` rotates with under RandAugment: bilinear, bicubic, or 'other'. The view is the
    whole source at its own size, so the crop's resize leaves it as it is (either filter)."""
    from pipeline.replay import pixels

    size = 48
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = {"src": [size, size], "crop": [0, 0, size, size], "flip": False, "ra": [["Rotate", 17.0]],
              "erase": None}
    out = pixels.apply(image, params, type(aug)(image_size=size, rand_augment=None, interpolation=aug.interpolation))
    if torch.equal(out, F.rotate(image, 17.0, interpolation=F.InterpolationMode.BILINEAR, fill=pixels.FILL)):
        return "bilinear"
    # torchvision's tensor rotate refuses bicubic; pixels' own bicubic Rotate is checked against it elsewhere
    # (tests/test_replay.py, tests/test_batched.py)
    return "bicubic" if torch.equal(out, pixels.apply_op_image(image, "Rotate", 17.0, "bicubic")) else "other"


def erase_noise() -> str:
    """The noise `pixels.erase_fill` puts in an erased box."""
    from pipeline.replay.pixels import erase_fill

    noise = erase_fill(0, (3, 64, 64))
    if noise.dtype == torch.uint8:
        return f"per-pixel uniform uint8 noise ({int(noise.min())}..{int(noise.max())})"
    return f"per-pixel {noise.dtype} noise"


def eval_rule(cfg) -> str:
    """What the DeiT student returns in eval mode: 'average of both heads', 'class head', or 'other'."""
    from pipeline.models.student import create_student, heads

    tiny = OmegaConf.create({"name": str(cfg.student.name), "img_size": 32, "patch_size": 8, "drop_path": 0.0,
                             "kwargs": {"depth": 1}})
    torch.manual_seed(0)
    model = create_student(tiny, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        cls, dist = heads(model, x)
    if torch.allclose(out, (cls + dist) / 2, atol=1e-6):
        return "average of both heads"
    return "class head" if torch.allclose(out, cls, atol=1e-6) else "other"


def pool_blocks() -> int:
    """Blocks of consecutive samples the loader's shuffle pool holds (pipeline.replay.loader.ViewLoader)."""
    from pipeline.replay.loader import ViewLoader

    return int(inspect.signature(ViewLoader).parameters["pool_blocks"].default)
