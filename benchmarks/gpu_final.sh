#!/bin/bash
# H200, one call after `source /tmp/gpu/env.sh`: the launch shapes benchmarks/launch_table_h200.json
# picks, the model's cuda path with that table against the reference backend and mlx-lm, the q/k
# norm + rotary kernel against float64, then decode.py with the table. Results in $OUT.
source benchmarks/gpu_setup.sh
K="xd1_simds4_rps2 or xd0_simds8_rps2 or xd0_simds4_rps4 or xd1_simds4_rps4 or xd0_simds8_rps4 or xd1_simds8_rps4"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_launch_shapes.py -k "$K" \
  > $OUT/shapes.txt 2>&1; tail -4 $OUT/shapes.txt
FLASHMOE_LAUNCH_TABLE=benchmarks/launch_table_h200.json timeout 120 python3 -m pytest -q -p no:cacheprovider \
  tests/models/test_gpu_path.py > $OUT/gpu_path.txt 2>&1; tail -6 $OUT/gpu_path.txt
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_attention_decode.py -k norm_rope \
  > $OUT/norm_rope.txt 2>&1; tail -4 $OUT/norm_rope.txt
wait
FLASHMOE_LAUNCH_TABLE=benchmarks/launch_table_h200.json timeout 220 python3 benchmarks/decode.py \
  --models bundled,/tmp/cn8,/tmp/q30 --runs 3 --tokens 32 2>&1 | tee $OUT/decode.txt
