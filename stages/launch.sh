#!/usr/bin/env bash
# `stages/launch.sh <stage> [nproc=N] [--params params.yaml] [overrides...]`: one process, or torchrun over NPROC
# processes per node, on one node or several (pipeline/launch.py). dvc.yaml runs every stage through it, with
# --params params.yaml; by hand it composes pipeline/conf/ with your overrides, like `python -m pipeline.<stage>`.
#
# Environment (all optional; the defaults are one process on this machine):
#   NPROC          processes on this node (one per GPU), default 1 (or the stage's nproc=<n>)
#   NNODES         number of nodes, default 1 (one node: `torchrun --standalone` when NPROC > 1)
#   NODE_RANK      this node's rank 0..NNODES-1, default 0 (with MASTER_ADDR; with RDZV_ENDPOINT torchrun ranks
#                  the nodes itself). Where global rank 0 runs changes no output (it takes the cache store's
#                  lease and writes metrics and checkpoints, on the shared filesystem).
#   MASTER_ADDR    with NNODES>1: host of node 0 (static rendezvous), e.g. from `scontrol show hostnames`
#   MASTER_PORT    its port, default 29500
#   RDZV_ENDPOINT  with NNODES>1, instead of MASTER_ADDR: host:port of a c10d rendezvous (e.g. node0:29400);
#                  the same command on every node, started in any order (a node at that host serves it)
#   RDZV_ID        the job's rendezvous id, the same on every node (default: pipeline-<stage>)
#   OMP_WAIT_POLICY  default PASSIVE under torchrun (CPU ranks sharing cores yield when idle)
#   PYTHON         the interpreter (default: .venv/bin/python when present, else python3)
# Every node runs the same command with its own NODE_RANK, from a checkout on a shared filesystem: the shards, the
# cache store (its writer lease is a file lock beside it) and train.out_dir must be the same paths on every node
# (README.md, "From one box to many").
set -euo pipefail
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
exec "$py" -m pipeline.launch "$@"
