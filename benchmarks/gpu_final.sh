#!/bin/bash
# H200, one short call after `source /tmp/gpu/env.sh`: the launch shapes in launch_table.json, the
# model's cuda path against the reference backend and mlx-lm, and the q/k norm + rotary kernel.
source benchmarks/gpu_setup.sh
K="xd1_simds4_rps2 or xd0_simds8_rps2 or xd0_simds4_rps4 or xd1_simds4_rps4 or xd0_simds8_rps4 or xd1_simds8_rps4"
timeout 55 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_launch_shapes.py -k "$K" 2>&1 | tail -4
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/models/test_gpu_path.py 2>&1 | tail -6
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_attention_decode.py -k norm_rope 2>&1 | tail -4
