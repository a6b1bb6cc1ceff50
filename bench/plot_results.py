"""Plot of a finished toy pipeline run (``dvc repro``) for the README; the benchmark plots come from
``python -m bench.run_all``.

    python -m bench.plot_results [--run .] [--out docs/img]

Writes toy_curves.png: teacher and student val accuracy per epoch, student train and val loss.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def toy_curves(run: Path, out: Path) -> None:
    teacher = next(iter(sorted(run.glob("runs/teacher/*/train/run.json"))), None)  # the teacher run's record
    student = next(iter(sorted(run.glob("runs/student/*/history.json"))), None)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    if teacher:
        h = _load(teacher)["history"]
        a.plot([r["epoch"] for r in h], [r["val_acc"] for r in h], "o-", label=f"teacher ({_load(teacher)['teacher']})")
    if student:
        h = _load(student)
        for key, label in (("val_acc", "student, head average"), ("val_acc_cls", "student, class head"),
                           ("val_acc_dist", "student, distillation head"), ("val_agree_teacher", "agreement w/ teacher")):
            a.plot([r["epoch"] for r in h], [r[key] for r in h], ".-", label=label)
        b.plot([r["epoch"] for r in h], [r["train_loss"] for r in h], "o-", label="train loss (hard)")
        b.plot([r["epoch"] for r in h], [r["val_loss"] for r in h], "o-", label="val loss")
    a.axhline(0.1, color="grey", ls=":", label="chance")
    a.set_xlabel("epoch"), a.set_ylabel("val accuracy"), a.legend(fontsize=7), a.set_title("toy pipeline (dvc repro)")
    b.set_xlabel("epoch"), b.legend(fontsize=7), b.set_title("student loss")
    fig.tight_layout()
    fig.savefig(out / "toy_curves.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=".")
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    toy_curves(Path(args.run), out)
    print(f"plots -> {out}")


if __name__ == "__main__":
    main()
