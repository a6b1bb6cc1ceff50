"""`python -m pipeline.evaluate`: the final student on val (class head, distillation head, their average,
agreement with the teacher), gathered with the other stages' metrics into one summary and a printed table.

    python -m pipeline.evaluate                         # the run configured in pipeline/conf/
    python -m pipeline.evaluate distill=soft            # the soft student (train.out_dir follows distill.mode)
    python -m pipeline.evaluate --params params.yaml    # what `dvc repro` runs

Writes `eval.out` (beside the run; under DVC metrics/student.json, read by `dvc metrics show` / `dvc exp show`): the
student's flat metrics (`METRIC_KEYS`); the teacher's and the cache's are at teacher.train.metrics and cache.metrics.
"""

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline import cli


def _read(path) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else {}


def evaluate_run(cfg: DictConfig) -> dict:
    from pipeline import distributed
    from pipeline.replay.view_params import augment_config
    from pipeline.replay.loader import run_loader
    from pipeline.finished import missing_student
    from pipeline.models.student import load_student
    from pipeline.models.teacher import load_runner
    from pipeline.train.losses import create_loss
    from pipeline.train.loop import validate
    from pipeline.train.tasks import DistillationTask, ValTeacher

    ctx = distributed.setup(str(cfg.train.device), int(cfg.num_threads), 0)
    val = run_loader(cfg, "val", augment_config(cfg), batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
                     ctx=ctx)
    num_classes = val.manifest.num_classes
    out_dir = Path(cfg.train.out_dir)
    student_path = out_dir / "student.pt"
    if not student_path.is_file():
        raise missing_student(cfg, student_path)
    model = load_student(cfg.student, num_classes, student_path).to(ctx.device)
    runner = load_runner(cfg.teacher, num_classes, ctx.device, required=False)
    task = DistillationTask(create_loss(cfg.distill, num_classes), cfg.student.mean, cfg.student.std, ctx.device,
                            val_teacher=ValTeacher(runner) if runner is not None else None)
    m = validate(model, val, task, ctx)
    teacher = _read(cfg.teacher.train.metrics)
    cache = _read(cfg.cache.metrics)
    student = _read(out_dir / "metrics.json")
    summary = {
        "distill_mode": str(cfg.distill.mode), "distill_source": str(cfg.distill.source),
        "val_samples": val.manifest.n,
        "student_acc_cls": m["val_acc_cls"], "student_acc_dist": m["val_acc_dist"], "student_acc_avg": m["val_acc"],
        "student_val_loss": m["val_loss"],
        "teacher_agreement": m.get("val_agree_teacher"),
        "teacher_val_acc": teacher.get("acc"),
        "cache_bytes_per_view": cache.get("bytes_per_view"),
        "img_per_s_train_teacher": teacher.get("img_per_s"),
        "img_per_s_teacher_cache": cache.get("img_per_s"),
        "img_per_s_train_student": student.get("img_per_s"),
        "train_student_seconds": student.get("seconds"),
        "chance": 1.0 / num_classes,
    }
    return summary


# eval.out: the student's dvc metrics, flat and short (key -> the summary's field). The summary's other fields
# (the teacher's accuracy, bytes per view, the other stages' img/s) are those stages' own metrics files.
METRIC_KEYS = {"acc": "student_acc_avg", "acc_cls": "student_acc_cls", "acc_dist": "student_acc_dist",
               "agreement": "teacher_agreement", "img_per_s": "img_per_s_train_student",
               "seconds": "train_student_seconds"}


NOT_CURVES = ("epoch", "seed", "steps", "updates", "epoch_seconds")  # history fields dvclive does not log either


def copy_curves(out_dir: Path, history: list[dict], dest: Path) -> None:
    """The student's per-epoch curves into ``dest`` in dvclive's layout (``<train|val>/<name>.tsv``: step, value):
    dvclive's own files, or the same rebuilt from history.json when the run had dvclive off."""
    from pipeline.atomic import atomic_write_text

    live = out_dir / "dvclive" / "plots" / "metrics"
    files: dict[str, str] = {}
    if live.is_dir():
        files = {str(p.relative_to(live)): p.read_text() for p in live.rglob("*.tsv")}
    else:
        series: dict[str, list[str]] = {}
        for step, row in enumerate(history):
            for key, value in row.items():
                if key not in NOT_CURVES and isinstance(value, (int, float)):
                    name = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key.removeprefix('train_')}"
                    series.setdefault(name, []).append(f"{step}\t{value}")
        files = {f"{n}.tsv": f"step\t{n.split('/')[1]}\n" + "\n".join(rows) + "\n" for n, rows in series.items()}
    if dest.is_dir():  # a curve the previous run had and this one does not
        for stale in [p for p in dest.rglob("*.tsv") if str(p.relative_to(dest)) not in files]:
            stale.unlink(missing_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():  # each file atomically: never a half-written curve, even with two writers
        atomic_write_text(dest / rel, text)


def metrics(summary: dict) -> dict:
    """The flat metrics eval.out holds (acc = the average of the two heads, DeiT's rule; img_per_s and seconds:
    train_student's)."""
    return {key: summary[field] for key, field in METRIC_KEYS.items()}


def format_table(s: dict) -> str:
    def f(v, pct=False):
        if v is None:
            return "-"
        return f"{100 * v:.1f}%" if pct else f"{v:.1f}"

    rows = [
        ("teacher val accuracy", f(s["teacher_val_acc"], True)),
        (f"student ({s['distill_mode']}, {s['distill_source']}) class head", f(s["student_acc_cls"], True)),
        ("student distillation head", f(s["student_acc_dist"], True)),
        ("student average of heads (DeiT rule)", f(s["student_acc_avg"], True)),
        ("student agreement with teacher", f(s["teacher_agreement"], True)),
        ("chance", f(s["chance"], True)),
        ("cache bytes per view", f(s["cache_bytes_per_view"])),
        ("img/s: train_teacher / teacher_cache / train_student",
         " / ".join(f(s[k]) for k in ("img_per_s_train_teacher", "img_per_s_teacher_cache",
                                      "img_per_s_train_student"))),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(cfg: DictConfig) -> None:
    from pipeline.atomic import atomic_write_text

    summary = evaluate_run(cfg)
    atomic_write_text(Path(cfg.eval.out), json.dumps(metrics(summary), indent=2) + "\n")
    if cfg.eval.get("plots"):
        out_dir = Path(cfg.train.out_dir)
        copy_curves(out_dir, _read(out_dir / "history.json") or [], Path(cfg.eval.plots))
    print(format_table(summary))
    logging.getLogger("pipeline").info(f"metrics -> {cfg.eval.out}")


KEYS = ('train.out_dir', 'teacher.checkpoint', 'eval.out', 'eval.plots')

if __name__ == "__main__":
    cli.run("evaluate", main, __doc__, KEYS)
