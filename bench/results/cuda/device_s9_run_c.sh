#!/bin/bash
# (Record of the call as run. Its bare `wait` also waited for the `tee` process
# substitution, so the call reached its 600 s limit after every job had finished (the
# slowest shard took 174 s); a follow-up call collected /root/logs. `wait $PIDS` is the fix.)
# Session 9, sequence 1, call C (after run_b.sh on the same machine): ncu of the decode
# kernels at 128K (kernel time vs the benchmark's per-call time) and of the fast prefill,
# then in parallel: test_sdpa_int4 (8 shards), test_cuda + plan (2 shards), memcheck and
# racecheck of the fast prefill.
D9=$(cd "$(dirname "$0")" && pwd)
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
exec > >(tee -a $OUT/run_c.log) 2>&1
source /root/env.sh; cd /root/src; mkdir -p /root/logs; export PYTHONUNBUFFERED=1
NCU=$(which ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
for m in tq k5v3 fp16; do
  timeout 60 $NCU --clock-control none --cache-control all --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed python3 $D9/ncu_decode.py $m 131072 > /root/logs/ncu_decode_$m.txt 2>&1
  echo "ncu decode $m rc=$? at $(el) s"; grep -E "^\s+[a-zA-Z_].*\(|gpu__time|dram__" /root/logs/ncu_decode_$m.txt | tail -12
done
timeout 60 $NCU --target-processes all -k regex:tq_prefill --launch-skip 1 --launch-count 1 --section SpeedOfLight --section InstructionStats --section WarpStateStats --section Occupancy --section LaunchStats python3 $D9/one_prefill.py > /root/logs/ncu_prefill_fast_exactk.txt 2>&1
echo "ncu prefill rc=$? at $(el) s"; grep -E "Duration|Executed Ipc|Issued Warp|Registers Per|Achieved Occ|Instructions|Compute \(SM\)" /root/logs/ncu_prefill_fast_exactk.txt | head -12
LEFT=$(( 560 - $(el) ))
echo "parallel tests with $LEFT s"
python3 -m pytest --co -q -p no:cacheprovider tests/test_sdpa_int4.py 2>/dev/null | grep "::" > /root/ids.txt
wc -l < /root/ids.txt
rm -f /root/shard_*; split -n r/8 /root/ids.txt /root/shard_
for f in /root/shard_*; do
  timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfEx --tb=short $(cat $f) > /root/logs/sdpa_$(basename $f).log 2>&1 &
done
timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfEx --tb=short tests/test_cuda.py -k "prefill" > /root/logs/test_cuda_prefill.log 2>&1 &
timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfEx --tb=short tests/test_cuda.py tests/test_cuda_plan.py -k "not prefill or plan" > /root/logs/test_cuda_rest.log 2>&1 &
timeout $LEFT compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "(prefill_fast and fast8) or (exact_k and fast)" > /root/logs/sanitizer_memcheck_exactk.log 2>&1 &
timeout $LEFT compute-sanitizer --tool racecheck --racecheck-report analysis --print-limit 20 --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "(prefill_fast and fast8 and (300 or 129 or 150)) or (exact_k and fast8)" > /root/logs/sanitizer_racecheck_exactk.log 2>&1 &
wait
echo "parallel done at $(el) s"
cd /root/logs
for f in *.log; do echo "== $f: $(grep -E ' passed| failed|ERROR SUMMARY|RACECHECK SUMMARY|xfailed|error' $f | tail -2 | tr '\n' ' ')"; done
grep -h "^FAILED\|^ERROR\|^XFAIL\|^XPASS" *.log | cut -c1-250 | head -40
tar -czf $OUT/logs_c.tgz *.log *.txt
echo "all done at $(el) s"
