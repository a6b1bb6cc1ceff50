"""Every speed and storage benchmark in one command: JSON, a markdown report and PNG plots.

    python -m bench.run_all [--quick] [--publish]

Runs, one after the other on this machine (each is also a command of its own):

    bench.bench_student   student step rate: none / cache-hard / cache-soft / online, DeiT-Ti and DeiT-S at 224 px
    bench.bench_cache     stage one end to end vs pure teacher forward on the same batches
    bench.bench_replay    replay loader vs timm's training transform, per core
    bench.bench_storage   bytes per view, soft K in {1, 5, 10, all} and hard-only, ImageNet-1k extrapolation
    bench.bench_flops     teacher FLOPs saved, per run and for R runs x E epochs on one cache of S seeds

and adds the Fashion-MNIST accuracy study (``python -m bench.accuracy``, an hour-scale run of its own) when its
results exist. Writes ``<out>/results.json`` and ``<out>/results.md`` (bench/out by default) and the plots
into ``<out>/img``. ``--publish`` copies them to docs/results.{json,md} and docs/img (what the README shows);
every run compares its headline numbers with the published ones, so a re-run shows whether it reproduces them.
``--quick`` is a smoke profile (tiny sizes, toy settings only): it checks the command, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench.common import REPO, machine, save_json
DOCS = REPO / "docs"

PROFILES = {
    "full": {
        "student": ["--steps", "7", "--warmup", "2", "--students", "deit_tiny", "deit_small"],
        "cache": ["--n", "1024", "--photos", "1024", "--seeds", "2", "--group-photos", "256", "--group-seeds", "8"],
        "replay": ["--n", "256", "--reps", "3"],
        "storage": ["--shards", "4"],
        "flops": [],
    },
    "quick": {
        "student": ["--steps", "2", "--warmup", "1", "--students"],
        "cache": ["--n", "128", "--photos", "0", "--seeds", "1", "--group-photos", "32", "--group-reps", "1"],
        "replay": ["--n", "32", "--reps", "1"],
        "storage": ["--shards", "1"],
        "flops": ["--students", "deit_tiny", "--runs", "1", "4", "--seeds", "300", "30"],
    },
}


def headline(res: dict) -> dict[str, float]:
    """The numbers the README quotes, flat, for comparing two runs."""
    h = {}
    for name, s in res["student"]["settings"].items():
        for ratio, v in s["ratios"].items():
            h[f"student {name} {ratio}"] = v
    for s in res["cache"]["settings"]:
        h[f"stage one {s['setting'].split()[0]} end-to-end/pure"] = s["ratio"]
    if res["cache"].get("grouped"):
        h[f"stage one grouped/per-seed views/s per core (S={res['cache']['grouped']['seeds']})"] = \
            res["cache"]["grouped"]["ratio"]
    for src, r in res["replay"]["ratios"].items():
        h[f"replay {src} ours/timm"] = r["ours/timm"]
        if "ours_r3/ours" in r:
            h[f"replay {src} ours r=3/r=1 per view"] = r["ours_r3/ours"]
    for name, s in res["storage"]["sources"].items():
        for label, r in s["rows"].items():
            h[f"storage {name} {label} B/view"] = r["total"]
    h["flops teacher GFLOPs/img"] = res["flops"]["teacher"]["forward_gflops"]
    acc = res.get("accuracy")
    if acc:
        h["accuracy teacher"] = acc["teacher"]["val_acc"]["mean"]
        for v, s in acc["students"].items():
            h[f"accuracy student {v}"] = s["student_acc_avg"]["mean"]
    return h


def compare(now: dict, before: dict) -> str:
    a, b = headline(now), headline(before)
    keys = [k for k in a if k in b]
    if not keys:
        return ""
    lines = [f"| number | published ({before['meta']['date']}) | this run | change |", "|---|---:|---:|---:|"]
    for k in keys:
        change = (a[k] - b[k]) / b[k] if b[k] else float("nan")
        lines.append(f"| {k} | {b[k]:.3g} | {a[k]:.3g} | {100 * change:+.1f}% |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- report
def student_table(st: dict) -> str:
    lines = ["| setting | student | batch | none img/s | cache-hard | cache-soft | online-hard | "
             "cache-hard / none | cache-hard / online | cache-soft / online |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in st["settings"].items():
        m = {k: v["img_per_s"] for k, v in s["modes"].items()}
        r = s["ratios"]
        lines.append(f"| {name} | {s['student']} | {s['batch']} | {m['none']:.1f} | {m['cache-hard']:.1f} | "
                     f"{m['cache-soft']:.1f} | {m['online-hard']:.1f} | {r['cache-hard/none']:.2f} | "
                     f"{r['cache-hard/online']:.2f}x | {r['cache-soft/online']:.2f}x |")
    return "\n".join(lines)


def replay_table(rp: dict) -> str:
    rows = rp["rows"]
    r3 = all(f"ours_r3@{src}" in rows for src in rp["ratios"])  # repeats rows (absent in older results)
    lines = ["| source | timm create_transform img/s per core | ours (with mixing) | ours, no mix | ours / timm |"
             + (" ours, repeats r=3 (views/s) | r=3 / r=1 |" if r3 else ""),
             "|---|---:|---:|---:|---:|" + ("---:|---:|" if r3 else "")]
    for src, r in rp["ratios"].items():
        lines.append(f"| {src} JPEG -> 224 px | {rows[f'timm@{src}']['img_per_s_median']:.0f} | "
                     f"{rows[f'ours@{src}']['img_per_s_median']:.0f} | "
                     f"{rows[f'ours_nomix@{src}']['img_per_s_median']:.0f} | {r['ours/timm']:.2f}x |"
                     + (f" {rows[f'ours_r3@{src}']['img_per_s_median']:.0f} | {r['ours_r3/ours']:.2f}x |"
                        if r3 else ""))
    if "toy@32x32" in rows:
        lines.append(f"| toy 32x32 PNG -> 32 px | | {rows['toy@32x32']['img_per_s_median']:.0f} | | |")
    bd = rp["breakdown"]["500x375"]
    share = bd["ms_per_image"].get("decode", float("nan")) / bd["total_ms_per_image"]
    return "\n".join(lines) + f"\n\nJPEG decode is {share:.0%} of ours' time per image at 500x375."


def report(res: dict) -> str:
    from bench import bench_cache, bench_flops, bench_storage

    m = res["meta"]
    parts = [f"# Benchmark results\n\nMachine: {m['machine']}; torch {m['torch']}, timm {m['timm']}; "
             f"profile {m['profile']}; {m['date']}; {m['wall_s'] / 60:.1f} min. "
             "Command: `python -m bench.run_all` (accuracy: `python -m bench.accuracy`).",
             "## Student step rate (stage two, one run, modes side by side)", student_table(res["student"]),
             "## Stage one: end to end vs pure teacher forward", bench_cache.table(res["cache"]),
             "## Replay loader vs timm, per core", replay_table(res["replay"]),
             "## Cache storage", bench_storage.table(res["storage"]),
             "## Teacher FLOPs saved (ImageNet-1k, E = 300 epochs)", bench_flops.table(res["flops"])]
    if res.get("accuracy"):
        from bench import accuracy
        parts += ["## Accuracy on Fashion-MNIST (`python -m bench.accuracy`)", accuracy.markdown(res["accuracy"])]
    if res.get("comparison"):
        parts += ["## This run vs the published one", res["comparison"]]
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------- plots
def plots(res: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    a = axes[0]
    settings = res["student"]["settings"]
    modes = ["none", "cache-hard", "cache-soft", "online-hard"]
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        vals = [s["modes"][mode]["img_per_s"] / s["modes"]["none"]["img_per_s"] for s in settings.values()]
        a.bar([i + j * width for i in range(len(settings))], vals, width, label=mode)
    a.set_xticks([i + 0.3 for i in range(len(settings))], list(settings), fontsize=8)
    a.axhline(1, color="grey", lw=0.5)
    a.set_ylabel("img/s relative to no teacher"), a.set_title("student step rate"), a.legend(fontsize=7)
    a = axes[1]
    rp = res["replay"]
    srcs = list(rp["ratios"])
    a.bar([i - 0.2 for i in range(len(srcs))], [rp["rows"][f"timm@{s}"]["img_per_s_median"] for s in srcs], 0.4,
          label="timm create_transform")
    a.bar([i + 0.2 for i in range(len(srcs))], [rp["rows"][f"ours@{s}"]["img_per_s_median"] for s in srcs], 0.4,
          label="ours (replay)")
    a.set_xticks(range(len(srcs)), [f"{s} JPEG" for s in srcs])
    a.set_ylabel("img/s per core"), a.set_title("augmentation to 224 px"), a.legend(fontsize=7)
    a = axes[2]
    cs = res["cache"]["settings"]
    names = [s["setting"].split(" (")[0] for s in cs]
    a.bar([i - 0.2 for i in range(len(cs))], [s["pure_forward_img_s"] for s in cs], 0.4, label="pure teacher forward")
    a.bar([i + 0.2 for i in range(len(cs))], [s["end_to_end_img_s"] for s in cs], 0.4, label="teacher_cache end to end")
    a.set_yscale("log"), a.set_xticks(range(len(cs)), names)
    a.set_ylabel("img/s"), a.set_title("stage one"), a.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "bench_speed.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, s in res["storage"]["sources"].items():
        soft = [(r["K"], r["total"]) for r in s["rows"].values() if r["K"] > 0]
        line, = a.plot([k for k, _ in soft], [v for _, v in soft], "o-", label=f"{name} soft")
        hard = [r["total"] for r in s["rows"].values() if r["K"] == 0]
        a.axhline(hard[0], color=line.get_color(), ls=":", label=f"{name} hard-only")
    a.set_xscale("log"), a.set_yscale("log")
    a.set_xlabel("K (top-K logits kept)"), a.set_ylabel("bytes per view"), a.set_title("cache storage")
    a.legend(fontsize=7)
    fl = res["flops"]
    student = "deit_small" if "deit_small" in fl["sweep"] else next(iter(fl["sweep"]))
    rows = fl["sweep"][student]
    runs = sorted({r["R"] for r in rows})
    b.plot(runs, [next(r["teacher_online_pflops"] for r in rows if r["R"] == n) for n in runs], "o-k",
           label="online teacher (DeiT)")
    for s in sorted({r["S"] for r in rows}, reverse=True):
        b.plot(runs, [next(r["teacher_cached_pflops"] for r in rows if r["R"] == n and r["S"] == s) for n in runs],
               "o--", label=f"cache of S={s} seeds")
    b.set_xscale("log"), b.set_yscale("log")
    b.set_xticks(runs, [str(n) for n in runs]), b.minorticks_off()
    b.set_xlabel(f"student runs R (E = {fl['setting']['E']} epochs each)"), b.set_ylabel("teacher PFLOPs")
    b.set_title(f"teacher compute, ImageNet-1k, {fl['teacher']['name']}"), b.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "bench_storage_flops.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    if res.get("accuracy"):
        from bench import accuracy
        paths.append(out / "accuracy.png")
        accuracy.plot(res["accuracy"], paths[-1])
    return paths


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke profile: tiny sizes, toy settings only")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--accuracy", type=Path, default=REPO / "bench" / "out" / "accuracy" / "accuracy.json",
                    help="results of python -m bench.accuracy to include (skipped when missing)")
    ap.add_argument("--publish", action="store_true", help="copy results and plots to docs/ for the README")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild report and plots from the benches' JSON files in --out (nothing is measured)")
    args = ap.parse_args(argv)

    import timm
    import torch

    from bench import bench_cache, bench_flops, bench_replay, bench_storage, bench_student

    profile = "quick" if args.quick else "full"
    p = PROFILES[profile]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    steps = [("student", bench_student, p["student"]), ("cache", bench_cache, p["cache"]),
             ("replay", bench_replay, p["replay"]), ("storage", bench_storage, p["storage"]),
             ("flops", bench_flops, p["flops"])]
    for name, mod, extra in steps:
        if args.report_only:
            res[name] = json.loads((out / f"{name}.json").read_text())
            continue
        print(f"\n=== bench.{mod.__name__.split('.')[-1]} {' '.join(extra)}", flush=True)
        t = time.time()
        res[name] = mod.main([*extra, "--out", str(out / f"{name}.json")])
        res[name]["bench_seconds"] = time.time() - t
        save_json(out / f"{name}.json", res[name])
        print(f"=== {name}: {time.time() - t:.0f} s", flush=True)
    if args.accuracy.is_file():
        res["accuracy"] = json.loads(args.accuracy.read_text())
    res["meta"] = {"machine": machine(), "torch": torch.__version__, "timm": timm.__version__, "profile": profile,
                   "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0],
                   "wall_s": sum(res[name].get("bench_seconds", 0.0) for name, _, _ in steps)}
    published = DOCS / "results.json"
    if published.is_file() and not args.quick:
        res["comparison"] = compare(res, json.loads(published.read_text()))
    save_json(out / "results.json", res)
    md = report(res)
    (out / "results.md").write_text(md)
    images = plots(res, out / "img")
    if args.publish:
        if args.quick:
            ap.error("--publish needs the full profile")
        shutil.copy(out / "results.json", published)
        shutil.copy(out / "results.md", DOCS / "results.md")
        (DOCS / "img").mkdir(exist_ok=True)
        for img in images:
            shutil.copy(img, DOCS / "img" / img.name)
    print("\n" + md)
    print(f"-> {out / 'results.json'}, {out / 'results.md'}, {', '.join(str(i) for i in images)}"
          + (" (published to docs/)" if args.publish else ""))
    return res


if __name__ == "__main__":
    main()
