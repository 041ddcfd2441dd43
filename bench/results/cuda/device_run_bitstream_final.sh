#!/bin/bash
# Session C (bit streams), call 4: setup, build, decode bench (K5V3, int4, fp16), K5V3 decode
# tuning sweep (+ int4 default), then in parallel: test_sdpa_int4 (8 shards), test_cuda (2 shards),
# memcheck of the bit-stream decode under two pipelined tunings.
D4=$(cd "$(dirname "$0")" && pwd)
C=$(dirname "$D4")
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
exec > >(tee -a $OUT/runC.log) 2>&1
date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
bash $C/setup.sh || exit 1
bash $C/build.sh 2>&1 | tail -2
echo "build done at $(el) s"
source /root/env.sh
cd /root/src
mkdir -p /root/logs
export PYTHONUNBUFFERED=1
timeout 100 python3 bench/bench_cuda.py --decode-n 4096,16384,65536,131072 --prefill "" --methods tq_int4,tq_k5v3,sdpa_fp16 --json $OUT/bench_cuda_k5v3.json --txt $OUT/bench_cuda_k5v3.txt 2>&1 | grep -v Warn
echo "bench done at $(el) s"
timeout 110 python3 bench/tune_cuda_decode.py --kv-bits 5,3 --n 32768,131072 --configs "default;1,4,3,3,0;1,0,3,6,0;1,2,3,6,0;1,0,2,2,1;1,4,2,2,1;2,4,2,2,1;1,0,4,4,0" --json /root/logs/tune_k5v3.json 2>&1 | grep -v Warn | tee /root/logs/tune_k5v3.txt
timeout 40 python3 bench/tune_cuda_decode.py --kv-bits 4,4 --n 32768,131072 --configs "default" 2>&1 | grep -v Warn | tee /root/logs/tune_int4.txt
echo "tune done at $(el) s"
LEFT=$(( 575 - $(el) ))
echo "parallel tests with $LEFT s"
python3 -m pytest --co -q -p no:cacheprovider tests/test_sdpa_int4.py 2>/dev/null | grep "::" > /root/ids.txt
wc -l < /root/ids.txt
rm -f /root/shard_*; split -n r/8 /root/ids.txt /root/shard_
PIDS=""
for f in /root/shard_*; do
  timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfEx --tb=short $(cat $f) > /root/logs/sdpa_$(basename $f).log 2>&1 & PIDS="$PIDS $!"
done
timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfEx --tb=short tests/test_cuda.py -k "prefill" > /root/logs/test_cuda_prefill.log 2>&1 & PIDS="$PIDS $!"
timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfEx --tb=short tests/test_cuda.py tests/test_cuda_plan.py -k "not prefill or plan" > /root/logs/test_cuda_rest.log 2>&1 & PIDS="$PIDS $!"
TQMETAL_CUDA_DECODE=1,4,2,2,1 timeout $LEFT compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "decode_bit_stream" > /root/logs/sanitizer_memcheck_pipe.log 2>&1 & PIDS="$PIDS $!"
TQMETAL_CUDA_DECODE=2,4,2,2,1 timeout $LEFT compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "decode_bit_stream" > /root/logs/sanitizer_memcheck_tl2.log 2>&1 & PIDS="$PIDS $!"
timeout $LEFT compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "decode_bit_stream or prefill_bit_stream" > /root/logs/sanitizer_memcheck.log 2>&1 & PIDS="$PIDS $!"
timeout $LEFT compute-sanitizer --tool racecheck --racecheck-report analysis --print-limit 20 --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "(decode_bit_stream and (333 or 777 or 45)) or (prefill_bit_stream and (300 or 77 or 130))" > /root/logs/sanitizer_racecheck.log 2>&1 & PIDS="$PIDS $!"
wait $PIDS
echo "parallel done at $(el) s"
cd /root/logs
for f in *.log; do echo "== $f: $(grep -E ' passed| failed|ERROR SUMMARY|RACECHECK SUMMARY|xfailed|error' $f | tail -2 | tr '\n' ' ')"; done
grep -h "^FAILED\|^ERROR\|^XFAIL\|^XPASS" *.log | cut -c1-250 | head -40
tar -czf $OUT/logs.tgz *.log *.txt *.json
echo "all done at $(el) s"
