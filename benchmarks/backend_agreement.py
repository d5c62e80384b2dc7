"""How far each backend's decode logits are from the reference backend's, in float32 and bf16.

    python benchmarks/backend_agreement.py CHECKPOINT

Teacher-forced: every backend is fed the same 32 tokens after the same prompt, so the
numbers measure arithmetic, not diverging greedy paths.
"""

from __future__ import annotations

import sys

import mlx.core as mx

from flashmoe import kernels
from flashmoe.analysis.parity import forced_decode_logits
from flashmoe.loader import load_model


def main(checkpoint: str) -> None:
    prompt, tokens = [3, 14, 15, 92, 65], [(17 * i + 5) % 200 for i in range(32)]
    print(f"device {mx.default_device()}: max |logits - reference| / max |reference| over 32 decode steps")
    for dtype in (mx.float32, mx.bfloat16):
        ref = forced_decode_logits(load_model(checkpoint, backend="reference", dtype=dtype), prompt, tokens)
        for backend in kernels.available_backends():
            got = forced_decode_logits(load_model(checkpoint, backend=backend, dtype=dtype), prompt, tokens)
            err = (mx.max(mx.abs(got - ref)) / mx.max(mx.abs(ref))).item()
            same = mx.mean((mx.argmax(got, -1) == mx.argmax(ref, -1)).astype(mx.float32)).item()
            print(f"{str(dtype):>16} {backend:>10}: rel err {err:.2e}, argmax agrees {same:.0%}")


if __name__ == "__main__":
    main(sys.argv[1])
