#!/bin/bash
# H200: where a decode step goes (benchmarks/step_profile.py) under MLX's CUDA graph settings,
# and the GPU tests. Run after `source /tmp/gpu/env.sh`; results in $OUT.
source benchmarks/gpu_setup.sh
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/models/test_engine.py \
  tests/models/test_fused_path.py 2>&1 | tail -15 > $OUT/tests.txt
wait
M="--model /tmp/q30 --model /tmp/cn8"
timeout 120 python3 benchmarks/step_profile.py --launches $M 2>&1 | tee $OUT/profile_default.txt
MLX_USE_CUDA_GRAPHS=0 timeout 90 python3 benchmarks/step_profile.py --launches $M 2>&1 | tee $OUT/profile_nographs.txt
MLX_MAX_OPS_PER_BUFFER=400 MLX_MAX_MB_PER_BUFFER=4000 timeout 90 python3 benchmarks/step_profile.py $M 2>&1 \
  | tee $OUT/profile_bigbuffers.txt
cat $OUT/tests.txt
