"""The Mixture-of-Experts block, one implementation for all four architectures.

Shape letters: B batch, T tokens, D hidden, E experts, K experts per token, I expert width.

    router    logits = gate(x)                       (B, T, E)   at the gate's own bits (often 8)
              probs  = softmax(logits) in float32
              top-K experts, weights renormalised when norm_topk_prob
    experts   y_k = down_k(silu(gate_k(x)) * up_k(x))  (B, T, K, D) through the gathered kernel
              y   = sum_k w_k y_k                       (B, T, D)
    shared    y  += sigmoid(shared_expert_gate(x)) * shared_expert(x)   where the model has one
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .. import kernels
from ..errors import FlashMoeError
from ..kernels.moe import SharedGate, moe_down, moe_gate_up, route, routed_gate_up
from ..timing import timer
from .args import ModelArgs
from .fused import FusedForm, SharedSlot, fusable_projections, shared_slot
from .layers import Linear, Norm, Projections, silu
from .store import TensorStore


class MLP:
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); dense layers and the shared expert."""

    def __init__(self, store: TensorStore, prefix: str):
        self.gate_up_proj = Projections(
            store.linear(f"{prefix}.gate_proj"), store.linear(f"{prefix}.up_proj")
        )
        self.down_proj = store.linear(f"{prefix}.down_proj")

    def __call__(self, x: mx.array, residual: mx.array | None = None, norm: Norm | None = None) -> mx.array:
        """x (..., D) (RMSNorm'd by `norm` when given) -> the MLP's output (+ residual, added by the
        down projection's kernel)."""
        gate, up = self.gate_up_proj(x, norm)
        return self.down_proj(silu(gate) * up, residual)


def switch_mlp(gate_proj, up_proj, down_proj, x: mx.array, experts: mx.array) -> mx.array:
    """The selected experts' SwiGLU: x (B, T, D), experts (B, T, K) ids into the stacks -> (B, T, K, D)."""
    if experts.size < 64:  # a few tokens (decode): gather as they come
        hidden = silu(gate_proj(x, experts)) * up_proj(x, experts)  # (B, T, K, I)
        return down_proj(hidden, experts)  # (B, T, K, D)
    # Many tokens (prefill, training): (token, slot) pairs grouped by expert, as mlx-lm's SwitchGLU
    # does. Faster, and the only form whose weight gradient runs on MLX's CUDA backend for I = 64.
    *lead, K = experts.shape
    flat = experts.flatten()  # (N K,)
    order = mx.argsort(flat)
    xs = x.reshape(-1, x.shape[-1])[order // K]  # (N K, D) in expert order
    ids = flat[order]
    hidden = silu(gate_proj(xs, ids, True)) * up_proj(xs, ids, True)  # (N K, I)
    y = down_proj(hidden, ids, True)  # (N K, D)
    return y[mx.argsort(order)].reshape(*lead, K, -1)  # token order again: (B, T, K, D)


FUSED_MAX_SLOTS = 64  # token x expert pairs up to which the fused decode kernels run


def mixed_experts(
    gate_proj,
    up_proj,
    down_proj,
    x: mx.array,
    experts: mx.array,
    weights: mx.array,
    residual=None,
    norm=None,
    shared: tuple[SharedSlot, SharedGate] | None = None,
) -> mx.array:
    """sum_k weights_k * expert_k(x) (+ residual) for x (B, T, D), experts and weights (B, T, K) -> (B, T, D);
    x through the RMSNorm `norm` first when given.

    A few tokens on a GPU backend take the fused kernels (kernels.moe: norm, gate+up+SwiGLU in one
    launch, down + the weighted sum + the residual in another); everything else the gathered path.
    shared: a shared expert and its gate as slot K of the fused launches (a SharedSlot is made only
    where they run: `fused_form`).
    """
    spec = gate_proj.spec
    if experts.size <= FUSED_MAX_SLOTS and fusable_projections(gate_proj, up_proj, down_proj):
        kw = dict(bits=spec.bits, group_size=spec.group_size, backend=gate_proj.backend)
        slot, gate = shared if shared is not None else (None, None)
        h = moe_gate_up(
            x,
            gate_proj.packed,
            up_proj.packed,
            experts,
            **kw,
            norm=norm,
            shared=None if slot is None else slot.gate_up,
        )
        down = dict(residual=residual, shared=None if slot is None else slot.down, shared_gate=gate)
        return moe_down(h, down_proj.packed, experts, weights, **kw, **down)
    if shared is not None:
        raise FlashMoeError(f"a shared slot for {experts.size} slots, which the fused kernels do not run")
    x = kernels.rms_norm(x, norm)
    y = weighted_sum(switch_mlp(gate_proj, up_proj, down_proj, x, experts), weights)
    return y if residual is None else residual + y


class ResidentExperts:
    """A layer's E experts stacked in memory (mlx-lm's switch_mlp): (x, ids, weights) -> (B, T, D)."""

    def __init__(self, store: TensorStore, prefix: str):
        self.gate_proj = store.experts(f"{prefix}.switch_mlp.gate_proj")  # (E, I, D)
        self.up_proj = store.experts(f"{prefix}.switch_mlp.up_proj")  # (E, I, D)
        self.down_proj = store.experts(f"{prefix}.switch_mlp.down_proj")  # (E, D, I)

    def fused_form(self, k: int) -> FusedForm | None:
        """How the fused kernels take these experts for a decode token's K, or None where they do not."""
        gate, down = self.gate_proj, self.down_proj
        if not fusable_projections(gate, self.up_proj, down):
            return None
        return FusedForm(gate.spec, gate.weight.shape[1:], down.weight.shape[1:], gate.scales.dtype)

    def routes_itself(self, x: mx.array, k: int) -> bool:
        """Whether `routed` runs for x (B, T, D): a few tokens for the fused kernels, on a GPU backend."""
        return x.size // x.shape[-1] * k <= FUSED_MAX_SLOTS and fusable_projections(
            self.gate_proj, self.up_proj, self.down_proj
        )

    def routed(
        self,
        x: mx.array,
        logits: mx.array,
        k: int,
        renorm: bool,
        residual=None,
        norm: Norm | None = None,
        shared: tuple[SharedSlot, SharedGate] | None = None,
    ) -> tuple[mx.array, mx.array, mx.array]:
        """The router's logits (B, T, E), or (B, T, E + 1) with the shared gate's after them, for x ->
        (y (B, T, D) (+ residual), ids and weights (B, T, K)): routing, gate + up + SwiGLU in one
        launch (kernels.moe.routed_gate_up), down + weighted sum (+ residual) in another; `shared`,
        the shared expert and its gate, as slot K of both. For `routes_itself` inputs."""
        spec, backend = self.gate_proj.spec, self.gate_proj.backend
        kw = dict(bits=spec.bits, group_size=spec.group_size, backend=backend)
        slot, gate = shared if shared is not None else (None, None)
        h, ids, weights = routed_gate_up(
            x,
            self.gate_proj.packed,
            self.up_proj.packed,
            logits,
            k,
            renorm,
            **kw,
            norm=norm,
            shared=None if slot is None else slot.gate_up,
            experts=self.gate_proj.weight.shape[0],
        )
        down = dict(residual=residual, shared=None if slot is None else slot.down, shared_gate=gate)
        return moe_down(h, self.down_proj.packed, ids, weights, **kw, **down), ids, weights

    def __call__(
        self, x: mx.array, experts: mx.array, weights: mx.array, residual=None, norm: Norm | None = None
    ) -> mx.array:
        """x (B, T, D) (RMSNorm'd by `norm` when given), experts and weights (B, T, K)
        -> sum_k weights_k * expert_k(x) (+ residual): (B, T, D)."""
        return mixed_experts(
            self.gate_proj, self.up_proj, self.down_proj, x, experts, weights, residual, norm
        )


class ResidentSource:
    """Where experts come from when they are held in memory (the other source: streaming.ExpertStreamer).

    The loader asks its expert source, whichever it is, for the expert tensors' infos, which
    loaded tensors to keep, one experts object per MoE layer, and its counters.
    """

    stats = None  # no streaming counters

    def tensor_infos(self) -> dict:
        return {}  # the experts are in the safetensors files, with everything else

    def keep(self, tensors: dict) -> dict:
        return tensors

    def __call__(self, store: TensorStore, prefix: str) -> ResidentExperts:
        return ResidentExperts(store, prefix)

    def finish(self) -> None:
        pass  # the store checks that every tensor was taken


RESIDENT = ResidentSource()  # the default expert source: stateless, so one serves every model


def weighted_sum(y: mx.array, weights: mx.array) -> mx.array:
    """The experts' outputs y (B, T, K, D) mixed by weights (B, T, K) -> (B, T, D)."""
    return (y * weights[..., None]).sum(axis=-2)


@dataclass
class Routing:
    """One MoE layer's routing decision (kept for analysis: notebooks, tests)."""

    logits: mx.array  # (B, T, E) router scores before the softmax
    experts: mx.array  # (B, T, K) chosen expert ids
    weights: mx.array  # (B, T, K) their mixing weights


class MoE:
    """Router, K routed experts through the gathered kernel, optional gated shared expert."""

    def __init__(
        self,
        store: TensorStore,
        prefix: str,
        args: ModelArgs,
        k: int | None = None,
        experts=RESIDENT,
    ):
        self.k = k or args.num_experts_per_tok
        if not 1 <= self.k <= args.num_experts:
            raise FlashMoeError(f"experts per token must be in 1..{args.num_experts}, found k={self.k}")
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = store.linear(f"{prefix}.gate")  # the router: (E, D)
        # (x, ids, weights) -> (B, T, D): resident or streamed, one call
        self.experts = experts(store, prefix)
        has_shared = store.has(f"{prefix}.shared_expert.gate_proj.weight")
        self.shared_expert = MLP(store, f"{prefix}.shared_expert") if has_shared else None
        self.shared_expert_gate = store.linear(f"{prefix}.shared_expert_gate") if has_shared else None
        self.last_routing: Routing | None = None
        # resident or streamed experts the fused kernels run (expert-parallel shards have no form)
        fused_form = getattr(self.experts, "fused_form", None)
        form = fused_form(self.k) if has_shared and fused_form is not None else None
        self.shared_slot = (
            shared_slot(self.gate, self.shared_expert_gate, self.shared_expert, form, self.k)
            if form
            else None
        )

    def route(self, x: mx.array, norm: Norm | None = None) -> Routing:
        """The router's choice for x (B, T, D) (RMSNorm'd by `norm` when given): top-K experts and
        their weights."""
        logits = self.gate(x, norm=norm) if norm is not None else self.gate(x)  # (B, T, E)
        # A decode token on a GPU backend: one launch; many tokens (prefill, training, whose weights
        # need gradients) or other backends: MLX's ops.
        decode = logits.size // logits.shape[-1] * self.k <= FUSED_MAX_SLOTS
        backend = (
            getattr(self.gate, "backend", "reference") if decode else "reference"
        )  # analysis may wrap the gate
        experts, weights = route(logits, self.k, self.norm_topk_prob, backend=backend, out_dtype=x.dtype)
        return Routing(logits, experts, weights)

    def __call__(self, x: mx.array, residual: mx.array | None = None, norm: Norm | None = None) -> mx.array:
        """x (B, T, D) -> the block's output (B, T, D), plus `residual` when given: when nothing comes
        after the routed experts (no shared expert, no ranks to combine) they add it themselves (the
        GPU kernels as they write y), otherwise it is added last; either way in the order of
        additions of `residual + block(x)`. A decode token on a GPU whose shared expert has a
        SharedSlot takes the shared expert into the experts' two launches, residual included.

        norm: the RMSNorm before the block (the layer's post-attention norm), when the caller leaves
        it to the block: the router, expert and shared-expert kernels each apply it as they read x
        (launches fewer than one for the norm), or, where the experts are streamed, combined across
        ranks or the router is wrapped (analysis), it is applied here first."""
        combine = getattr(self.experts, "combine", None)  # expert parallel (flashmoe.distributed)
        plain = isinstance(self.gate, Linear) and isinstance(self.experts, ResidentExperts)
        if norm is not None and (combine is not None or not plain):
            x, norm = kernels.rms_norm(x, norm), None
        last = self.shared_expert is None and combine is None  # nothing follows the routed experts
        slot = self._live_shared_slot(combine)
        if plain and not timer.enabled and self.experts.routes_itself(x, self.k):
            # a decode token on a GPU: the router's logits go to the experts' first kernel, which
            # routes the token itself (no launch of the routing's own)
            if slot is not None:  # the shared expert rides in the experts' launches: nothing follows
                return self._routed_with_shared(x, slot, residual, norm)
            logits = self.gate(x, norm=norm)  # (B, T, E)
            y, ids, weights = self.experts.routed(
                x, logits, self.k, self.norm_topk_prob, residual if last else None, norm
            )
            self.last_routing = Routing(logits, ids, weights)
        elif slot is not None and not timer.enabled and x.size == x.shape[-1]:
            # a decode token whose experts are streamed (norm applied above): the router's matvec, the
            # routing's launch (the ids go to the host, which reads those experts), the two expert launches
            return self._streamed_with_shared(x, slot, residual)
        else:
            routing = self.last_routing = self.route(x, norm)
            timer.mark("routing", routing.experts, routing.weights)
            y = self._experts(x, routing, residual if last else None, norm)  # (B, T, D)
        timer.mark("experts", y)
        if last:
            return y  # (+ residual, added by the experts)
        if combine is not None:  # the ranks' partial sums meet here
            y = combine(x, y, self.shared if self.shared_expert is not None else None)
            timer.mark("all_sum", y)
        elif self.shared_expert is not None:
            y = y + self.shared(x, norm)
            timer.mark("shared expert", y)
        return y if residual is None else residual + y

    def _live_shared_slot(self, combine) -> SharedSlot | None:
        """The shared slot, while the block still holds what it was made from (and no ranks combine)."""
        slot = self.shared_slot
        if slot is None or combine is not None:
            return None
        held = (self.gate, self.shared_expert_gate, self.shared_expert)
        return slot if all(a is b for a, b in zip(slot.made_from, held)) else None

    def _routed_with_shared(self, x: mx.array, slot: SharedSlot, residual, norm: Norm | None) -> mx.array:
        """A decode token's whole block in the experts' two launches (and the router's one): routing,
        the K experts and the gated shared expert, + residual, rounded as `residual + (y + shared)`."""
        logits, gate = self._logits_and_shared_gate(x, slot, norm)
        y, ids, weights = self.experts.routed(
            x, logits, self.k, self.norm_topk_prob, residual, norm, shared=(slot, gate)
        )
        self.last_routing = Routing(self._routing_logits(logits), ids, weights)
        return y

    def _streamed_with_shared(self, x: mx.array, slot: SharedSlot, residual) -> mx.array:
        """_routed_with_shared for streamed experts: the routing's own launch (its ids go to the host,
        which reads those experts), then the K experts read and the gated shared expert in the two
        expert launches, + residual."""
        logits, gate = self._logits_and_shared_gate(x, slot, None)
        routing_logits = self._routing_logits(logits)
        ids, weights = route(
            routing_logits, self.k, self.norm_topk_prob, backend=self.gate.backend, out_dtype=x.dtype
        )
        self.last_routing = Routing(routing_logits, ids, weights)
        return self.experts(x, ids, weights, residual, shared=(slot, gate))

    def _logits_and_shared_gate(self, x: mx.array, slot: SharedSlot, norm: Norm | None):
        """The router's logits (B, T, E), or (B, T, E + 1) with the shared gate's after them from the
        slot's stacked router (one matvec), and the shared gate as the kernels read it."""
        if slot.router is not None:
            logits = slot.router(x, norm=norm)
            return logits, SharedGate(logits, self.gate.out_features)
        return self.gate(x, norm=norm), SharedGate(self.shared_expert_gate(x, norm=norm), 0)

    def _routing_logits(self, logits: mx.array) -> mx.array:
        """The router's own logits (B, T, E) of what _logits_and_shared_gate gives."""
        experts = self.gate.out_features
        return logits if logits.shape[-1] == experts else logits[..., :experts]

    def _experts(self, x: mx.array, routing: Routing, residual, norm: Norm | None) -> mx.array:
        """The routed experts' weighted sum (B, T, D) (+ residual): residual only reaches experts nothing
        follows (not the ranks' shards, which take neither), norm only resident ones."""
        args = [x, routing.experts, routing.weights]
        if residual is not None or norm is not None:
            args.append(residual)
        if norm is not None:
            args.append(norm)
        return self.experts(*args)

    def shared(self, x: mx.array, norm: Norm | None = None) -> mx.array:
        """The gated shared expert's output for x (B, T, D) (RMSNorm'd by `norm` when given)."""
        return mx.sigmoid(self.shared_expert_gate(x, norm=norm)) * self.shared_expert(x, norm=norm)
