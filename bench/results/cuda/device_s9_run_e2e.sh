#!/bin/bash
# Session 9, sequence 2, last call: the bundled SmolLM2 GGUF end to end (decode tok/s and
# peak memory at 8K/32K/128K), with the cache's Python as built (after the fetch change)
# and, same process layout, the Python of main before it (same extension).
D9=$(cd "$(dirname "$0")" && pwd)
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
exec > >(tee -a $OUT/run_e2e.log) 2>&1
bash $D9/stash.sh | tail -2
source /root/env.sh; cd /root/src; export PYTHONUNBUFFERED=1
cat /root/stash/gg.xz.* | xz -dc > /root/SmolLM2-135M-Instruct.Q4_1.gguf; sha256sum /root/SmolLM2-135M-Instruct.Q4_1.gguf
G=/root/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf /tmp/site_before /tmp/site_after && mkdir -p /tmp/site_before /tmp/site_after && cp -r /tmp/site/tqmetal /tmp/site_before/ && cp $D9/before_py/*.py /tmp/site_before/tqmetal/ && cp -r /tmp/site/tqmetal /tmp/site_after/ && cp $D9/after_py/*.py /tmp/site_after/tqmetal/
PYTHONPATH=/tmp/site_after:/tmp/site timeout 330 python3 bench/bench_cuda_e2e.py --gguf $G --json $OUT/bench_cuda_e2e.json --txt $OUT/bench_cuda_e2e.txt 2>&1 | grep -v Warn
echo "e2e done at $(el) s"
PYTHONPATH=/tmp/site_before:/tmp/site timeout $(( 560 - $(el) )) python3 bench/bench_cuda_e2e.py --gguf $G --caches tq_int4,tq_auto --json $OUT/bench_cuda_e2e_before_fetch.json --txt $OUT/bench_cuda_e2e_before_fetch.txt 2>&1 | grep -v Warn
echo "e2e before done at $(el) s"
