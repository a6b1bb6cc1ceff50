#!/usr/bin/env bash
# Launch glue for dvc.yaml: `stages/launch.sh <module> [hydra overrides...]`.
# One process, or torchrun over NPROC processes per node (env NPROC, else the stage's own setting passed as
# nproc=<n> first argument), on one node or several, so one dvc.yaml serves a laptop, an 8-GPU box and a cluster.
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
#   RDZV_ID        the job's rendezvous id, the same on every node (default: pipeline-<module>)
#   OMP_WAIT_POLICY  default PASSIVE under torchrun (CPU ranks sharing cores yield when idle)
# Every node runs the same command with its own NODE_RANK, from a checkout on a shared filesystem: the shards, the
# cache store (its writer lease is a file lock beside it) and train.out_dir must be the same paths on every node
# (README.md, "From one box to many").
set -euo pipefail
module="$1"; shift
nproc="${NPROC:-1}"
if [[ "${1:-}" == nproc=* ]]; then
  [[ -z "${NPROC:-}" ]] && nproc="${1#nproc=}"
  shift
fi
nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-0}"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
# Under DVC the composed params.yaml is the configuration (dvc exp run -S ... rewrites it); elsewhere conf/.
cfg=()
if [[ -f params.yaml && -f dvc.yaml ]]; then
  cfg=(--config-path "$PWD" --config-name params "hydra.run.dir=outputs/hydra/$module")
fi
if [[ "$nnodes" -gt 1 ]]; then
  # The job id names the run in the cache store's writer lease record (TORCHELASTIC_RUN_ID).
  rdzv=(--rdzv-id="${RDZV_ID:-pipeline-$module}")
  if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    rdzv+=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT")  # torchrun ranks the nodes: no --node-rank
  elif [[ -n "${MASTER_ADDR:-}" ]]; then
    rdzv+=(--master-addr="$MASTER_ADDR" --master-port="${MASTER_PORT:-29500}" --node-rank="$node_rank")
  else
    echo "stages/launch.sh: NNODES=$nnodes needs MASTER_ADDR (and MASTER_PORT) or RDZV_ENDPOINT (and RDZV_ID)" >&2
    exit 2
  fi
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
  exec "$py" -m torch.distributed.run --nnodes="$nnodes" --nproc-per-node="$nproc" "${rdzv[@]}" \
    -m "pipeline.$module" "${cfg[@]}" "$@"
fi
if [[ "$nproc" -gt 1 ]]; then
  # Spinning OpenMP threads on shared cores made CPU runs ~30x slower: ranks yield when idle.
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
  exec "$py" -m torch.distributed.run --standalone --nproc-per-node="$nproc" -m "pipeline.$module" "${cfg[@]}" "$@"
fi
exec "$py" -m "pipeline.$module" "${cfg[@]}" "$@"
