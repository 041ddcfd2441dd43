#!/bin/bash
# Session A, call 2: setup, build, smoke of the fast prefill, prefill bench (all kernels), ncu,
# then in parallel: test_cuda (2 shards), test_sdpa_int4 (8 shards), memcheck + racecheck of the fast prefill.
C=$(cd "$(dirname "$0")" && pwd)
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
exec > >(tee -a $OUT/runA.log) 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
bash $C/setup.sh || exit 1
bash $C/build.sh 2>&1 | tail -3
echo "build done at $(el) s"
source /root/env.sh
cd /root/src
timeout 120 python3 $C/smoke_prefill.py 2>&1 | grep -v Warn
echo "smoke done at $(el) s"
timeout 150 python3 bench/bench_cuda.py --decode-n 131072 --prefill 4096x32768,16384x131072 --json $OUT/bench_prefill.json --txt $OUT/bench_prefill.txt 2>&1 | tail -14
echo "bench done at $(el) s"
NCU=$(which ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] && timeout 60 $NCU --target-processes all -k regex:tq_prefill --launch-skip 1 --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats --section InstructionStats python3 $C/one_prefill.py > $OUT/ncu_prefill.txt 2>&1
echo "ncu rc=$? at $(el) s"; grep -E "Duration|Throughput|Achieved Occupancy|Registers Per|Stall|Issued Warp|Warp Cycles|Eligible|Theoretical Occ|Block Limit|Executed Ipc|Pipe" $OUT/ncu_prefill.txt | head -40
LEFT=$(( 575 - $(el) ))
python3 -m pytest --co -q -p no:cacheprovider tests/test_sdpa_int4.py 2>/dev/null | grep "::" > /root/ids.txt
wc -l < /root/ids.txt
rm -f /root/shard_*; split -n r/8 /root/ids.txt /root/shard_
for f in /root/shard_*; do
  timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfE --tb=short $(cat $f) > $OUT/sdpa_$(basename $f).log 2>&1 &
done
timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_cuda.py -k "prefill" > $OUT/test_cuda_prefill.log 2>&1 &
timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_cuda.py tests/test_cuda_plan.py -k "not prefill or plan" > $OUT/test_cuda_rest.log 2>&1 &
timeout $LEFT compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "prefill_fast and not generic and (L=300 or L=150 or L=40)" > $OUT/sanitizer_memcheck_prefill.log 2>&1 &
timeout $LEFT compute-sanitizer --tool racecheck --racecheck-report analysis --print-limit 20 --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "prefill_fast and not generic and (L=300 or L=150)" > $OUT/sanitizer_racecheck_prefill.log 2>&1 &
wait
echo "parallel done at $(el) s"
for f in $OUT/test_cuda_*.log $OUT/sdpa_*.log $OUT/sanitizer_*.log; do echo "== $(basename $f): $(grep -E 'passed|failed|ERROR SUMMARY|RACECHECK SUMMARY' $f | tail -2 | tr '\n' ' ')"; done
grep -h "^FAILED\|^ERROR" $OUT/*.log | head -40
