#!/usr/bin/env bash
# One training chunk on the GPU host (run from the repository root after `source /tmp/gpu/env.sh`).
#   bash training/device_chunk.sh first MINUTES   # probe speed, fix the schedule length, train
#   bash training/device_chunk.sh resume MINUTES  # continue on the same (warm) machine
#   bash training/device_chunk.sh last MINUTES    # continue, then report and export the 4-bit asset
set -uo pipefail
mode=$1; minutes=$2; run=training/runs/coder-tiny
if [ "$mode" = first ]; then
  compile=1
  python3 -m training.train --out /tmp/probe --minutes 3 --max-steps 30 --no-eval 2>&1 | tail -3 || compile=0
  [ -f /tmp/probe/log.jsonl ] || { compile=0; python3 -m training.train --out /tmp/probe0 --minutes 3 --max-steps 30 --no-eval --compile 0 2>&1 | tail -3; }
  probe=$(ls -d /tmp/probe* | tail -1)
  tps=$(python3 -c "import json,sys; l=[json.loads(x) for x in open('$probe/log.jsonl') if 'tokens_per_s' in x]; print(int(l[-1]['tokens_per_s']))")
  steps=$(( tps * ${TRAIN_SECONDS:-1500} / 8192 ))
  echo "probe: $tps tokens/s, compile=$compile -> total steps $steps"
  python3 -m training.train --out $run --minutes "$minutes" --total-steps $steps --compile $compile 2>&1 | tail -4
else
  python3 -m training.train --out $run --minutes "$minutes" --resume 2>&1 | tail -4
fi
cp $run/log.jsonl $run/train_state/state.json "$OUT"/ 2>/dev/null
rm -rf /tmp/asset && python3 -m flashmoe.tools.convert $run /tmp/asset && tar cf "$OUT"/asset.tar -C /tmp asset
if [ "$mode" = last ]; then
  python3 -m training.report $run 2>&1 | tail -30
  cp $run/report.json "$OUT"/ 2>/dev/null
fi
