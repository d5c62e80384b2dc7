#!/bin/bash
# H200, one call after `source /tmp/gpu/env.sh` (session 4): decode.py (the H200 launch table is the default),
# the kernel timeline of the Qwen3-30B shape, then the residual-add kernels' tests and the model's
# cuda path against the reference backend and mlx-lm (with the table). Results in $OUT.
source benchmarks/gpu_setup.sh
wait
timeout 200 python3 benchmarks/decode.py --models /tmp/q30,/tmp/cn8,bundled --runs 3 --tokens 32 2>&1 | tee $OUT/decode.txt
timeout 60 python3 benchmarks/kernel_timeline.py --model /tmp/q30 --engines flashmoe --top 16 \
  --json $OUT/timeline.json > $OUT/timeline.txt 2>&1; head -3 $OUT/timeline.txt
timeout ${TEST_SECONDS:-240} python3 -m pytest -v -p no:cacheprovider tests/kernels/test_residual.py \
  tests/models/test_gpu_path.py > $OUT/tests.txt 2>&1
echo "tests: $(grep -c PASSED $OUT/tests.txt) passed, $(grep -c FAILED $OUT/tests.txt) failed"
grep -E "FAILED|Error|assert" $OUT/tests.txt | head -20; tail -2 $OUT/tests.txt
