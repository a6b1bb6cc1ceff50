#!/usr/bin/env bash
# Launch glue for dvc.yaml: `stages/launch.sh <module> [hydra overrides...]`.
# One process, or torchrun over NPROC processes (env NPROC, else the stage's own setting passed as
# nproc=<n> first argument), so one dvc.yaml serves a laptop and an 8-GPU box.
set -euo pipefail
module="$1"; shift
nproc="${NPROC:-1}"
if [[ "${1:-}" == nproc=* ]]; then
  [[ -z "${NPROC:-}" ]] && nproc="${1#nproc=}"
  shift
fi
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
# Under DVC the composed params.yaml is the configuration (dvc exp run -S ... rewrites it); elsewhere conf/.
cfg=()
if [[ -f params.yaml && -f dvc.yaml ]]; then
  cfg=(--config-path "$PWD" --config-name params "hydra.run.dir=outputs/hydra/$module")
fi
if [[ "$nproc" -gt 1 ]]; then
  # Spinning OpenMP threads on shared cores made CPU runs ~30x slower: ranks yield when idle.
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
  exec "$py" -m torch.distributed.run --standalone --nproc-per-node="$nproc" -m "pipeline.$module" "${cfg[@]}" "$@"
fi
exec "$py" -m "pipeline.$module" "${cfg[@]}" "$@"
