"""bench.scale's results as the markdown table it prints and writes beside its JSON."""

from __future__ import annotations

import numpy as np


def rows(res: dict) -> list[str]:
    out = []
    for backend in ("disk", "s3"):
        for mode, r in res[backend].items():
            f = r["files"]
            for w, wr in r["write"].items():
                out.append(f"| {backend} | {mode} | {r['N']:,} x S={r['seeds']} | write, {w} writer(s) | "
                           f"{np.mean(wr['views_s_per_process']):,.0f} views/s per writer "
                           f"({np.mean(wr['views_per_cpu_s']):,.0f} per CPU second), "
                           f"{wr['views_s_total']:,.0f} total ({wr['targets_share']:.0%} of it computing targets) |")
            for n, rd in r["read"].items():
                out.append(f"| {backend} | {mode} | {r['N']:,} x S={r['seeds']} | read, {n} rank(s) | "
                           f"{np.mean(rd['views_s_per_process']):,.0f} targets/s per rank "
                           f"({np.mean(rd['views_per_cpu_s']):,.0f} per CPU second), "
                           f"{rd['views_s_total']:,.0f} total |")
            out.append(f"| {backend} | {mode} | {r['N']:,} x S={r['seeds']} | open (consolidated) / resume scan / "
                       f"check | {r['open']['best_s']:.3f} s ({r['open_consolidated']['best_s']:.3f} s) / "
                       f"{r['scan']['seconds']:.3f} s ({r['scan']['units']:,} units, "
                       f"{r['scan']['us_per_unit']:.0f} us each) / {r['check']['ms_per_unit']:.1f} ms per unit |")
            rc = r["resume_check"]
            out.append(f"| {backend} | {mode} | {r['N']:,} x S={r['seeds']} | resume's default check | "
                       f"{rc['seconds']:.2f} s ({rc['units']:,} units' records and files, the bytes of "
                       f"{rc['bytes_checked']}) |")
            out.append(f"| {backend} | {mode} | {r['N']:,} x S={r['seeds']} | files, bytes | "
                       f"{f['files_per_unit']:.2f} files per unit, {f['files_per_seed']:,.0f} per seed, "
                       f"{f['bytes_per_seed'] / 1e6:.1f} MB per seed |")
            if "imagenet_S300" in r:
                d = r["imagenet_S300"]
                out.append(f"| {backend} | {mode} | ImageNet-1k x S=300 (derived) | files, GB, resume | "
                           f"{d['chunk_files']:,.0f} files ({d['files_per_unit']:.2f} per unit), {d['GB']:.1f} GB, "
                           f"full check {d['integrity_pass_s'] / 3600:.1f} h, resume's sample "
                           f"{d['resume_sample_s']:.1f} s |")
    if "disk_scan" in res:
        d = res["disk_scan"]
        out.append(f"| disk | hard | markers, {d['units']:,} units | resume scan | {d['seconds']:.2f} s "
                   f"({d['us_per_unit']:.1f} us per unit) |")
        m = d["metadata"]
        out.append(f"| disk | hard | records and files, {m['units']:,} units | resume's metadata check | "
                   f"{m['seconds']:.2f} s ({m['us_per_unit']:.1f} us per unit) |")
    return out


def table(res: dict) -> str:
    t = res["targets"]
    head = [f"Machine: {res['machine']}; load average {res['load_avg_start']:.1f} at the start, "
            f"{res['load_avg_end']:.1f} at the end. Targets of 1000 views (K=10, C=1000): "
            f"{t['targets_ms']:.1f} CPU ms (the full stable sort they replace: {t['full_sort_ms']:.1f} ms).", "",
            "| store | mode | size | what | measured |", "|---|---|---|---|---|"]
    return "\n".join(head + rows(res))
