#!/bin/bash
# H200, one short call after `source /tmp/gpu/env.sh` (written 2026-12-01, not yet run: the session's
# device time ran out): the launch shapes benchmarks/launch_table_h200.json picks, the model's cuda
# path with that table against the reference backend and mlx-lm, the q/k norm + rotary kernel
# against float64. Passing, the table can move to flashmoe/kernels/launch_table.json (the default).
source benchmarks/gpu_setup.sh
K="xd1_simds4_rps2 or xd0_simds8_rps2 or xd0_simds4_rps4 or xd1_simds4_rps4 or xd0_simds8_rps4 or xd1_simds8_rps4"
timeout 55 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_launch_shapes.py -k "$K" 2>&1 | tail -4
FLASHMOE_LAUNCH_TABLE=benchmarks/launch_table_h200.json timeout 90 python3 -m pytest -q -p no:cacheprovider \
  tests/models/test_gpu_path.py 2>&1 | tail -6
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_attention_decode.py -k norm_rope 2>&1 | tail -4
wait
