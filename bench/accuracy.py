"""Accuracy through the real stage commands, several seeds, mean ± std: Fashion-MNIST, or the toy demo.

    python -m bench.accuracy [--seeds 0 1 2] [--train-limit 10000] [--epochs 8] [--jobs 2]
    python -m bench.accuracy --epochs 9 --variants hard hard-r3 --out bench/out/repeats   # repeats 3 vs 1
    python -m bench.accuracy --data toy      # the toy `dvc repro` recipe: teacher, none, hard, soft; ~20 min

``--data toy`` runs the defaults of pipeline/conf/ (what `dvc repro` runs) with one stage at a time on all cores, so
seed 0 reproduces the toy `dvc repro` metrics exactly on the same machine and thread count. Fashion-MNIST runs
pass ``bench.common.RECIPE_V1``: the recipe the published study measured.

Per seed r (a whole replicate: run_seed, teacher init, student init all = r; views, order and mixing differ):

    make_shards (once, shared) -> train_teacher -> teacher_cache (S = epochs seeds)
      -> train_student x {none, hard, soft, hard-online, hard S=1, S=2, S=4}  -> evaluate each

"hard" is also the S = E point of the seed-cycling curve (epoch e uses cached seed e mod S, so S < E repeats
views). Every step is the documented ``python -m pipeline.<stage>`` command with Hydra overrides; its log is
under ``<out>/logs``. Finished steps are skipped on a re-run (``--fresh`` to start over), so the study resumes.
``--jobs 2`` runs two stages side by side, one torch thread each: a small student uses one core and leaves the
second mostly idle (measured: 2 x 240 img/s side by side vs 345 img/s alone).

Writes ``<out>/accuracy.json``, ``<out>/accuracy.md`` and ``<out>/accuracy.png`` (bench/out/accuracy by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import RECIPE_V1, REPO, compose, machine, save_json
from pipeline.data.shards import load_manifest

OUT = REPO / "bench" / "out" / "accuracy"
# variant -> train_student overrides (a function of the epoch count E)
VARIANTS = {
    "none": lambda e: ["distill=none"],
    "hard": lambda e: ["distill=hard"],
    "soft": lambda e: ["distill=soft"],
    "hard-online": lambda e: ["distill=hard", "distill.source=online"],
    **{f"hard-S{s}": (lambda e, s=s: ["distill=hard", f"train.seed_schedule=[{','.join(str(i % s) for i in range(e))}]"])
       for s in (1, 2, 4)},
    # DeiT's repeated augmentation at the same budget: an epoch of ours holds 3N views, so E/3 epochs (and a third
    # of the warm-up epochs) read the same E seed indices and give the same number of views and updates as "hard".
    "hard-r3": lambda e: ["distill=hard", "train.repeats=3", f"train.epochs={e // 3}", f"train.warmup_epochs={1 / 3}"],
}


def cycle_points(epochs: int) -> list[tuple[int, str]]:
    """(S, variant) of the seed-cycling curve: S in {1, 2, 4} below E, and S = E (the plain hard run)."""
    return [(s, f"hard-S{s}") for s in (1, 2, 4) if s < epochs] + [(epochs, "hard")]


def stage_overrides(args, r: int, variant: str | None = None) -> list[str]:
    """The Hydra overrides of seed ``r``'s stages (``variant``: a student run); every path follows from them."""
    out = Path(args.out).resolve()
    data = (["data=toy", f"data.shards={out}/data/shards/toy"] if args.data == "toy" else
            ["data=fashion_mnist", f"data.train_limit={args.train_limit}", "teacher=resnet_toy", *RECIPE_V1,
             f"data.shards={out}/data/shards/fashion_mnist"])
    ov = [
        *data, f"workdir={out}/seed{r}", f"run_seed={r}", f"num_threads={args.threads}",
        f"teacher.train.init_seed={r}", f"teacher.train.epochs={args.teacher_epochs}",
        f"cache.num_seeds={args.epochs}", f"train.epochs={args.epochs}", f"train.init_seed={r}",
        "train.dvclive=false", "train.val=false", *args.override,
    ]
    if variant is not None:
        w = out / f"seed{r}"
        ov += [*VARIANTS[variant](args.epochs), f"train.out_dir={w}/runs/student/{variant}",
               f"eval.out={w}/eval/{variant}.json", "eval.plots=null"]  # no shared curves dir: variants run in parallel
    return ov


class Study:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out).resolve()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._locks: dict[int, threading.Lock] = {r: threading.Lock() for r in args.seeds}
        self._print = threading.Lock()

    def say(self, msg: str) -> None:
        with self._print:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def run(self, name: str, stage: str, overrides: list[str], done) -> None:
        """``python -m pipeline.<stage> overrides``, unless ``done`` exists; a failure stops the study."""
        done = Path(done)
        if done.is_file():
            return
        log = self.logs / f"{name}.log"
        cmd = [sys.executable, "-m", f"pipeline.{stage}", *overrides]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"} if self.args.jobs > 1 else None
        t0 = time.time()
        self.say(f"start {name}")
        with log.open("w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=self.out, env=env).returncode
        if rc != 0 or not done.is_file():
            raise RuntimeError(f"{name}: `{' '.join(cmd)}` failed (exit {rc}); see {log}")
        self.say(f"done  {name} ({time.time() - t0:.0f} s)")

    def shards(self) -> None:
        ov = stage_overrides(self.args, self.args.seeds[0])
        self.run("make_shards", "make_shards", ov, Path(compose(ov).data.shards) / "val" / "manifest.json")

    def teacher_and_cache(self, r: int) -> None:
        with self._locks[r]:
            ov = stage_overrides(self.args, r)
            cfg = compose(ov)
            adopt_legacy_metrics(cfg)
            self.run(f"seed{r}-teacher", "train_teacher", ov, cfg.teacher.train.metrics)
            self.run(f"seed{r}-cache", "teacher_cache", ov, cfg.cache.metrics)

    def student(self, r: int, variant: str) -> None:
        self.teacher_and_cache(r)
        ov = stage_overrides(self.args, r, variant)
        cfg = compose(ov)
        self.run(f"seed{r}-{variant}", "train_student", ov, Path(cfg.train.out_dir) / "metrics.json")
        self.run(f"seed{r}-{variant}-eval", "evaluate", ov, cfg.eval.out)

    def execute(self) -> None:
        self.shards()
        with ThreadPoolExecutor(self.args.jobs) as pool:  # teachers first (students wait on their seed's cache)
            list(pool.map(self.teacher_and_cache, self.args.seeds))
            jobs = [(r, v) for v in self.args.variants for r in self.args.seeds]
            list(pool.map(lambda rv: self.student(*rv), jobs))


# ------------------------------------------------------------------------------------------- report
def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def adopt_legacy_metrics(cfg) -> None:
    """A study begun before the flat dvc metrics files (metrics/teacher.json, metrics/cache.json) has full records
    under runs/ instead: derive the flat files from them, so that it resumes instead of re-training its teachers."""
    w = Path(cfg.workdir)
    for new, old, flat in (
            (cfg.teacher.train.metrics, w / "runs" / "teacher" / f"{cfg.data.name}-{cfg.teacher.name}" / "metrics.json",
             lambda r: {"acc": r["val_acc"], "img_per_s": r["img_per_s"], "seconds": r["seconds"]}),
            (cfg.cache.metrics, w / "runs" / "cache" / str(cfg.data.name) / "metrics.json",
             lambda r: {"bytes_per_view": r["total"], "img_per_s": r["img_per_s"], "views": r["views_written"]})):
        if not Path(new).is_file() and old.is_file():
            Path(new).parent.mkdir(parents=True, exist_ok=True)
            Path(new).write_text(json.dumps(flat(json.loads(old.read_text())), indent=2) + "\n")


def _get(metrics: dict, key: str, old: str):
    """A metrics file's ``key``; ``old``: its name in runs written before the flat dvc metrics files."""
    return metrics[key] if key in metrics else metrics[old]


def collect(args) -> dict:
    """Mean ± std over seeds of every finished stage's metrics (paths from the composed configs)."""
    seeds, variants = args.seeds, args.variants

    def read(path) -> dict:
        path = Path(path)
        if not path.is_file():
            sys.exit(f"bench.accuracy: error: {path} missing (that run has not finished; run without --report-only)")
        return json.loads(path.read_text())

    base = {r: compose(stage_overrides(args, r)) for r in seeds}
    for cfg in base.values():
        adopt_legacy_metrics(cfg)
    runs_cfg = {(r, v): compose(stage_overrides(args, r, v)) for r in seeds for v in variants}
    teacher = [read(base[r].teacher.train.metrics) for r in seeds]  # dvc metrics: acc, img_per_s, seconds
    res = {"teacher": {"val_acc": mean_std([_get(t, "acc", "val_acc") for t in teacher]),
                       "seconds": mean_std([t["seconds"] for t in teacher])},
           "students": {}}
    for v in variants:
        evals = [read(runs_cfg[r, v].eval.out) for r in seeds]
        runs = [read(Path(runs_cfg[r, v].train.out_dir) / "metrics.json") for r in seeds]
        res["students"][v] = {  # eval.out: the student's dvc metrics (pipeline.evaluate.METRIC_KEYS)
            k: mean_std([_get(e, key, k) for e in evals])
            for k, key in (("student_acc_avg", "acc"), ("student_acc_cls", "acc_cls"),
                           ("student_acc_dist", "acc_dist"), ("teacher_agreement", "agreement"))
        }
        res["students"][v]["img_per_s"] = mean_std([m["img_per_s"] for m in runs])
        res["students"][v]["seconds"] = mean_std([m["seconds"] for m in runs])
    cache = [read(base[r].cache.metrics) for r in seeds]
    res["cache"] = {"bytes_per_view": mean_std([_get(c, "bytes_per_view", "total") for c in cache])}
    res["seed_cycling"] = [{"S": s, "variant": v, **res["students"][v]["student_acc_avg"]}
                           for s, v in cycle_points(args.epochs) if v in res["students"]]
    cfg = base[seeds[0]]
    res["meta"] = {
        "data": args.data, "train_samples": load_manifest(Path(cfg.data.shards) / "train").n,
        "train_label_noise": cfg.data.get("train_label_noise"),
        "val_samples": load_manifest(Path(cfg.data.shards) / "val").n, "seeds": seeds,
        "train_limit": args.train_limit,
        "epochs": args.epochs, "teacher_epochs": args.teacher_epochs, "teacher": str(cfg.teacher.name),
        "student": f"{cfg.student.name}, patch {cfg.student.patch_size}, "
                   f"{', '.join(f'{k} {v}' for k, v in cfg.student.kwargs.items())}",
        "cache_path": str(cfg.cache.path),  # seed 0's store (bench_storage reads its real teacher logits)
        "machine": machine(), "overrides": args.override,
    }
    return res


def pm(d: dict, pct: bool = True) -> str:
    f = 100 if pct else 1
    return f"{f * d['mean']:.2f} ± {f * d['std']:.2f}"


def markdown(res: dict) -> str:
    m = res["meta"]
    data = (f"Toy set ({m['train_samples']} train images, {m['train_label_noise'] or 0:.0%} of their labels noisy)"
            if m.get("data") == "toy" else f"Fashion-MNIST, first {m['train_limit']} train images")
    lines = [
        f"{data}, {m['val_samples']} test images, 32 px; "
        f"{m['epochs']} student epochs, teacher {m['teacher']} ({m['teacher_epochs']} epochs), "
        f"student {m['student']}; seeds {m['seeds']} (mean ± std over seeds, accuracy in %). "
        f"Machine: {m['machine']}.",
        "",
        "| model | average of heads | class head | distillation head | agreement with teacher |",
        "|---|---|---|---|---|",
        f"| teacher ({m['teacher']}) | {pm(res['teacher']['val_acc'])} | | | |",
    ]
    for v, s in res["students"].items():
        agree = pm(s["teacher_agreement"]) if s["teacher_agreement"]["values"][0] is not None else "-"
        lines.append(f"| student, {v} | {pm(s['student_acc_avg'])} | {pm(s['student_acc_cls'])} | "
                     f"{pm(s['student_acc_dist'])} | {agree} |")
    lines += ["", "Student runs' time (wall seconds of train_student, mean ± std; the machine may be shared):", "",
              "| student | seconds | img/s |", "|---|---|---|"]
    lines += [f"| {v} | {pm(s['seconds'], False)} | {pm(s['img_per_s'], False)} |" for v, s in res["students"].items()]
    if len(res["seed_cycling"]) > 1:
        lines += ["", "Seed cycling (hard, from the cache; epoch e uses cached seed e mod S):", "",
                  "| S cached seeds | average of heads |", "|---|---|"]
        lines += [f"| {p['S']} | {100 * p['mean']:.2f} ± {100 * p['std']:.2f} |" for p in res["seed_cycling"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = res["seed_cycling"]
    cycling = len(pts) > 1  # the toy study has no cycling points: one panel
    fig, axes = plt.subplots(1, 2 if cycling else 1, figsize=(11 if cycling else 5.5, 4), squeeze=False)
    ax1 = axes[0, 0]
    names = ["teacher"] + [v for v in ("none", "hard", "soft", "hard-online") if v in res["students"]]
    stats = [res["teacher"]["val_acc"]] + [res["students"][v]["student_acc_avg"] for v in names[1:]]
    ax1.bar(names, [100 * s["mean"] for s in stats], yerr=[100 * s["std"] for s in stats], capsize=4,
            color=["#555"] + ["#4c72b0"] * (len(names) - 1))
    for i, s in enumerate(stats):
        ax1.scatter([i] * len(s["values"]), [100 * v for v in s["values"]], color="k", s=8, zorder=3)
    lo = min(min(s["values"]) for s in stats) * 100
    ax1.set_ylim(max(0, lo - 5), 100)
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title(f"{'Toy set' if res['meta'].get('data') == 'toy' else 'Fashion-MNIST'}: teacher and student "
                  "(mean ± std, dots = seeds)")
    if cycling:
        plot_cycling(axes[0, 1], res)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cycling(ax2, res: dict) -> None:
    pts = res["seed_cycling"]
    ax2.errorbar([p["S"] for p in pts], [100 * p["mean"] for p in pts], yerr=[100 * p["std"] for p in pts],
                 marker="o", capsize=4)
    for p in pts:
        ax2.scatter([p["S"]] * len(p["values"]), [100 * v for v in p["values"]], color="k", s=8, zorder=3)
    if "none" in res["students"]:
        ax2.axhline(100 * res["students"]["none"]["student_acc_avg"]["mean"], color="grey", ls=":",
                    label="no distillation (mean)")
        ax2.legend(fontsize=8)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks([p["S"] for p in pts], [str(p["S"]) for p in pts])
    ax2.set_xlabel("cached augmentation seeds S (student epochs E = %d)" % res["meta"]["epochs"])
    ax2.set_ylabel("student test accuracy (%)")
    ax2.set_title("Seed cycling: how many cached views are enough")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="default bench/out/accuracy (toy: bench/out/accuracy_toy)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", choices=["fashion_mnist", "toy"], default="fashion_mnist")
    ap.add_argument("--train-limit", type=int, default=10000, help="first N Fashion-MNIST train images")
    ap.add_argument("--epochs", type=int, default=None,
                    help="student epochs E (= cached seeds); default 8, toy: pipeline/conf/train/toy.yaml's")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="default 8, toy: pipeline/conf/teacher's")
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                    help="default: all, less the cycling points with S >= E; toy: none hard soft")
    ap.add_argument("--jobs", type=int, default=None, help="stages run side by side (default 2, toy: 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per stage (default: 1 if jobs > 1)")
    ap.add_argument("--fresh", action="store_true", help="delete <out> first")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    ap.add_argument("--set", dest="override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra Hydra override for every stage (repeatable), e.g. --set train.batch_size=32")
    args = ap.parse_args(argv)
    toy = args.data == "toy"
    conf = compose([]) if toy else None  # toy: the defaults of pipeline/conf/ (what `dvc repro` runs), one stage at a time
    defaults = ({"epochs": int(conf.train.epochs), "teacher_epochs": int(conf.teacher.train.epochs), "jobs": 1,
                 "variants": ["none", "hard", "soft"]} if toy else {"epochs": 8, "teacher_epochs": 8, "jobs": 2})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.variants is None:
        cycling = {v for _, v in cycle_points(args.epochs)}
        args.variants = [v for v in VARIANTS if (not v.startswith("hard-S") or v in cycling) and v != "hard-r3"]
    if "hard-r3" in args.variants and args.epochs % 3:
        ap.error(f"--variants hard-r3 needs --epochs divisible by 3 (got {args.epochs})")
    if args.threads is None:
        args.threads = 1 if args.jobs > 1 else 0
    out = args.out = Path(args.out or (f"{OUT}_toy" if toy else OUT)).resolve()
    if args.fresh and out.exists():
        import shutil
        shutil.rmtree(out)
    t0 = time.time()
    if not args.report_only:
        try:
            Study(args).execute()
        except RuntimeError as exc:  # a stage failed: its log says why; finished stages are kept for a re-run
            print(f"bench.accuracy: error: {exc}", file=sys.stderr)
            sys.exit(2)
    res = collect(args)
    previous = out / "accuracy.json"  # --report-only keeps the measured wall time of the run it reports
    res["meta"]["wall_seconds"] = (json.loads(previous.read_text())["meta"].get("wall_seconds")
                                   if args.report_only and previous.is_file() else time.time() - t0)
    save_json(out / "accuracy.json", res)
    md = markdown(res)
    (out / "accuracy.md").write_text(md)
    plot(res, out / "accuracy.png")
    print(md)
    print(f"-> {out / 'accuracy.json'}, {out / 'accuracy.md'}, {out / 'accuracy.png'}")
    return res


if __name__ == "__main__":
    main()
