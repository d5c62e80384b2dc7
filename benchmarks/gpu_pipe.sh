#!/bin/bash
# H200, one call after `source /tmp/gpu/env.sh` (session 5): pipelined weight loads (PIPE) checked,
# then swept as dependent compiled chains over weights beyond the L2, then kernels.py --mode chain
# with the shipped table and with the swept one. Results in $OUT.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv | tee $OUT/device.txt
timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_launch_shapes.py 2>&1 | tail -15 | tee $OUT/tests.txt
timeout 200 python3 benchmarks/matvec_sweep.py --grid pipe --chain --no-moe --calls 40 --repeats 5 \
  --json $OUT/sweep.json --table $OUT/table.json 2>&1 | tee $OUT/sweep.txt
timeout 90 python3 benchmarks/kernels.py --full --mode chain --repeats 5 --backends cuda,mlx 2>&1 | tee $OUT/chain_shipped.txt
FLASHMOE_LAUNCH_TABLE=$OUT/table.json timeout 90 python3 benchmarks/kernels.py --full --mode chain --repeats 5 \
  --backends cuda,mlx 2>&1 | tee $OUT/chain_swept.txt
