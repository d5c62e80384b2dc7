#!/bin/bash
# H200, one call after `source /tmp/gpu/env.sh`: the decode-path kernels' tests, decode.py on the
# three checkpoints, and the one-layer MoE comparison. Results in $OUT.
source benchmarks/gpu_setup.sh
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_attention_decode.py \
  tests/kernels/test_fused_moe.py tests/models/test_gpu_path.py 2>&1 | tail -25 > $OUT/tests.txt
wait
timeout 280 python3 benchmarks/decode.py --models bundled,/tmp/cn8,/tmp/q30 --runs 3 --tokens 32 2>&1 | tee $OUT/decode.txt
timeout 40 python3 benchmarks/moe_layer.py --layers 24 --distinct 3 --repeats 5 2>&1 | tee $OUT/moe.txt
cat $OUT/tests.txt
