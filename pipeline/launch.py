"""`python -m pipeline.launch <stage> [nproc=N] [--params FILE] [overrides]`: one process, or torchrun over NPROC
processes per node, on one node or several (stages/launch.sh runs this; its header lists the environment).

The configuration is composed and checked here once, before any rank starts, so a config error is one line and
exit 2 at any scale. A user error raised in the ranks ends the same way: each distinct line once (every rank
would print it), instead of torchrun's failure report; a crash keeps that report and the ranks' tracebacks. A
run stopped by SIGTERM or SIGINT (Ctrl-C, a scheduler's time limit) stops its ranks and says so in one line,
exit 128 + the signal's number.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from pipeline import cli

STAGES = ("make_shards", "train_teacher", "teacher_cache", "verify_cache", "train_student", "evaluate", "export")


def torchrun_args(env: dict, nproc: int, stage: str, args: list[str]) -> list[str]:
    """torchrun's command line for ``NNODES`` nodes of ``nproc`` ranks (a UserError when the rendezvous is unset)."""
    from pipeline.errors import ConfigError

    nnodes = int(env.get("NNODES") or 1)
    if nnodes == 1:
        rdzv = ["--standalone"]
    elif env.get("RDZV_ENDPOINT"):  # torchrun ranks the nodes: the same command on every node, in any order
        rdzv = [f"--rdzv-id={env.get('RDZV_ID') or 'pipeline-' + stage}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={env['RDZV_ENDPOINT']}"]
    elif env.get("MASTER_ADDR"):
        rdzv = [f"--rdzv-id={env.get('RDZV_ID') or 'pipeline-' + stage}", f"--master-addr={env['MASTER_ADDR']}",
                f"--master-port={env.get('MASTER_PORT') or 29500}", f"--node-rank={env.get('NODE_RANK') or 0}"]
    else:
        raise ConfigError(f"NNODES={nnodes} needs MASTER_ADDR (and MASTER_PORT, NODE_RANK) or RDZV_ENDPOINT "
                          "(and RDZV_ID)")
    return [f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", *rdzv, "-m", f"pipeline.{stage}", *args]


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    stage, args = argv[0], argv[1:]
    with cli.stage("launch"):
        from pipeline.compose import compose, split_params
        from pipeline.config import validate
        from pipeline.errors import ConfigError

        if stage not in STAGES:
            raise ConfigError(f"{stage}: not a stage (one of {', '.join(STAGES)})")
        nproc = os.environ.get("NPROC")
        if args and args[0].startswith("nproc="):  # the stage's own setting (dvc.yaml); env NPROC wins
            nproc = nproc or args[0].split("=", 1)[1]
            args = args[1:]
        nproc = int(nproc or 1)
        if "--help" not in args and "-h" not in args:
            params, overrides = split_params(args)
            with cli.stage(stage):
                validate(compose(overrides, params))
        command = torchrun_args(os.environ, nproc, stage, args)
    if command[:2] == ["--nnodes=1", "--nproc-per-node=1"]:
        os.execv(sys.executable, [sys.executable, "-m", f"pipeline.{stage}", *args])
    # Spinning OpenMP threads on shared cores made CPU ranks ~30x slower: ranks yield when idle. One thread per
    # rank is torchrun's own default (set here, it skips torchrun's warning); the stages size their threads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(_torchrun(stage, command))


def _torchrun(stage: str, command: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    import logging

    # torchrun logs each failed rank's exit code; a user error is reported below, a crash by the re-raise.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    folder = tempfile.mkdtemp(prefix="pipeline-rank-errors-")
    os.environ[cli.RANK_ERRORS] = folder
    try:
        run(get_args_parser().parse_args(command))
        return 0
    except ChildFailedError as exc:
        lines = sorted({p.read_text().strip() for p in Path(folder).glob("rank-*")} - {""})
        crashed = [f for f in exc.failures.values() if f.exitcode not in (2,) and f.exitcode > 0]
        if not lines or crashed:
            raise
        for line in lines:
            print(line, file=sys.stderr)
        return 2
    except SignalException as exc:  # torchrun has stopped the ranks by now
        print(cli.stopped_line(stage, exc.sigval, ranks=True), file=sys.stderr)
        return 128 + int(exc.sigval)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
