#!/bin/bash
# H200, one call after `source /tmp/gpu/env.sh`: kernels.py (every shape, 4 and 8 bits, against
# quantized_matmul / gather_qmm) as GPU kernel time alone in a dependent chain (CUPTI), standalone
# calls, and calls inside mx.compile; then the one-layer MoE comparison. Results in $OUT.
export PYTHONUNBUFFERED=1
for mode in device standalone compiled; do
  timeout 100 python3 benchmarks/kernels.py --full --repeats 5 --backends cuda,mlx --mode $mode \
    --json $OUT/kernels_$mode.json 2>&1 | tee $OUT/kernels_$mode.txt
done
timeout 60 python3 benchmarks/moe_layer.py --layers 24 --distinct 3 --repeats 5 --compiled --streamed 2>&1 | tee $OUT/moe.txt
