"""The greedy decode choice with its finiteness check, in one launch on a GPU.

    greedy_pick(logits, backend=)   logits (1, V) -> (2,) int32 [id, finite]

id is mx.argmax's choice (the first index of the largest logit) and finite is 1 when every logit
is finite; when one is not (NaN or inf), both are 0, so the id never indexes out of the table.
generate.decode_step packs the same pair with MLX's ops (argmax, isfinite, all, where,
concatenate: five or more launches and a slow argmax over a large vocabulary); this kernel is
one launch. Backends: "metal" / "cuda" (src/greedy_pick.inc), else `reference`, MLX's ops.
"""

from __future__ import annotations

import mlx.core as mx

from . import fused_backend, gpu

INPUTS, OUTPUTS = ("logits", "dims"), ("out",)
THREADS = 1024  # one threadgroup per row


def greedy_pick(logits: mx.array, *, backend: str = "auto") -> mx.array:
    """logits (1, V) -> (2,) int32: [argmax, 1] when all are finite, else [0, 0]."""
    backend = fused_backend(backend)
    if backend == "reference" or logits.ndim != 2 or logits.shape[0] != 1:
        return reference(logits)
    (out,) = gpu.kernel(backend, "greedy_pick.inc", "flashmoe_greedy_pick", INPUTS, OUTPUTS)(
        inputs=[logits, gpu.int_array(logits.shape[-1])],
        template=[("T", logits.dtype), ("THREADS", THREADS)],
        grid=(THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(2,)],
        output_dtypes=[mx.int32],
        **gpu.output_init(),
    )
    return out


def reference(logits: mx.array) -> mx.array:
    """greedy_pick in MLX's ops, for any (B, V): (B + 1,) int32, the B ids then the flag."""
    return checked_pick(logits, lambda rows: mx.argmax(rows, axis=-1))


def checked_pick(logits: mx.array, choose) -> mx.array:
    """choose(logits (B, V)) -> ids (B,), packed with the finiteness flag: (B + 1,) int32, the ids
    (all 0 when a logit is NaN or inf, so none indexes out of the table) then the flag."""
    finite = mx.isfinite(logits).all()
    ids = mx.where(finite, choose(logits), 0).astype(mx.int32)
    return mx.concatenate([ids, finite.astype(mx.int32)[None]])
