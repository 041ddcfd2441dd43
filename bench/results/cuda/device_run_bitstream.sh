#!/bin/bash
# Session C (bit streams), call 2: setup, build, K5V3 decode bench, ncu of the K5V3 decode,
# then in parallel: test_cuda + plan (2 shards), test_sdpa_int4 (8 shards), memcheck, racecheck.
D4=$(cd "$(dirname "$0")" && pwd)
C=$(dirname "$D4")
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
export PYTHONUNBUFFERED=1
timeout 150 python3 bench/bench_cuda.py --decode-n 4096,16384,65536,131072 --prefill "" --methods tq_int4,tq_k5v3,sdpa_fp16 --json $OUT/bench_cuda_k5v3.json --txt $OUT/bench_cuda_k5v3.txt 2>&1 | grep -v Warn
echo "bench done at $(el) s"
NCU=$(which ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] && timeout 45 $NCU --target-processes all -k regex:tq_decode_partial --launch-skip 1 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats python3 $D4/one_decode53.py > /root/logs/ncu_decode_k5v3.txt 2>&1
echo "ncu rc=$? at $(el) s"; grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Theoretical Occ" /root/logs/ncu_decode_k5v3.txt | head -12
LEFT=$(( 570 - $(el) ))
echo "parallel tests with $LEFT s"
python3 -m pytest --co -q -p no:cacheprovider tests/test_sdpa_int4.py 2>/dev/null | grep "::" > /root/ids.txt
wc -l < /root/ids.txt
rm -f /root/shard_*; split -n r/8 /root/ids.txt /root/shard_
for f in /root/shard_*; do
  timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfEx --tb=short $(cat $f) > /root/logs/sdpa_$(basename $f).log 2>&1 &
done
timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfEx --tb=short tests/test_cuda.py -k "prefill" > /root/logs/test_cuda_prefill.log 2>&1 &
timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfEx --tb=short tests/test_cuda.py tests/test_cuda_plan.py -k "not prefill or plan" > /root/logs/test_cuda_rest.log 2>&1 &
timeout $LEFT compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "decode_bit_stream or prefill_bit_stream or (test_prefill and 80)" > /root/logs/sanitizer_memcheck.log 2>&1 &
timeout $LEFT compute-sanitizer --tool racecheck --racecheck-report analysis --print-limit 20 --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "(decode_bit_stream and (333 or 777 or 45)) or (prefill_bit_stream and (300 or 77 or 130))" > /root/logs/sanitizer_racecheck.log 2>&1 &
wait
echo "parallel done at $(el) s"
cd /root/logs
for f in *.log; do echo "== $f: $(grep -E ' passed| failed|ERROR SUMMARY|RACECHECK SUMMARY|xfailed|error' $f | tail -2 | tr '\n' ' ')"; done
grep -h "^FAILED\|^ERROR\|^XFAIL\|^XPASS" *.log | cut -c1-250 | head -60
tar -czf $OUT/logs.tgz *.log *.txt
echo "all done at $(el) s"
