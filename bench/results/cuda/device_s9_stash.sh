#!/bin/bash
# Device-only: keep this call's carried pieces for the next calls (the machine stays warm).
C=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p /root/stash
for d in s1 s2 s3 g2 g3; do [ -d $C/$d ] && cp -v $C/$d/* /root/stash/ 2>/dev/null; done
ls -la /root/stash; df -h /root | tail -1
