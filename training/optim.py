"""AdamW over a flat {name: array} dict, global-norm clipping, and the learning-rate schedule.

Written out (rather than mlx.optimizers) so that its whole state is three plain dicts and a
step count that save and load bit for bit, and so that weight decay skips vectors (norms,
A_log, dt_bias) as GPT-2 and nanoGPT do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx


@dataclass
class AdamW:
    """Decoupled weight decay Adam (Loshchilov & Hutter); moments kept in `state_dtype`."""

    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    state_dtype: mx.Dtype = mx.float32  # bfloat16 halves the state (saved as is, so resume stays exact)

    def init(self, params: dict[str, mx.array]) -> dict:
        """Zero moments and step 0."""
        zeros = {k: mx.zeros(v.shape, self.state_dtype) for k, v in params.items()}
        return {"m": zeros, "v": dict(zeros), "step": mx.array(0, mx.int32)}

    def update(self, params: dict, grads: dict, state: dict, lr: mx.array) -> tuple[dict, dict]:
        """One step: (new params, new state). `lr` is an array so a compiled step never retraces."""
        step = state["step"] + 1
        t = step.astype(mx.float32)
        correction1, correction2 = 1 - self.beta1**t, 1 - self.beta2**t
        new_params, new_m, new_v = {}, {}, {}
        for name, p in params.items():
            g = grads[name].astype(mx.float32)
            m = self.beta1 * state["m"][name].astype(mx.float32) + (1 - self.beta1) * g
            v = self.beta2 * state["v"][name].astype(mx.float32) + (1 - self.beta2) * mx.square(g)
            if p.ndim >= 2:  # matrices and tables decay; gains, biases and per-head scalars do not
                p = p * (1 - lr * self.weight_decay)
            update = (m / correction1) / (mx.sqrt(v / correction2) + self.eps)
            new_params[name] = (p - lr * update).astype(p.dtype)
            new_m[name], new_v[name] = m.astype(self.state_dtype), v.astype(self.state_dtype)
        return new_params, {"m": new_m, "v": new_v, "step": step}


def clip_by_global_norm(grads: dict[str, mx.array], max_norm: float) -> tuple[dict, mx.array]:
    """Gradients scaled so their joint L2 norm is at most `max_norm`; also the norm before clipping."""
    # summed in name order: a dict's order (fresh vs loaded from shards) must not change the rounding
    norm = mx.sqrt(sum(mx.sum(mx.square(grads[k].astype(mx.float32))) for k in sorted(grads)))
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return {k: g * scale for k, g in grads.items()}, norm


def learning_rate(step: int, peak: float, warmup: int, total: int, final_ratio: float = 0.1) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `peak * final_ratio` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
