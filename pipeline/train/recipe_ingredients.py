"""The ingredients of DeiT's recipe card (pipeline.train.recipe_card): DeiT's value and its source, how ours is
read, and why ours differs where it is known to.

Sources: `main.py:N` etc. are lines of facebookresearch/deit at commit 7e160fe (its argparse defaults are the
recipe, its README trains the distilled models with `--distillation-type hard --teacher-model regnety_160`);
"paper" is Touvron et al. 2021, "Training data-efficient image transformers & distillation through attention".
"""

from __future__ import annotations

from pipeline.train import recipe_probes as probe
from pipeline.train.recipe_card import DEIT_TEACHER_URL, Ingredient, Run

DEIT_STUDENTS = ("deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224",
                 "deit_base_distilled_patch16_224")
CODE_WORK = "code work (training code, not config)"
# Eval views of scikit-image's photos (224 px, crop_pct 0.875, bicubic, PNG) against DeiT's transform
# (torchvision Resize(256, bicubic) then CenterCrop(224) on the PIL image): (mean, max) |difference| in uint8
# levels; tests/test_recipe.py measures them again.
EVAL_GAP = {"astronaut 512x512": (0.01, 9), "coffee 400x600": (0.02, 13), "chelsea 300x451": (3.73, 48),
            "rocket 427x640": (2.07, 94)}


def _key(path: str):
    """ours = the config value at ``path`` (dotted), shown as ``path=value``."""
    def read(run: Run):
        from omegaconf import OmegaConf

        value = OmegaConf.select(run.cfg, path)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        return f"{path}={value}", value
    return read


def _teacher_weights(run: Run):
    t = run.cfg.teacher
    if t.pretrained:
        import timm

        pcfg = timm.models.get_pretrained_cfg(str(t.name))
        url = getattr(pcfg, "url", None) or getattr(pcfg, "hf_hub_id", None)
        return f"teacher.pretrained=true: timm's {t.name} = {url}", url
    if t.checkpoint:
        return f"teacher.checkpoint={t.checkpoint}", str(t.checkpoint)
    return "none: teacher.pretrained=false, teacher.checkpoint=null (random init)", None


def _teacher_input(run: Run):
    t, s = run.cfg.teacher, run.cfg.student
    size = int(t.input_size or run.cfg.data.image_size)
    norm = list(t.mean) == list(s.mean) and list(t.std) == list(s.std)
    return f"{size} px view, {'the student' if norm else 'its own'} mean/std", (size, norm)


def _student(run: Run):
    s = run.cfg.student
    kwargs = dict(s.kwargs or {})
    deit = str(s.name) in DEIT_STUDENTS and int(s.img_size) == 224 and int(s.patch_size) == 16 and not kwargs
    return f"{s.name}, {s.img_size} px, patch {s.patch_size}, kwargs {kwargs}", deit


def _lr(run: Run):
    expr, value = probe.student_lr(run.tr, run.global_batch)
    shown = f"{expr} = {value:g}" if value is not None else expr
    return (f"train.lr={float(run.tr.lr):g}, global_batch={run.global_batch}: {shown} (pipeline/train/student_run.py)",
            (float(run.tr.lr), value))


def _optimizer(run: Run):
    o = run.optimizer
    return f"{o['name']} ({o.get('type')}), pipeline/train/loop.py", o.get("type")


def _eps(run: Run):
    return f"{run.optimizer.get('eps')}", run.optimizer.get("eps")


def _betas(run: Run):
    return f"{run.optimizer.get('betas')}", run.optimizer.get("betas")


def _no_decay(run: Run):
    tokens = run.optimizer.get("no_decay", [])
    return (f"train.decay_dist_token={run.tr.decay_dist_token}: not decayed: biases, norms, {', '.join(tokens)}",
            "dist_token" in tokens)


def _schedule(run: Run):
    s = run.scheduler
    return f"timm {s['class']}", s["class"]


def _stepping(run: Run):
    per_update = run.scheduler["per_update"]
    shown = "every update (t_in_epochs=False)" if per_update else "once per epoch, at its end (t_in_epochs=True)"
    return f"train.lr_step={run.tr.lr_step}: {shown}", ("update" if per_update else "epoch")


def _pairing(run: Run):
    m, aug = run.mixing, run.aug
    who = "one draw per block" if m["draws"] <= 1 else f"up to {m['draws']} distinct draws in one block"
    shown = (f"augment.mix_pairing={aug.mix_pairing}: {'a random matching' if m['matching'] else 'other pairs'} "
             f"inside each block of {m['block']} consecutive samples (augment.mix_block), {m['partners']} distinct "
             f"pairings over 8 seed indices; {who} (switch, lambda, box)")
    return shown, ("random matching" if m["matching"] else "other", "per batch" if m["draws"] <= 1 else "per pair")


def _ra_filter(run: Run):
    name = probe.rand_augment_filter(run.aug)
    return f"{name} (pixels.apply, probed)", name


def _repeat_mode(run: Run) -> str:
    return str(run.tr.get("repeat_mode") or "local")


def _repeats(run: Run):
    r = int(run.tr.get("repeats") or 1)
    if _repeat_mode(run) == "ranks" and r > 1:
        ranks = min(r, run.world)
        return (f"train.repeats={r}, train.repeat_mode=ranks: {r} copies of each image in one step on {ranks} "
                f"rank(s), copy c of block t (epochs {r}t..{r}t+{r - 1}) under seed {r}t+c; epoch = N views "
                f"(pipeline/replay/deal.py)", (r, f"{ranks} ranks, epoch N, per block of {r} epochs"))
    return (f"train.repeats={r}: {r} view(s) per sample per epoch on one rank, epoch = {r} x N views",
            (r, "one rank, epoch r x N"))


def _fresh_views(run: Run):
    from pipeline.errors import ScheduleError
    from pipeline.train.schedule import plan_schedule

    c, tr = run.cfg.cache, run.tr
    r, ranks = int(tr.get("repeats") or 1), _repeat_mode(run) == "ranks"
    try:
        plan = plan_schedule(int(tr.epochs), int(c.num_seeds), tr.seed_schedule, bool(c.cycle), repeats=r,
                             repeat_mode=_repeat_mode(run))
    except ScheduleError as exc:
        return f"refused: {exc}", False
    if ranks and r > 1:  # the epochs of a block share its seeds, each drawing other images: one entry per block
        plan = plan[::r]
    flat = [s for e in plan for s in (e if isinstance(e, list) else [e])]
    fresh = len(set(flat)) == len(flat)
    reads = len(flat) / len(set(flat))
    per = f"in blocks of {r} epochs sharing {r} seeds" if ranks and r > 1 else f"x {r}"
    return (f"cache.num_seeds={c.num_seeds} for {tr.epochs} epochs {per}: {len(set(flat))} distinct seeds, "
            f"each view read {'once' if fresh else f'{reads:.3g} times'}"), fresh


def _order(run: Run):
    if _repeat_mode(run) == "ranks":
        return (f"a permutation per block of epochs: shards shuffled, windows of {probe.pool_blocks()} mixup blocks "
                f"shuffled, samples shuffled inside a window (pipeline/replay/deal.py)", "shard-local")
    return (f"each rank reads whole shards; blocks shuffled in a pool of {probe.pool_blocks()} blocks",
            "shard-local")


def _eval(run: Run):
    pct, interp = float(run.cfg.data.crop_pct), str(run.aug.interpolation)
    return (f"data.crop_pct={pct}, augment.interpolation={interp}: the centre box (shorter side x {pct}) resized "
            f"once (pipeline/replay/view_params.py eval_params)", (pct, interp, "one box resize"))


def _ema(run: Run):
    from pipeline.train.student_run import STUDENT, STUDENT_EMA

    shown = (f"train.ema={run.tr.ema}, decay {run.tr.ema_decay}; reported: {STUDENT} (val_acc), EMA kept "
             f"in {STUDENT_EMA} (val_ema_acc)")
    return shown, (bool(run.tr.ema), float(run.tr.ema_decay))


def _precision(run: Run):
    return (f"bf16 autocast (train.bf16={run.tr.bf16}, teacher.bf16={run.cfg.teacher.bf16}), no loss scaler",
            "bf16" if run.tr.bf16 else "fp32")


def _targets(run: Run):
    src = str(run.cfg.distill.source)
    return f"distill.source={src}: the teacher's argmax on the same replayed (mixed) view", src in ("cache", "online")


def _clip(run: Run):
    return f"train.clip_grad={run.tr.clip_grad}", run.tr.clip_grad


I = Ingredient
INGREDIENTS: list[Ingredient] = [
    I("teacher", "regnety_160 (RegNetY-16GF), DeiT's own checkpoint", "regnety_160.deit_in1k",
      "main.py:142; README_deit.md:241; paper Table 2", _key("teacher.name")),
    I("teacher weights", DEIT_TEACHER_URL, DEIT_TEACHER_URL, "README_deit.md:241 (--teacher-path)",
      _teacher_weights, "the stage-one command names the weights (teacher.pretrained=true or teacher.checkpoint)"),
    I("teacher input", "the student's own 224 px batch, same normalisation", (224, True), "losses.py:48",
      _teacher_input),
    I("student", "DeiT-Ti/S/B with distillation token, 224 px, patch 16", True, "paper Table 1; models.py:20",
      _student),
    I("epochs", "300", 300, "main.py:35; paper Table 9", _key("train.epochs")),
    I("global batch", "1024", 1024, "paper Table 9", lambda r: (f"train.batch_size={r.tr.batch_size} x "
                                                                  f"{r.world} rank(s) = {r.global_batch}",
                                                                  r.global_batch)),
    I("learning rate", "5e-4 x batch/512 = 0.001 at 1024", (5e-4, 1e-3), "main.py:71, main.py:350; paper Table 9",
      _lr),
    I("optimizer", "AdamW", "AdamW", "main.py:56, main.py:352; paper Table 9", _optimizer),
    I("optimizer eps", "1e-8", 1e-8, "main.py:58", _eps),
    I("optimizer betas", "(0.9, 0.999) (torch default)", (0.9, 0.999), "main.py:60", _betas),
    I("weight decay", "0.05", 0.05, "main.py:66; paper Table 9", _key("train.weight_decay")),
    I("distillation token weight decay", "decayed: only biases, norms, pos_embed, cls_token are not", False,
      "timm 0.3.2 (requirements.txt:3) VisionTransformer.no_weight_decay; models.py:20 adds none",
      _no_decay, "timm >= 0.9 lists dist_token in no_weight_decay(): train.decay_dist_token=true decays it"),
    I("lr schedule", "cosine", "CosineLRScheduler", "main.py:69, main.py:355; paper Table 9", _schedule),
    I("schedule stepping", "once per epoch, at its end", "epoch", "main.py:432 (lr_scheduler.step(epoch))",
      _stepping, "per-update cosine is smoother over the same curve; train.lr_step=epoch steps as DeiT"),
    I("warmup epochs", "5", 5.0, "main.py:86; paper Table 9", _key("train.warmup_epochs")),
    I("warmup lr", "1e-6", 1e-6, "main.py:79", _key("train.warmup_lr")),
    I("min lr", "1e-5", 1e-5, "main.py:81", _key("train.min_lr")),
    I("drop path", "0.1", 0.1, "main.py:46; paper Table 9 (stoch. depth)", _key("student.drop_path")),
    I("dropout", "0.0", 0.0, "main.py:44; paper Table 9",
      lambda r: (f"{probe.dropout(r.student)} (largest nn.Dropout p in the student)", probe.dropout(r.student))),
    I("label smoothing", "0.1", 0.1, "main.py:101; paper Table 9", _key("augment.label_smoothing")),
    I("mixup alpha", "0.8", 0.8, "main.py:128; paper Table 9", _key("augment.mixup_alpha")),
    I("cutmix alpha", "1.0", 1.0, "main.py:130; paper Table 9", _key("augment.cutmix_alpha")),
    I("mix prob", "1.0", 1.0, "main.py:134", _key("augment.mix_prob")),
    I("switch prob", "0.5", 0.5, "main.py:136", _key("augment.switch_prob")),
    I("mixup pairing", "timm Mixup mode batch: each sample with the batch reversed (a random matching, the batch "
      "being in random order); one switch, lambda and box per batch", ("random matching", "per batch"),
      "main.py:138, main.py:257-260", _pairing,
      "replay: a view's partner and lambda depend only on (run_seed, seed, sample), so the cache keys the "
      "teacher's target by sample; a batch depends on the loader. augment.mix_pairing=block draws once per "
      "block, as DeiT once per batch"),
    I("RandAugment", "rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5-inc1", "main.py:98; paper Table 9",
      _key("augment.rand_augment")),
    I("color jitter", "off (timm drops it when RandAugment is on)", 0.0,
      "main.py:96 (0.3) with datasets.py:82-91 (timm create_transform)", _key("augment.color_jitter")),
    I("crop scale", "(0.08, 1.0) (timm default)", (0.08, 1.0), "datasets.py:82-91", _key("augment.crop_scale")),
    I("crop ratio", "(3/4, 4/3) (timm default)", (0.75, 4 / 3), "datasets.py:82-91", _key("augment.crop_ratio")),
    I("horizontal flip", "0.5 (timm default)", 0.5, "datasets.py:82-91", _key("augment.hflip")),
    I("crop interpolation", "bicubic", "bicubic", "main.py:102", _key("augment.interpolation"),
      "bicubic in the replay renderers (both backends) is " + CODE_WORK),
    I("RandAugment interpolation", "bicubic (timm passes the train interpolation to RandAugment)", "bicubic",
      "main.py:102 with datasets.py:87", _ra_filter, "bicubic in RandAugment's geometric ops is " + CODE_WORK),
    I("random erasing prob", "0.25", 0.25, "main.py:118; paper Table 9", _key("augment.erase_prob")),
    I("random erasing fill", "mode pixel: per-pixel normal noise (normalised space)", "normal",
      "main.py:120 (timm RandomErasing)", lambda r: (probe.erase_noise(), "uniform"),
      "uniform uint8 noise is ~10x cheaper to draw from the view's own generator and carries no image "
      "information either (pipeline/replay/pixels.py erase_fill)"),
    I("repeated augmentation", "3 copies of each image on 3 ranks in the same step; epoch = N views",
      (3, "3 ranks, epoch N"), "main.py:105-107, main.py:215-217; samplers.py:16, 35, 48, 55; paper Tables 8, 9",
      _repeats, "train.repeat_mode=ranks deals DeiT's layout, but each block of 3 epochs draws one permutation "
      "and each epoch takes a third of it (every image once per block, without replacement; DeiT draws an "
      "independent third every epoch), so that copy c of block t is the view under seed 3t+c and S = epochs "
      "seeds hold every view fresh; a step holds whole images (world x batch // 3 of them: 1023 copies of 1024 "
      "slots at 8 x 128), where DeiT lets an image's copies straddle two steps"),
    I("fresh views every epoch", "yes: views drawn online", True, "datasets.py:82-91 (random transforms per load)",
      _fresh_views, "stage one costs one teacher pass per cached seed: fewer seeds than epochs trade repeated views "
      "for a cheaper cache (docs/economics.md); cache.num_seeds = epochs x repeats (train.repeat_mode=ranks: "
      "= epochs) gives fresh views"),
    I("sample order", "a global random permutation per epoch", "global", "samplers.py:41-43", _order,
      "shards are read sequentially (webdataset): each rank reads whole shards, every sample once per epoch; "
      "under train.repeat_mode=ranks the permutation shuffles shards, then windows of mixup blocks in a shard, "
      "then samples in a window, and each rank streams the shards of its epoch's part"),
    I("eval transform", "shorter side to 224/0.875 = 256, centre crop 224, bicubic",
      (0.875, "bicubic", "resize, then centre crop"), "main.py:174; datasets.py:101-105", _eval,
      "one resize of the centre box (as the train crops) instead of resizing the whole image and cropping: the box "
      "lands up to half a source pixel apart and DeiT's truncated longer side shifts the aspect slightly; mean "
      "(max) absolute difference in uint8 levels on scikit-image photos: " + ", ".join(
          f"{name} {mean:.2f} ({top})" for name, (mean, top) in EVAL_GAP.items())),
    I("eval prediction", "average of both heads", "average of both heads", "models.py:59",
      lambda r: (f"{probe.eval_rule(r.cfg)} (timm, probed)", probe.eval_rule(r.cfg))),
    I("EMA", "on, decay 0.99996; non-EMA model reported, EMA kept", (True, 0.99996),
      "main.py:49-52, main.py:337, main.py:447; engine.py:71-72; paper Table 8", _ema),
    I("distillation", "hard", "hard", "README_deit.md:241; paper Table 3", _key("distill.mode")),
    I("distillation alpha", "0.5", 0.5, "main.py:146; losses.py:69", _key("distill.alpha")),
    I("distillation tau", "1.0", 1.0, "main.py:147", _key("distill.tau")),
    I("distillation targets", "the teacher's argmax on the student's (mixed) input", True,
      "losses.py:48, losses.py:67; engine.py:38", _targets),
    I("gradient clipping", "none", None, "main.py:62; paper Table 9", _clip),
    I("mixed precision", "fp16 autocast with a loss scaler (student and teacher)", "fp16",
      "engine.py:46; main.py:353", _precision,
      "bf16 keeps fp32's exponent range, so no loss scaler; the teacher's argmax can differ from fp16's only "
      "on near-ties"),
]
del I
