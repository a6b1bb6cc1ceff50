"""Teacher FLOPs saved by the cache: per student run, and for a sweep of R runs x E epochs on one cache of S seeds.

    python -m bench.bench_flops [--teacher regnety_160] [--students deit_tiny deit_small]

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; a multiply-add
counts 2) on one 224 px image: the teacher's forward, the student's forward + backward (a training step). The
accounting, for N training images:

- online (DeiT):  every run pays the teacher on every view:  R x E x N x F_teacher
- cached (ours):  one stage-one pass over S seeds:            S x N x F_teacher, for any number of runs

so the teacher compute saved is 1 - S / (R x E), and of the whole distillation compute
(teacher + student, R x E x N x F_student on both sides) 1 - (S F_t + R E F_s) / (R E (F_t + F_s)).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import REPO, save_json
IMAGENET_N = 1_281_167
STUDENTS = {"deit_tiny": "deit_tiny_distilled_patch16_224", "deit_small": "deit_small_distilled_patch16_224"}


def count_flops(model, train: bool, size: int = 224) -> int:
    """FLOPs of one image: forward (eval) or forward + backward (train)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size)
    model.train(train)
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            out = model(x)
            loss = sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,)))
            loss.backward()
        else:
            with torch.no_grad():
                model(x)
    return int(counter.get_total_flops())


def model_flops(teacher: str, students: list[str], classes: int = 1000) -> dict:
    import timm

    res = {"teacher": {"name": teacher, "forward_gflops": count_flops(
        timm.create_model(teacher, num_classes=classes), train=False) / 1e9}, "students": {}}
    for s in students:
        m = timm.create_model(STUDENTS.get(s, s), num_classes=classes)
        if hasattr(m, "set_distilled_training"):
            m.set_distilled_training(True)  # both heads, as in distillation training
        res["students"][s] = {"name": STUDENTS.get(s, s), "train_step_gflops": count_flops(m, train=True) / 1e9}
    return res


def sweep(f_teacher: float, f_student: float, n: int, runs: list[int], epochs: int, seeds: list[int]) -> list[dict]:
    """Teacher and total GFLOPs, online vs cached, for each (R, S); ``f_*`` in GFLOPs per image."""
    rows = []
    for r in runs:
        online_t = r * epochs * n * f_teacher
        student = r * epochs * n * f_student
        for s in seeds:
            cached_t = s * n * f_teacher
            rows.append({"R": r, "E": epochs, "S": s, "N": n,
                         "teacher_online_pflops": online_t / 1e6, "teacher_cached_pflops": cached_t / 1e6,
                         "teacher_saved": 1 - cached_t / online_t,
                         "total_online_pflops": (online_t + student) / 1e6,
                         "total_cached_pflops": (cached_t + student) / 1e6,
                         "total_saved": 1 - (cached_t + student) / (online_t + student)})
    return rows


def run(teacher: str, students: list[str], epochs: int, runs: list[int], seeds: list[int]) -> dict:
    res = model_flops(teacher, students)
    ft = res["teacher"]["forward_gflops"]
    res["per_run"] = {s: {"teacher_pflops_online": epochs * IMAGENET_N * ft / 1e6,
                          "student_pflops": epochs * IMAGENET_N * v["train_step_gflops"] / 1e6,
                          "teacher_share_online": ft / (ft + v["train_step_gflops"])}
                      for s, v in res["students"].items()}
    res["sweep"] = {s: sweep(ft, v["train_step_gflops"], IMAGENET_N, runs, epochs, seeds)
                    for s, v in res["students"].items()}
    res["setting"] = {"N": IMAGENET_N, "E": epochs, "R": runs, "S": seeds, "resolution": 224}
    return res


def table(res: dict) -> str:
    t = res["teacher"]
    lines = [f"Per image at 224 px: teacher {t['name']} forward {t['forward_gflops']:.2f} GFLOPs; "
             + "; ".join(f"{s} train step (fwd+bwd) {v['train_step_gflops']:.2f} GFLOPs"
                         for s, v in res["students"].items()) + ".", "",
             "| student | one online run: teacher share of compute | R runs | S cached seeds | teacher PFLOPs "
             "online | teacher PFLOPs cached | teacher saved | all compute saved |",
             "|---|---|---|---|---|---|---|---|"]
    for s, rows in res["sweep"].items():
        for r in rows:
            lines.append(f"| {s} | {100 * res['per_run'][s]['teacher_share_online']:.0f}% | {r['R']} | {r['S']} | "
                         f"{r['teacher_online_pflops']:.0f} | {r['teacher_cached_pflops']:.0f} | "
                         f"{100 * r['teacher_saved']:.1f}% | {100 * r['total_saved']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="regnety_160")
    ap.add_argument("--students", nargs="+", default=list(STUDENTS))
    ap.add_argument("--epochs", type=int, default=300, help="E per student run (DeiT: 300)")
    ap.add_argument("--runs", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seeds", type=int, nargs="+", default=[300, 100, 30])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "flops.json")
    args = ap.parse_args(argv)
    res = run(args.teacher, args.students, args.epochs, args.runs, args.seeds)
    save_json(args.out, res)
    print(table(res))
    return res


if __name__ == "__main__":
    main()
