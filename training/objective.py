"""The training objective, computed through flashmoe's own forward pass.

    params {name: float32 array} -> TensorStore -> flashmoe Model -> logits (B, T, V)
    loss = cross-entropy + aux_coef * balance + z_coef * router z-loss

balance is the Switch Transformer load-balancing loss, E * sum_e f_e * P_e per MoE layer
(f_e: share of routed slots that went to expert e, P_e: mean router probability of e),
1.0 when routing is uniform; z is mean(logsumexp(router logits)^2), which keeps router
logits small (ST-MoE), and so easy to quantize at 8 bits. Both are averaged over layers.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from flashmoe.analysis.evaluate import token_nll
from flashmoe.models.args import ModelArgs
from flashmoe.models.model import Model
from flashmoe.models.moe import Routing
from flashmoe.models.store import TensorStore


def build_model(params: dict[str, mx.array], args: ModelArgs, dtype: mx.Dtype = mx.float32) -> Model:
    """A flashmoe Model over `params` (a shallow copy: TensorStore takes tensors out of its dict)."""
    return Model(TensorStore(dict(params), dtype=dtype, source="training parameters"), args)


def check_params(params: dict[str, mx.array], args: ModelArgs) -> None:
    """Build once and require that the model takes every tensor (names and shapes as flashmoe expects)."""
    store = TensorStore(dict(params), source="training parameters")
    Model(store, args)
    store.finish()


def routing_losses(routing: dict[int, Routing], num_experts: int) -> tuple[mx.array, mx.array]:
    """(balance, z) averaged over the MoE layers; see the module docstring."""
    E = num_experts
    balance, z = mx.array(0.0), mx.array(0.0)
    for r in routing.values():
        logits = r.logits.astype(mx.float32).reshape(-1, E)  # (N, E)
        probs = mx.softmax(logits, axis=-1)
        chosen = r.experts.reshape(-1)[:, None] == mx.arange(E)  # (N K, E)
        share = mx.stop_gradient(chosen.astype(mx.float32).mean(axis=0))  # f_e, sums to 1
        balance = balance + E * mx.sum(share * probs.mean(axis=0))
        z = z + mx.mean(mx.square(mx.logsumexp(logits, axis=-1)))
    layers = max(len(routing), 1)
    return balance / layers, z / layers


def loss_terms(params: dict, args: ModelArgs, tokens: mx.array, dtype: mx.Dtype = mx.float32):
    """(cross-entropy, balance, z) for windows `tokens` (B, T + 1): inputs tokens[:, :-1], targets tokens[:, 1:]."""
    model = build_model(params, args, dtype)
    logits = model(tokens[:, :-1])  # (B, T, V)
    ce = token_nll(logits, tokens[:, 1:]).mean()
    balance, z = routing_losses(model.routing(), args.num_experts)
    return ce, balance, z


def evaluate(
    params: dict, args: ModelArgs, windows: np.ndarray, batch: int, dtype: mx.Dtype = mx.float32
) -> float:
    """Mean held-out cross-entropy (nats per token) over `windows` (N, T + 1)."""
    model = build_model(params, args, dtype)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        tokens = mx.array(windows[i : i + batch])
        nll = token_nll(model(tokens[:, :-1]), tokens[:, 1:])
        total += nll.sum().item()  # one sync per batch keeps memory flat
        count += nll.size
    return total / count
