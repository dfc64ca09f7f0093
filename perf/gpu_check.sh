#!/usr/bin/env bash
# One GPU check (gpu.md section 3): the GPU test subset with compiled kernels,
# then the benchmarks; results (markdown + JSON, tagged with GPU, clocks,
# driver, versions, commit) go to $OUT (the device tool) or perf/results/.
# Nothing is installed: run from the checkout with PYTHONPATH=. and the
# machine's own torch/triton. The timeouts below add up to under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET TRITONFP8_BACKEND
stamp="$(date +%Y%m%d)-$(git rev-parse --short HEAD 2>/dev/null || echo nogit)"
out="${OUT:-perf/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv > "$out/gpu-$stamp.csv" 2>&1
# GPU test subset: exact casts vs the reference, products vs fp64, modules fwd+bwd (files that exist).
tests=$(ls tests/test_cast_*.py tests/test_stochastic.py tests/test_matmul.py tests/test_modules*.py tests/test_optim.py tests/test_loss_scaler.py tests/test_attention.py tests/test_autocast.py 2>/dev/null)
timeout 180 python -m pytest -q $tests > "$out/tests-$stamp.txt" 2>&1
echo "tests exit: $?" >> "$out/tests-$stamp.txt"
timeout 60 python perf/bench_quantize.py --out "$out/quantize-$stamp"
[ -f perf/bench_gemm.py ] && timeout 120 python perf/bench_gemm.py --quick --out "$out/gemm-$stamp"
[ -f perf/bench_attention.py ] && timeout 60 python perf/bench_attention.py --out "$out/attention-$stamp"
[ -f perf/bench_modules.py ] && timeout 45 python perf/bench_modules.py --out "$out/modules-$stamp"
exit 0
