#!/bin/bash
# H200, one call after `source /tmp/gpu/env.sh`: kernels.py (every shape, 4 and 8 bits, against
# quantized_matmul / gather_qmm) three ways: GPU kernel time alone (CUPTI), standalone calls, and
# calls inside mx.compile; then the one-layer MoE comparison. Results in $OUT.
export PYTHONUNBUFFERED=1
timeout 100 python3 benchmarks/kernels.py --full --backends cuda,mlx --device-time --json $OUT/kernels_device.json 2>&1 \
  | tee $OUT/kernels_device.txt
timeout 100 python3 benchmarks/kernels.py --full --repeats 5 --backends cuda,mlx --json $OUT/kernels.json 2>&1 | tee $OUT/kernels.txt
timeout 100 python3 benchmarks/kernels.py --full --repeats 5 --backends cuda,mlx --compiled --json $OUT/kernels_compiled.json 2>&1 \
  | tee $OUT/kernels_compiled.txt
timeout 40 python3 benchmarks/moe_layer.py --layers 24 --distinct 3 --repeats 5 --compiled 2>&1 | tee $OUT/moe.txt
