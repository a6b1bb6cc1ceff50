#!/usr/bin/env bash
# The GPU checks as one command, for any machine with an NVIDIA GPU and a CUDA build of torch:
#
#   OUT=/tmp/gpu bench/gpu_session.sh run   # on the GPU machine, in this checkout (project installed, or see
#                                           # `wheels`): three phases under one deadline, each with its own
#                                           # timeout, so one that breaks leaves the rest; logs and gpu.json in $OUT
#   bench/gpu_session.sh wheels             # only for a GPU machine without network or our dependencies (torch and
#                                           # timm there): on a machine with network, our dependencies at the
#                                           # versions this venv runs, as wheels for its Python (TARGET_PY, default
#                                           # this venv's) in .whl/ (git-ignored); copy the checkout with .whl/ over
#                                           # and `run` installs them into /tmp/site first
#
# Phases of `run` (BUDGET s for the three, default 555; BENCH_S of them, default 200, kept for the bench):
#   1. the CUDA tests (tests/test_batched.py::TestCuda: nvJPEG decode, per-op pixels vs the CPU path, digests,
#      teacher agreement; tests/test_cuda_streams.py: the batched render, model_input and the teacher's read-back
#      do not make the host or the device wait, and nvJPEG never overwrites memory queued kernels still read);
#   2. every stage once for real on CUDA: make_shards, train_teacher (torch.compile), teacher_cache (bf16,
#      channels_last), train_student under torchrun with one NCCL rank (torch.compile, batched backend allowed),
#      evaluate; the toy set, so the stages run end to end in seconds;
#   3. `python -m bench.gpu` (224 px, bf16, batch 256): $OUT/gpu.json and the table.
# Environment: OUT (required), PY (the Python to run, default python3), BUDGET, BENCH_S, SMOKE.
# A dry run of the whole flow on CPU (tiny sizes, no numbers; tests/test_gpu_session.py runs it):
#   SMOKE=1 OUT=/tmp/gs bench/gpu_session.sh run
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
WHEELS=(webdataset braceexpand zarr donfig numcodecs google-crc32c hydra-core omegaconf simplejpeg timm)

wheels() {
  local venv_py="${PY:-.venv/bin/python}" specs=() name version target
  target="${TARGET_PY:-$("$venv_py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}"
  for name in "${WHEELS[@]}"; do
    version=$("$venv_py" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    [[ -n "$version" ]] || { echo "gpu_session: $name is not installed in $venv_py" >&2; exit 2; }
    specs+=("$name==$version")
  done
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  "$venv_py" -m pip download -q --no-deps --only-binary=:all: --python-version "$target" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${specs[@]}" || exit 2
  # hydra's grammar runtime is published as a source archive only: build its (pure Python) wheel here
  version=$("$venv_py" -m pip show antlr4-python3-runtime | sed -n 's/^Version: //p')
  "$venv_py" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$version" || exit 2
  echo "$target" > .whl/python-version
  ls -la .whl && du -sh .whl
}

phase() {  # phase <name> <seconds> <command...>: logged to $OUT/<name>.log, status kept, the run goes on
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit} s) ===" | tee -a "$OUT/summary.txt"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s ===" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}

stages() {  # phase 2: each stage once on the device, the toy set; each stage's seconds in the log (compile shows)
  local py="$1" dev="$2" w="$3"; shift 3
  local data=("workdir=$w" "data.train_size=${TRAIN_N:-2048}" "data.val_size=512")
  set -e
  step make_shards "$py" -m pipeline.make_shards "${data[@]}"
  step train_teacher "$py" -m pipeline.train_teacher "${data[@]}" "teacher.train.epochs=2" "teacher.train.device=$dev" \
    "teacher.train.compile=$COMPILE" "teacher.train.dvclive=false" "$@"
  step teacher_cache "$py" -m pipeline.teacher_cache "${data[@]}" "cache.num_seeds=2" "cache.device=$dev" \
    "teacher.compile=$COMPILE" "$@"
  step train_student "$py" -m torch.distributed.run --standalone --nproc-per-node 1 -m pipeline.train_student \
    "${data[@]}" "cache.num_seeds=2" "train.epochs=2" "train.device=$dev" "train.compile=$COMPILE" \
    "train.dvclive=false" "replay.backend=batched" "replay.allow_backend_mismatch=true" "$@"
  step evaluate "$py" -m pipeline.evaluate "${data[@]}" "cache.num_seeds=2" "train.epochs=2" "$@"
  cat "$w"/runs/cache/*.json "$w"/runs/student/*/eval.json   # a run by hand keeps its metrics beside it
}

step() {  # step <name> <command...>: run it, then log its seconds (a failure stops phase 2 under set -e)
  local name="$1" t0=$SECONDS; shift
  "$@"
  echo "--- $name: $((SECONDS - t0)) s"
}

run() {
  OUT="${OUT:?set OUT to the folder for logs}"
  mkdir -p "$OUT"
  local py="${PY:-python3}"
  # wheels from `wheels` are installed where their Python runs (a machine with our dependencies ignores them)
  local here
  here=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if compgen -G ".whl/*.whl" > /dev/null && [[ "$(cat .whl/python-version 2>/dev/null)" == "$here" ]]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 2
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
  local dev=cuda bench=() tests=(tests/test_batched.py tests/test_cuda_streams.py -k Cuda)
  COMPILE=true
  if [[ -n "${SMOKE:-}" ]]; then  # the flow on CPU: CUDA tests skip, stages on CPU without compile, bench smoke
    dev=cpu COMPILE=false TRAIN_N=256 bench=(--smoke --device cpu --students deit_tiny --workers 1 --batch 4 --steps 1 --warmup 1
      --teacher regnety_002)  # the stock 200MF RegNetY: regnety_160 at 224 px took 100 s of this dry run on CPU
  fi
  export COMPILE TRAIN_N="${TRAIN_N:-2048}"
  { date; nvidia-smi 2>&1 | head -15; "$py" -c "import torch, timm, zarr; print('torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.is_available(), 'timm', timm.__version__, 'zarr', zarr.__version__)"; nproc; } \
    | tee "$OUT/summary.txt"
  # one deadline for the three phases (BUDGET s): the stages get what the tests left but BENCH_S, the bench all the
  # rest, so time that torch.compile does not take in phase 2 goes to phase 3 (bench.gpu saves each row as it goes)
  local end=$((SECONDS + ${BUDGET:-555})) bench_s=${BENCH_S:-200}
  phase cuda_tests 90 "$py" -m pytest -q -x -p no:cacheprovider "${tests[@]}"
  phase stages $((end - SECONDS - bench_s)) bash "$SELF" stages "$py" "$dev" "$(mktemp -d)"
  phase bench_gpu $((end - SECONDS)) "$py" -m bench.gpu --out "$OUT/gpu.json" "${bench[@]}"
}

case "${1:-}" in
  wheels) wheels ;;
  run) run ;;
  stages) shift; stages "$@" ;;  # phase 2 alone (run calls it under its timeout)
  *) sed -n '2,24p' "$SELF"; exit 2 ;;
esac
