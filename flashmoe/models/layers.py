"""Linear layers over plain or quantized weights, plain and stacked (experts).

Decode (one row of activations) goes through flashmoe's kernels on the chosen backend;
prefill (many rows) through MLX's quantized_matmul / gather_qmm. Shapes:
    Linear            x (..., in) -> (..., out)
    Projections(a, b, ..)  x -> [a(x), b(x), ..]: one stacked matvec when they are quantized alike
    ExpertLinear      x (..., in) or (..., K, in), indices (..., K) -> (..., K, out)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import mlx.core as mx

from .. import kernels
from ..kernels.embedding import embed_rows
from ..quant import QuantSpec

# An RMSNorm that a layer applies to its input, (weight (in,), eps): passed down instead of applied
# first, so that on a GPU the kernel that reads the input normalises it (one launch fewer).
Norm = tuple[mx.array, float]


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x), the SwiGLU and Gated DeltaNet activation."""
    return x * mx.sigmoid(x)


@dataclass
class Linear:
    """y = x @ W.T (+ bias), W plain (out, in) or quantized (out, in * bits / 32) per `spec`."""

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None  # quantization biases (affine), not the layer's bias
    bias: mx.array | None = None  # the layer's own additive bias (qwen2_moe q/k/v)
    spec: QuantSpec | None = None
    backend: str = "mlx"

    def __call__(self, x: mx.array, residual: mx.array | None = None, norm: Norm | None = None) -> mx.array:
        """x (..., in) -> y (..., out), plus `residual` (..., out) when given (a residual connection:
        the GPU kernels add it as they write y); x put through the RMSNorm `norm` first when given
        (the GPU kernels apply it as they read x)."""
        one_row = self.spec is not None and x.size == x.shape[-1]
        if not one_row:
            x = kernels.rms_norm(x, norm)
        if self.spec is None:
            y = x @ self.weight.T
        elif one_row:  # decode, flashmoe's kernels (which add the residual and apply the norm)
            kw = dict(**self._kw(), backend=self.backend, norm=norm)
            if self.bias is None:
                return kernels.dequant_matvec(x, *self.packed, **kw, residual=residual)
            y = kernels.dequant_matvec(x, *self.packed, **kw)
        else:
            y = mx.quantized_matmul(x, *self.packed, transpose=True, **self._kw())
        y = y if self.bias is None else y + self.bias
        return y if residual is None else residual + y

    @property
    def out_features(self) -> int:
        return self.weight.shape[-2]

    @property
    def packed(self) -> tuple:
        """(weight, scales, biases) as the kernels take them."""
        return self.weight, self.scales, self.biases

    def _kw(self) -> dict:
        return dict(group_size=self.spec.group_size, bits=self.spec.bits, mode=self.spec.mode)


class Projections:
    """Several Linear layers of the same input: x (..., in) -> [a(x), b(x), ..].

    When all are quantized alike (bits, group size, mode, scale dtype, bias or none) their rows are
    stacked into one matrix at load, so a decode token makes one kernel launch instead of one per
    layer, and the outputs are slices of its output (exact: each row is computed alone).
    """

    def __init__(self, *layers: Linear):
        self.ends = list(itertools.accumulate(layer.out_features for layer in layers))[:-1]  # split points
        self.fused = stacked(layers)
        self.layers = layers if self.fused is None else None  # the separate matrices are dropped

    def __call__(self, x: mx.array, norm: Norm | None = None) -> list[mx.array]:
        """x (RMSNorm'd by `norm` when given, see Linear) -> the layers' outputs."""
        if self.fused is None:
            return [layer(x, norm=norm) for layer in self.layers]
        return mx.split(self.fused(x, norm=norm), self.ends, axis=-1)

    def stacked(self, x: mx.array, norm: Norm | None = None) -> mx.array | tuple[mx.array, ...]:
        """The outputs side by side in one array (..., sum of outs) when stacked, else as a tuple:
        for a kernel that reads them where they lie, without the split."""
        if self.fused is not None:
            return self.fused(x, norm=norm)
        return tuple(layer(x, norm=norm) for layer in self.layers)


def stacked(layers: tuple[Linear, ...]) -> Linear | None:
    """The layers as one Linear with their output rows stacked (a copy: the layers stay as they are),
    or None unless quantized alike."""
    first = layers[0]
    alike = all(
        layer.spec is not None
        and layer.spec == first.spec
        and layer.scales.dtype == first.scales.dtype
        and (layer.bias is None) == (first.bias is None)
        for layer in layers
    )
    if not alike:
        return None

    def stack(name: str) -> mx.array | None:
        parts = [getattr(layer, name) for layer in layers]
        return None if parts[0] is None else mx.concatenate(parts, axis=0)

    return Linear(
        stack("weight"),
        stack("scales"),
        stack("biases"),
        bias=stack("bias"),
        spec=first.spec,
        backend=first.backend,
    )


@dataclass
class ExpertLinear(Linear):
    """E stacked experts, W (E, out, in) plain or quantized; each token uses K of them."""

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:  # noqa: D102
        shared = x.ndim == indices.ndim  # one input for all K experts (gate/up) or one each (down)
        if self.spec is None:
            xg = x[..., None, None, :] if shared else x[..., None, :]  # (..., 1 or K, 1, in)
            w = self.weight.swapaxes(-1, -2)
            return mx.gather_mm(xg, w, rhs_indices=indices, sorted_indices=sorted_indices).squeeze(-2)
        if indices.size == indices.shape[-1] and not sorted_indices:  # one token: decode, flashmoe's kernel
            return kernels.gather_dequant_matvec(x, *self.packed, indices, **self._kw(), backend=self.backend)
        xg = x[..., None, None, :] if shared else x[..., None, :]
        y = mx.gather_qmm(
            xg,
            *self.packed,
            rhs_indices=indices,
            transpose=True,
            sorted_indices=sorted_indices,
            **self._kw(),
        )
        return y.squeeze(-2)  # (..., K, out)


@dataclass
class Embedding:
    """Token embeddings, plain (V, D) or quantized; `as_linear` serves tied output heads."""

    table: Linear
    dtype: mx.Dtype = mx.float32  # the compute dtype (see precision.compute_dtype)

    def __call__(self, tokens: mx.array) -> mx.array:  # (B, T) -> (B, T, D)
        t = self.table
        if t.spec is None:
            return t.weight[tokens]
        # Decode on a GPU: one kernel launch (kernels.embedding), else MLX's gathers and dequantize.
        return embed_rows(tokens, *t.packed, **t._kw(), dtype=self.dtype, backend=t.backend)

    def as_linear(self, x: mx.array, norm: Norm | None = None) -> mx.array:
        return self.table(x, norm=norm)
