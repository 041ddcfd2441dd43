#!/bin/bash
# Session 9, sequence 1, call B: setup, build, the exact-K fast prefill's tests, prefill
# and decode benchmarks (one process each, baselines in the same run).
D9=$(cd "$(dirname "$0")" && pwd)
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
exec > >(tee -a $OUT/run_b.log) 2>&1
date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv; lscpu | grep "Model name"
bash $D9/stash.sh | tail -2
bash $D9/setup.sh || exit 1
bash $D9/build.sh 2>&1 | tail -3
echo "build done at $(el) s"
source /root/env.sh; cd /root/src; mkdir -p /root/logs; export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEx --tb=short tests/test_cuda.py tests/test_cuda_plan.py -k "prefill_fast or exact_k or rounding or prefill_plan" > $OUT/test_cuda_fast.log 2>&1
echo "fast prefill tests rc=$? at $(el) s"; grep -E "^FAILED|^ERROR|passed|failed" $OUT/test_cuda_fast.log | cut -c1-300 | head -20
timeout 200 python3 bench/bench_cuda.py --decode-n "" --prefill 4096x32768,16384x131072 --methods tq_int4,tq_k5v3,sdpa_fp16 --prefill-variants generic,fast4 --json $OUT/bench_cuda_prefill.json --txt $OUT/bench_cuda_prefill.txt 2>&1 | grep -v Warn
echo "prefill bench done at $(el) s"
timeout 120 python3 bench/bench_cuda.py --decode-n 4096,16384,65536,131072,524288 --prefill "" --methods tq_int4,tq_k5v3,sdpa_fp16 --json $OUT/bench_cuda_decode.json --txt $OUT/bench_cuda_decode.txt 2>&1 | grep -v Warn
echo "decode bench done at $(el) s"
