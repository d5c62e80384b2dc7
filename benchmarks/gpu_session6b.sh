#!/bin/bash
# H200, session 6, call 2 (after `source /tmp/gpu/env.sh`): the NaN stage by stage, then the tests
# that failed in call 1 (or whose fixtures changed since). Results in $OUT.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
timeout 200 python3 benchmarks/gpu_nan_stages.py --limit 60 2>&1 | grep -v INFO > $OUT/nan_stages.txt
grep -E "BAD|==|T [19] |run " $OUT/nan_stages.txt | head -40
timeout 280 python3 -m pytest -n 12 -q -p no:cacheprovider -rfE tests/test_training.py \
  tests/models/test_engine.py tests/streaming/test_streaming.py tests/analysis tests/hostile/test_threads.py \
  tests/test_default_model.py -k "g128 or small_groups or threads or compare or bench or routing or training or mlx_lm_generates" \
  > $OUT/tests.txt 2>&1
echo "tests rc $?"
grep -E "^(FAILED|ERROR)" $OUT/tests.txt | head -30
tail -3 $OUT/tests.txt
