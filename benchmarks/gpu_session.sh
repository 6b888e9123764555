#!/usr/bin/env bash
# One GPU session in one call of the device tool (no network there; at most 10 minutes):
#
#   bash benchmarks/gpu_session.sh [PYTEST_ARGS] [python -m benchmarks speed arguments...]
#
# PYTEST_ARGS is one string, split on spaces (default: the CUDA-relevant tests, $CUDA_TESTS;
# "skip" runs no tests); it can also come from the environment. Further arguments go to
# `python -m benchmarks speed --device cuda` (default: --steps 10 --warmup 2).
# Expects the peers in .peers/ (a git-ignored copy of ../shared/peers, sent with carry
# [".peers"]) and carries on without them. Everything lands in $OUT (9 files, no folders):
#   env.txt        GPU, driver, python, torch, triton, the checkout's commit
#   setup.log      installing the peer wheels into /tmp/site
#   build.log      building sail-sg's CUDA extension in .peers/sail-sg-adan
#   tests.log      pytest
#   lowmem.md      python -m benchmarks lowmem training --device cuda: peak memory and time per
#                  iteration with and without gradient release (GPT-2 small's depth and width)
#   lowmem.log     its progress lines
#   speed.md       the benchmark's markdown tables (stdout)
#   speed.log      its progress lines and warnings (stderr)
#   speed.json     every result (rewritten after each row, so a cut-off run keeps its rows)
# Time limits (seconds from the start of this script): tests stop at TESTS_UNTIL (default 200),
# the memory benchmark at LOWMEM_UNTIL (default 260); the speed benchmark is interrupted at
# BENCH_UNTIL (default 440) and still prints what it measured, so that one call fits in
# ~8 minutes and leaves device time for one short rerun.
set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu-session-out}
mkdir -p "$OUT"
# The tests whose CUDA cases the GPU decides: the Triton kernel's, its host side's (CUDA
# graphs, two devices) and its first-use self-check, the CUDA ones of the optimizer, gradient
# release and reproducibility, and the benchmark's.
CUDA_TESTS="tests/kernels/test_cuda_triton.py tests/kernels/test_cuda_host.py
 tests/kernels/test_selfcheck.py
 tests/test_optimizer.py tests/test_release.py tests/test_reproducible.py
 tests/bench/test_speed.py tests/bench/test_lowmem_bench.py"
PYTEST_ARGS=${1:-${PYTEST_ARGS:-$CUDA_TESTS}}
shift $(( $# > 0 ? 1 : 0 ))
[ $# -gt 0 ] || set -- --steps 10 --warmup 2
TESTS_UNTIL=${TESTS_UNTIL:-200}
LOWMEM_UNTIL=${LOWMEM_UNTIL:-260}
BENCH_UNTIL=${BENCH_UNTIL:-440}
left() { local s=$(( $1 - SECONDS )); echo $(( s > 30 ? s : 30 )); }
say() { echo "== [$(printf '%4d' "$SECONDS") s] $*"; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv
  python3 -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  python3 -c 'import triton; print("triton", triton.__version__)'
  git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null
  ls -la "$ROOT/.peers" 2>&1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

BUILD_PID=
if [ -d .peers ]; then
  chmod -R u+w .peers 2> /dev/null  # copies of the read-only shared folder; the build writes
  say "installing the peer wheels into /tmp/site"
  if ls .peers/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .peers/*.whl \
      > "$OUT/setup.log" 2>&1 || say "pip install failed (see setup.log); continuing"
  else
    echo "no wheels in .peers" > "$OUT/setup.log"
  fi
  if [ -f .peers/sail-sg-adan/setup.py ]; then
    say "building sail-sg's fused_adan in the background (build.log)"
    ( cd .peers/sail-sg-adan && TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
        MAX_JOBS=${MAX_JOBS:-8} python3 setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1 &
    BUILD_PID=$!
  fi
else
  say "no .peers folder: the peer rows will be skipped. To include them, copy ../shared/peers" \
      "to .peers, list /.peers/ in .git/info/exclude and pass carry [\".peers\"]"
fi
export PYTHONPATH=/tmp/site:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}

if [ "$PYTEST_ARGS" = skip ]; then
  say "tests skipped"
else
  say "pytest $PYTEST_ARGS (stops at ${TESTS_UNTIL} s; tests.log)"
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words on purpose
  timeout -s INT -k 15 "$(left "$TESTS_UNTIL")" python3 -m pytest -q -rfEs \
    --continue-on-collection-errors -p no:cacheprovider $PYTEST_ARGS > "$OUT/tests.log" 2>&1
  say "pytest exit status $?"
  tail -n 25 "$OUT/tests.log"
fi

if [ -n "$BUILD_PID" ]; then
  if wait "$BUILD_PID"; then say "sail-sg build done"; else
    say "sail-sg build failed (its fused rows will be skipped):"; tail -n 15 "$OUT/build.log"; fi
fi

say "python -m benchmarks lowmem training --device cuda (stops at ${LOWMEM_UNTIL} s; lowmem.md)"
timeout -s INT -k 10 "$(left "$LOWMEM_UNTIL")" python3 -m benchmarks lowmem training \
  --device cuda --layers 12 --embd 768 --batch 8 --block 256 --repeats 21 \
  > "$OUT/lowmem.md" 2> "$OUT/lowmem.log"
say "memory benchmark exit status $?"
cat "$OUT/lowmem.md"

say "python -m benchmarks speed --device cuda $* (interrupted at ${BENCH_UNTIL} s)"
timeout -s INT -k 20 "$(left "$BENCH_UNTIL")" python3 -m benchmarks speed --device cuda \
  --json "$OUT/speed.json" "$@" 2> "$OUT/speed.log" | tee "$OUT/speed.md"
STATUS=$?
say "benchmark exit status $STATUS; last lines of speed.log:"
tail -n 20 "$OUT/speed.log"
ls -la "$OUT"
exit "$STATUS"
