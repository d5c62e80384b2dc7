"""What the fused decode kernels (kernels.moe) take of an MoE layer: which experts they run
(`fusable`, `FusedForm`), and a shared expert as slot K beside the routed ones (`SharedSlot`).

Resident (models.moe.ResidentExperts) and streamed (streaming.StreamedExperts) experts each describe
themselves as a FusedForm; a shared expert quantized and shaped as that form rides in the experts'
two launches, its gate's row stacked under the router's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

from .. import kernels
from ..kernels.moe import MAX_DOWN_K
from ..quant import QuantSpec
from .layers import Linear, stacked

if TYPE_CHECKING:
    from .moe import MLP


def fusable_projections(*projections) -> bool:
    """One affine spec the GPU kernels cover, on a GPU backend, for all three projections."""
    return fusable(projections[0].backend, [p.spec for p in projections])


def fusable(backend: str, specs) -> bool:
    """Whether experts quantized per `specs` (gate, up, down) run through the fused kernels on `backend`."""
    first = specs[0]
    return (
        backend in kernels.GPU_BACKENDS
        and first is not None
        and first.mode == "affine"
        and first.bits in kernels.KERNEL_BITS
        and all(s == first for s in specs)
    )


@dataclass(frozen=True)
class FusedForm:
    """A layer's routed experts as the fused decode kernels take them (what a SharedSlot must match):
    their one spec, one expert's gate (= up) and down weights' packed shapes, their scales' dtype."""

    spec: QuantSpec
    gate: tuple[int, ...]  # (I, D words)
    down: tuple[int, ...]  # (D, I words)
    scales_dtype: mx.Dtype


@dataclass(frozen=True)
class SharedSlot:
    """A shared expert as the fused decode kernels take it, slot K beside the routed experts (one
    launch each for gate/up and down, the shared one included), made at load where its weights are
    quantized as the routed experts' and as wide.

    router: the router's rows with the shared gate's row stacked under them (one matvec gives the
    routing logits and the shared gate's logit) when the two are quantized alike, else None.
    made_from: the (router, shared gate, shared expert) it was made from: the slot serves only while
    the MoE block still holds these very objects (analysis may swap the router for another)."""

    gate_up: tuple  # (w, scales, biases) of the stacked gate and up projections, (2I, D)
    down: tuple  # (w, scales, biases), (D, I)
    router: Linear | None
    made_from: tuple


def shared_slot(
    moe_gate: Linear, shared_gate: Linear, shared: MLP, form: FusedForm | None, k: int
) -> SharedSlot | None:
    """The SharedSlot of an MoE layer's shared expert, or None where the fused kernels cannot take it
    (routed experts they do not run: `form` None; a shared expert quantized otherwise or another
    width; K + 1 over the down kernel's slots). A router or shared gate that cannot be stacked
    (quantized otherwise, or plain) leaves the slot's router None: the gate then runs as its own
    matvec."""
    gate_up, down = shared.gate_up_proj.fused, shared.down_proj
    fits = (
        form is not None
        and k + 1 <= MAX_DOWN_K
        and gate_up is not None
        and all(
            p.spec == form.spec and p.bias is None and p.scales.dtype == form.scales_dtype
            for p in (gate_up, down)
        )
        and gate_up.weight.shape == (2 * form.gate[0], form.gate[1])
        and down.weight.shape == form.down
    )
    if not fits:
        return None
    return SharedSlot(
        gate_up.packed, down.packed, stacked((moe_gate, shared_gate)), (moe_gate, shared_gate, shared)
    )
