"""`python -m pipeline.evaluate`: the final student on val (class head, distillation head, their average,
agreement with the teacher), gathered with the other stages' metrics into one summary and a printed table.

Writes `${eval.out}` (metrics JSON read by `dvc metrics show`).
"""

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.cli import fail_cleanly


def _read(path) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else {}


def evaluate_run(cfg: DictConfig) -> dict:
    from pipeline import distributed
    from pipeline.loader import ViewLoader
    from pipeline.student import load_student
    from pipeline.training import ValTeacher, _make_teacher, augment_config, evaluate

    ctx = distributed.setup(str(cfg.train.get("device", "auto")), int(cfg.get("num_threads", 0)), 0)
    val = ViewLoader(Path(cfg.data.shards) / "val", augment_config(cfg), run_seed=int(cfg.run_seed),
                     batch_size=int(cfg.train.get("eval_batch_size") or cfg.train.batch_size), train=False)
    num_classes = val.manifest.num_classes
    out_dir = Path(cfg.train.out_dir)
    student_path = out_dir / "student.pt"
    if not student_path.is_file():
        raise FileNotFoundError(f"{student_path}: no trained student (run python -m pipeline.train_student)")
    model = load_student(cfg.student, num_classes, student_path).to(ctx.device)
    runner = _make_teacher(cfg, num_classes, ctx.device, required=False)
    n, loss, cls, dist, avg, agree = evaluate(
        model, val, mean=cfg.student.mean, std=cfg.student.std, device=ctx.device, bf16=False,
        teacher=ValTeacher(runner) if runner is not None else None)
    teacher = _read(cfg.teacher.train.metrics)
    cache = _read(cfg.cache.metrics)
    student = _read(out_dir / "metrics.json")
    summary = {
        "distill_mode": str(cfg.distill.mode), "distill_source": str(cfg.distill.source),
        "val_samples": int(n),
        "student_acc_cls": cls / n, "student_acc_dist": dist / n, "student_acc_avg": avg / n,
        "student_val_loss": loss / n,
        "teacher_agreement": agree / n if runner is not None else None,
        "teacher_val_acc": teacher.get("val_acc"),
        "cache_bytes_per_view": cache.get("total"),
        "img_per_s_train_teacher": teacher.get("img_per_s"),
        "img_per_s_teacher_cache": cache.get("img_per_s"),
        "img_per_s_train_student": student.get("img_per_s"),
        "chance": 1.0 / num_classes,
    }
    return summary


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


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with fail_cleanly():
        summary = evaluate_run(cfg)
        out = Path(cfg.eval.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        print(format_table(summary))
        print(f"summary -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
