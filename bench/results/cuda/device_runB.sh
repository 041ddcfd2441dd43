#!/bin/bash
# Session B, call 2: setup, build, smoke, full bench (decode + prefill, all prefill kernels), ncu of the
# fast prefill, then in parallel: test_cuda + plan, test_sdpa_int4 (8 shards), memcheck, racecheck.
C=$(cd "$(dirname "$0")" && pwd)
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
exec > >(tee -a $OUT/runB.log) 2>&1
date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
bash $C/setup.sh || exit 1
bash $C/build.sh 2>&1 | tail -2
echo "build done at $(el) s"
source /root/env.sh
cd /root/src
mkdir -p /root/logs
timeout 100 python3 $C/smoke_prefill.py 2>&1 | grep -v Warn
echo "smoke done at $(el) s"
timeout 200 python3 bench/bench_cuda.py --json $OUT/bench_cuda.json --txt $OUT/bench_cuda.txt 2>&1 | tail -24
echo "bench done at $(el) s"
NCU=$(which ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] && timeout 50 $NCU --target-processes all -k regex:tq_prefill --launch-skip 1 --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy --section InstructionStats --section SourceCounters python3 $C/one_prefill.py > /root/logs/ncu_prefill.txt 2>&1
echo "ncu rc=$? at $(el) s"; grep -E "Duration|Compute \(SM\)|Issue Slots|Tensor|Achieved Occupancy|Registers Per|Issued Warp|Warp Cycles Per Issued|Eligible Warps|stall|Stall" /root/logs/ncu_prefill.txt | head -24
LEFT=$(( 560 - $(el) ))
echo "parallel tests with $LEFT s"
python3 -m pytest --co -q -p no:cacheprovider tests/test_sdpa_int4.py 2>/dev/null | grep "::" > /root/ids.txt
wc -l < /root/ids.txt
rm -f /root/shard_*; split -n r/8 /root/ids.txt /root/shard_
for f in /root/shard_*; do
  timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfEx --tb=short $(cat $f) > /root/logs/sdpa_$(basename $f).log 2>&1 &
done
timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfEx --tb=short tests/test_cuda.py -k prefill > /root/logs/test_cuda_prefill.log 2>&1 &
timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfEx --tb=short tests/test_cuda.py tests/test_cuda_plan.py -k "not prefill or plan" > /root/logs/test_cuda_rest.log 2>&1 &
timeout $LEFT compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "prefill_fast or prefill_long_causal or benchmark_shape or last_axis or repeated_calls or (decode and 333) or (decode and 20001)" > /root/logs/sanitizer_memcheck.log 2>&1 &
timeout $LEFT compute-sanitizer --tool racecheck --racecheck-report analysis --print-limit 20 --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "prefill_fast or prefill_long_causal or benchmark_shape or (decode and 333)" > /root/logs/sanitizer_racecheck.log 2>&1 &
wait
echo "parallel done at $(el) s"
cd /root/logs
for f in *.log; do echo "== $f: $(grep -E ' passed| failed|ERROR SUMMARY|RACECHECK SUMMARY|xfailed' $f | tail -2 | tr '\n' ' ')"; done
grep -h "^FAILED\|^ERROR\|^XFAIL\|^XPASS" *.log | cut -c1-220 | head -40
tar -czf $OUT/logs.tgz *.log *.txt
echo "all done at $(el) s"
