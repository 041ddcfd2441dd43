#!/bin/bash
# Device-only setup (not part of the project): the carried MLX CUDA install (xz pieces
# in /root/stash) into /tmp/site, plus nanobind and mlx-lm wheels.
S=/root/stash
if [ ! -f /tmp/site/.mlx_ok ]; then
  ls $S/site.xz.* >/dev/null || { echo "site pieces missing"; exit 3; }
  cat $S/site.xz.* | sha256sum
  mkdir -p /tmp/site && cat $S/site.xz.* | xz -dc -T0 | tar -xf - -C /tmp/site || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $S/nanobind-*.whl $S/mlx_lm-*.whl 2>&1 | grep -v WARN
  touch /tmp/site/.mlx_ok
fi
export PYTHONPATH=/tmp/site
NV=$(python3 -c "import nvidia,os;print(':'.join(sorted(set(os.path.dirname(p) for d in nvidia.__path__ for p in __import__('glob').glob(d+'/*/lib/*.so*')))))" 2>/dev/null)
export LD_LIBRARY_PATH=$NV:$LD_LIBRARY_PATH
echo "export PYTHONPATH=/tmp/site LD_LIBRARY_PATH=$LD_LIBRARY_PATH" > /root/env.sh
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.cuda.is_available())" || exit 4
