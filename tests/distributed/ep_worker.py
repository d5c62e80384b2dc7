"""Run by tests/distributed under `mlx.launch -n N --backend ring`: every rank loads each job's
checkpoint with group=True and writes what it computed to OUT/<job>.rank<r>.npz.

    python ep_worker.py JOBS.json OUT

JOBS.json: [{"name": ..., "path": ..., "stream": bool}, ...]. `run_job` is also what the test
calls in its own process (group=None) for the single-process reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

PROMPT = [
    (7 * i + 3) % 300 for i in range(40)
]  # 40 tokens x K=2: 80 slots, the engine's grouped prefill path
NEW_TOKENS = 32


def run_job(path: str, stream: bool, group) -> dict:
    """Prefill logits, 32 greedy tokens (and the last decode logits), resident expert bytes."""
    from flashmoe.distributed import expert_nbytes
    from flashmoe.loader import load_model

    model = load_model(path, dtype=mx.float32, stream_experts=stream, group=group)
    logits = model(mx.array([PROMPT]))  # (1, T, V) without a cache: the whole prompt at once
    cache = model.make_cache()
    step = model(mx.array([PROMPT]), cache)[:, -1]
    tokens = []
    for _ in range(NEW_TOKENS):
        token = mx.argmax(step, axis=-1)
        tokens.append(int(token.item()))
        step = model(token[None], cache)[:, -1]
    stats = model.report.stream_stats
    return {
        "logits": np.array(logits),
        "last": np.array(step),
        "tokens": np.array(tokens),
        "expert_bytes": np.array(expert_nbytes(model)),
        "stream_bytes": np.array(stats.decode.bytes if stats is not None else 0),
    }


def main(jobs_file: str, out: str) -> None:
    group = mx.distributed.init()
    for job in json.loads(Path(jobs_file).read_text()):
        result = run_job(job["path"], job["stream"], True)
        np.savez(Path(out) / f"{job['name']}.rank{group.rank()}.npz", **result)


if __name__ == "__main__":
    main(*sys.argv[1:])
