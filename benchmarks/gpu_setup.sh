# Sourced by benchmarks/gpu.sh after `source /tmp/gpu/env.sh`: mlx-lm from the carried wheel (.whl/),
# and the two 8-layer synthetic checkpoints decode.py compares on, written in the background once
# per machine (the caller `wait`s for them).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
[ -d /tmp/cn8 ] || python3 -m flashmoe.tools.synth --preset qwen3-coder-next --layers 8 --out /tmp/cn8 > /dev/null &
[ -d /tmp/q30 ] || python3 -m flashmoe.tools.synth --preset qwen3-30b-a3b --layers 8 --out /tmp/q30 > /dev/null &
