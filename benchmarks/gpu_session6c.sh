#!/bin/bash
# H200, session 6, call 3 (warm, after gpu_session6b.sh): the dense launch shapes swept by GPU kernel
# time in a dependent chain (matvec_sweep.py --device), kernels.py's shapes first, the table to $OUT.
export PYTHONUNBUFFERED=1
timeout 420 python3 benchmarks/matvec_sweep.py --device --no-moe --calls 20 \
  --shapes 4096x4096,16384x4096,5120x2048,2048x4096,128x2048 \
  --json $OUT/sweep.json --table $OUT/launch_table.json 2>&1 | grep -v INFO | tee $OUT/sweep.txt
