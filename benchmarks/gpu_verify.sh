#!/bin/bash
# H200: the new decode-path kernels' tests, the model tests, then decode.py and step_profile.py.
# Run after `source /tmp/gpu/env.sh`; results in $OUT.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
python3 -m flashmoe.tools.synth --preset qwen3-30b-a3b --layers 8 --out /tmp/q30 > /dev/null &
python3 -m flashmoe.tools.synth --preset qwen3-coder-next --layers 8 --out /tmp/cn8 > /dev/null &
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_attention_decode.py \
  tests/kernels/test_fused_moe.py tests/models/test_engine.py tests/models/test_fused_path.py 2>&1 | tail -25 > $OUT/tests.txt
wait
timeout 240 python3 benchmarks/decode.py --models bundled,/tmp/cn8,/tmp/q30 --runs 3 --tokens 32 2>&1 | tee $OUT/decode.txt
timeout 90 python3 benchmarks/step_profile.py --model /tmp/q30 --model /tmp/cn8 2>&1 | tee $OUT/profile.txt
cat $OUT/tests.txt
