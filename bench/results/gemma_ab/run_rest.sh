#!/bin/bash
# The Gemma 3 runs after the A/B (run from the repo root, venv active), in order.
set -u
R=bench/results
tqmetal eval --model gemma3-270m --text-kind prose --tokens 2048 --key-sensitivity \
  --json $R/key_sensitivity_gemma3_2k.json > $R/key_sensitivity_gemma3_2k.txt 2> $R/gemma_ab/ks.log
for kind in dialogue code docs; do
  tqmetal eval --model gemma3-270m --text-kind $kind --tokens 4096 --stride 8 --gen-prompts 0 \
    --configs int4-g64-rot-center-abq-chs-fpw,int4-g64-rot-center-abq \
    --json $R/fidelity_gemma3_4k_$kind.json > $R/fidelity_gemma3_4k_$kind.txt 2> $R/gemma_ab/4k_$kind.log
done
tqmetal passkey --model gemma3-270m --lengths 4096,16384 --depths 0.1,0.5,0.9 \
  --configs fp16,int4-g64-rot-center-abq-chs-fpw \
  --json $R/passkey_gemma3.json > $R/passkey_gemma3.txt 2> $R/gemma_ab/passkey.log
