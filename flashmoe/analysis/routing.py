"""Routing analysis for the notebooks and tests: what the misread router does, and an independent reference.

Shape letters as in flashmoe.moe: B batch, T tokens, D hidden, E experts, K experts per token.

    gate_scores_per_layer   the router logits of every MoE layer for some tokens
    compare_routing         a model with correct gates against one with misread gates (quant="global")
    reference_routing       routing recomputed from the checkpoint's gate tensors with mx.dequantize alone
    gate_tensor_table       each gate's shapes and the bits they imply (bits = words * 32 / in_dim)
    lying_copy              a copy of a checkpoint whose config.json misstates one module's bits
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..loader import read_config
from ..models.model import Model
from ..quant import claim_bits, implied_bits, resolve
from ..safetensors import read_tensors, tensor_infos


def gate_scores_per_layer(model: Model, tokens: mx.array) -> dict[int, mx.array]:
    """Router logits (B, T, E) per MoE layer for `tokens` (B, T)."""
    model(tokens)
    return {layer: routing.logits for layer, routing in model.routing().items()}


@dataclass
class LayerComparison:
    """One MoE layer: the correct router against the misread one, for the same input tokens."""

    overlap: np.ndarray  # (B*T,) share of the K experts both routers chose, per token
    rms_true: float  # RMS of the correct gate scores
    rms_bad: float  # RMS of the misread gate scores
    sign_agreement: float  # share of (token, expert) scores with the same sign
    true_experts: np.ndarray  # (B*T, K)
    true_weights: np.ndarray  # (B*T, K)
    bad_experts: np.ndarray  # (B*T, K)
    bad_weights: np.ndarray  # (B*T, K)


@dataclass
class RoutingComparison:
    """Per MoE layer comparisons; `overlap_matrix` stacks them (layers x tokens) for a heatmap."""

    layers: dict[int, LayerComparison] = field(default_factory=dict)

    def overlap_matrix(self) -> np.ndarray:
        """(MoE layers, B*T) expert overlap, 1.0 = the same K experts."""
        return np.stack([c.overlap for c in self.layers.values()])

    def summary(self) -> list[dict]:
        """One row per layer: mean overlap, RMS both ways, sign agreement."""
        return [
            dict(
                layer=i,
                overlap=float(c.overlap.mean()),
                rms_true=c.rms_true,
                rms_bad=c.rms_bad,
                sign_agreement=c.sign_agreement,
            )
            for i, c in self.layers.items()
        ]

    def routing_at(self, layer: int, token: int) -> dict:
        """The top-K experts and weights one token got in one layer, correct and misread (for a widget)."""
        c = self.layers[layer]
        return dict(
            true=list(zip(c.true_experts[token].tolist(), c.true_weights[token].tolist())),
            bad=list(zip(c.bad_experts[token].tolist(), c.bad_weights[token].tolist())),
        )


def compare_routing(good: Model, bad: Model, tokens: mx.array) -> RoutingComparison:
    """Run both models on `tokens` (B, T) and compare their routers layer by layer."""
    good(tokens)
    good_routing = good.routing()
    bad(tokens)
    bad_routing = bad.routing()
    result = RoutingComparison()
    for layer in good.moe_layers:
        g, b = good_routing[layer], bad_routing[layer]
        gl, bl = _np(g.logits), _np(b.logits)  # (B, T, E)
        ge, be = (
            _np(g.experts).reshape(-1, g.experts.shape[-1]),
            _np(b.experts).reshape(-1, b.experts.shape[-1]),
        )
        overlap = np.array([len(set(x) & set(y)) / len(x) for x, y in zip(ge.tolist(), be.tolist())])
        result.layers[layer] = LayerComparison(
            overlap=overlap,
            rms_true=_rms(gl),
            rms_bad=_rms(bl),
            sign_agreement=float((np.sign(gl) == np.sign(bl)).mean()),
            true_experts=ge,
            true_weights=_np(g.weights).reshape(ge.shape),
            bad_experts=be,
            bad_weights=_np(b.weights).reshape(be.shape),
        )
    return result


@contextmanager
def recording_gate_inputs(model: Model):
    """Inside the block, `inputs[layer]` holds the last input (B, T, D) each MoE router saw."""
    inputs: dict[int, mx.array] = {}
    originals = {i: model.layers[i].mlp.gate for i in model.moe_layers}

    def recorder(layer, gate):
        def call(x):
            inputs[layer] = x
            return gate(x)

        return call

    for i, gate in originals.items():
        model.layers[i].mlp.gate = recorder(i, gate)
    try:
        yield inputs
    finally:
        for i, gate in originals.items():
            model.layers[i].mlp.gate = gate


@dataclass
class ReferenceRouting:
    """Routing recomputed outside flashmoe's layers, per MoE layer."""

    logits: dict[int, mx.array]  # (B, T, E) float32
    experts: dict[int, np.ndarray]  # (B*T, K), sorted ids per token
    bits: dict[int, int]  # the bits the gate tensor's shapes imply


def reference_routing(model: Model, directory: str | Path, tokens: mx.array) -> ReferenceRouting:
    """Dequantize each gate from the checkpoint with mx.dequantize (bits from its shapes) and redo the top-K.

    The router inputs come from running `model`; the gate weights, their bits and the top-K do not.
    """
    config = read_config(directory)
    plan, raw = resolve(config), read_tensors(directory)
    with recording_gate_inputs(model) as inputs:
        model(tokens)
    logits, experts, bits = {}, {}, {}
    for layer in model.moe_layers:
        name = _gate_name(raw, layer)
        w, scales, biases = raw[f"{name}.weight"], raw[f"{name}.scales"], raw[f"{name}.biases"]
        group_size = plan.spec_for(name).group_size
        bits[layer] = int(implied_bits(w.shape, scales.shape, group_size))
        dense = mx.dequantize(
            w,
            scales.astype(mx.float32),
            biases.astype(mx.float32),
            group_size=group_size,
            bits=bits[layer],
        )  # (E, D)
        logits[layer] = inputs[layer].astype(mx.float32) @ dense.T  # (B, T, E)
        k = model.layers[layer].mlp.k
        top = np.argsort(-_np(logits[layer]), axis=-1)[..., :k]  # softmax is monotonic: top-K of the logits
        experts[layer] = np.sort(top.reshape(-1, k), axis=-1)
    return ReferenceRouting(logits, experts, bits)


def chosen_experts(model: Model) -> dict[int, np.ndarray]:
    """The last forward call's experts per MoE layer, (B*T, K) with ids sorted per token."""
    return {
        i: np.sort(_np(r.experts).reshape(-1, r.experts.shape[-1]), axis=-1)
        for i, r in model.routing().items()
    }


@dataclass
class GateTensor:
    """One gate's stored shapes and what they imply."""

    name: str
    weight_shape: tuple
    scales_shape: tuple
    group_size: int
    in_dim: int  # scales.shape[-1] * group_size
    implied_bits: float  # weight.shape[-1] * 32 / in_dim
    config_bits: int | None


def gate_tensor_table(directory: str | Path) -> list[GateTensor]:
    """Every router gate (`mlp.gate`, `mlp.shared_expert_gate`) of a checkpoint, from the safetensors headers."""
    plan, infos = resolve(read_config(directory)), tensor_infos(directory)
    rows = []
    gates = [
        n[: -len(".scales")] for n in infos if n.endswith(("mlp.gate.scales", "shared_expert_gate.scales"))
    ]
    for name in sorted(gates):
        spec = plan.spec_for(name)
        group_size = spec.group_size if spec else 64
        w, s = infos[f"{name}.weight"].shape, infos[f"{name}.scales"].shape
        rows.append(
            GateTensor(
                name,
                w,
                s,
                group_size,
                s[-1] * group_size,
                implied_bits(w, s, group_size),
                spec.bits if spec else None,
            )
        )
    return rows


def lying_copy(
    src: str | Path, dst: str | Path, module: str = "model.layers.0.mlp.gate", bits: int = 4
) -> Path:
    """Copy checkpoint `src` to `dst` with config.json claiming `bits` for `module` (both quantization sections)."""
    dst = Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    config = claim_bits(json.loads((dst / "config.json").read_text()), module, bits)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def _gate_name(tensors: dict, layer: int) -> str:
    suffix = f"layers.{layer}.mlp.gate.scales"
    names = [n for n in tensors if n.endswith(suffix)]
    if len(names) != 1:
        raise KeyError(f"expected one '*{suffix}' tensor, found {names}")
    return names[0][: -len(".scales")]


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a)


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))
