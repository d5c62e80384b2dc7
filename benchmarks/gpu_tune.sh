#!/bin/bash
# H200, one call after `source /tmp/gpu/env.sh`: the decode-path tests, the launch-shape sweep (which
# writes $OUT/launch_table.json), decode.py and the per-kernel timeline with that table. In $OUT.
source benchmarks/gpu_setup.sh
TABLE=$OUT/launch_table.json
timeout ${TEST_SECONDS:-170} python3 -m pytest -v -p no:cacheprovider tests/kernels/test_attention_decode.py \
  tests/kernels/test_gated_delta_kernel.py tests/models/test_gpu_path.py tests/kernels/test_launch_shapes.py \
  > $OUT/tests.txt 2>&1
echo "tests: $(grep -c PASSED $OUT/tests.txt) passed, $(grep -c FAILED $OUT/tests.txt) failed"; tail -2 $OUT/tests.txt
timeout ${SWEEP_SECONDS:-170} python3 benchmarks/matvec_sweep.py --table $TABLE --json $OUT/sweep.json 2>&1 | tee $OUT/sweep.txt
wait
export FLASHMOE_LAUNCH_TABLE=$TABLE
timeout 170 python3 benchmarks/decode.py --models bundled,/tmp/cn8,/tmp/q30 --runs 3 --tokens 32 2>&1 | tee $OUT/decode.txt
timeout 50 python3 benchmarks/kernel_timeline.py --model /tmp/q30 --model /tmp/cn8 --engines flashmoe --top 14 \
  --json $OUT/timeline.json > $OUT/timeline.txt 2>&1
grep -E "FAILED|Error" $OUT/tests.txt | head -20
