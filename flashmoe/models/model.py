"""The decoder stack shared by the four architectures, built from a TensorStore.

    tokens (B, T) -> embed (B, T, D) -> layers -> RMSNorm -> lm_head -> logits (B, T, vocab)

Each layer: h = x + mixer(norm(x)); out = h + mlp(norm(h)), where the mixer is full
attention or (hybrid models) Gated DeltaNet, and the mlp is an MoE block or a dense MLP.
"""

from __future__ import annotations

import mlx.core as mx

from .. import kernels
from ..timing import timer
from .args import ModelArgs
from .attention import Attention
from .cache import KVCache, LinearAttentionCache
from .gated_delta import GatedDeltaNet
from .moe import MLP, RESIDENT, MoE, ResidentExperts, Routing
from .store import TensorStore

POSITIONS = 4096  # decode positions made on the device at a time


def held_arrays(obj, seen: set | None = None) -> list[mx.array]:
    """Every mx.array a flashmoe object holds, through its attributes, lists, tuples, dicts and
    dataclasses (the weights, and what was derived from them at load)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, mx.array):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("flashmoe"):
        items = list(vars(obj).values())
    else:
        return []
    return [a for item in items for a in held_arrays(item, seen)]


class DecoderLayer:
    """One transformer block: a token mixer and a feed-forward, each with a pre-norm and a residual.

    `compiled` says whether a decode token may run through the model's compiled step (on a GPU
    backend, experts resident): `step` is this layer's part of it, a pure function of the token's
    hidden state, its position and the `carried` arrays of its cache (Gated DeltaNet: 2, conv and
    recurrent state; attention: 1, the KV buffer), giving as many arrays to store back (the new conv
    and state, or the new token's keys and values as one array, which `commit` writes into the
    buffer with one plain slice write). Streamed experts read from disk mid-layer, so their layers
    are never compiled.
    """

    def __init__(self, store: TensorStore, prefix: str, index: int, args: ModelArgs, k: int | None, experts):
        self.eps = args.rms_norm_eps
        self.input_layernorm = store.take(f"{prefix}.input_layernorm.weight")
        self.post_attention_layernorm = store.take(f"{prefix}.post_attention_layernorm.weight")
        self.is_linear = args.is_linear_attention(index)
        self.carried = 2 if self.is_linear else 1  # cache arrays in and out of `step`
        if self.is_linear:
            self.mixer, self.mixer_phase = (
                GatedDeltaNet(store, f"{prefix}.linear_attn", args),
                "linear attention",
            )
        else:
            self.mixer, self.mixer_phase = (
                Attention(store, f"{prefix}.self_attn", args),
                "attention",
            )
        self.mlp = (
            MoE(store, f"{prefix}.mlp", args, k, experts)
            if args.is_moe(index)
            else MLP(store, f"{prefix}.mlp")
        )
        resident = not isinstance(self.mlp, MoE) or isinstance(self.mlp.experts, ResidentExperts)
        self.compiled = store.backend in kernels.GPU_BACKENDS and resident

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        return self._feed(self._mix(x, cache))

    def _mix(self, x: mx.array, cache) -> mx.array:
        h = self.mixer(mx.fast.rms_norm(x, self.input_layernorm, self.eps), cache, residual=x)
        timer.mark(self.mixer_phase, h)
        return h

    def _feed(self, h: mx.array) -> mx.array:
        out = self.mlp(mx.fast.rms_norm(h, self.post_attention_layernorm, self.eps), residual=h)
        if isinstance(self.mlp, MLP):
            timer.mark("dense mlp", out)
        return out

    def ready(self, cache) -> bool:
        """Whether `cache` holds what a compiled step takes (a first token has no state or buffers yet)."""
        return (cache.state_ if self.is_linear else cache.kv) is not None

    def step_inputs(self, cache) -> list[mx.array]:
        """The `carried` cache arrays `step` takes: conv and state, or the KV buffer with room for one
        more token."""
        if self.is_linear:
            return [cache.conv, cache.state_]
        cache.make_room()
        return [cache.kv]

    def step(self, x: mx.array, pos: mx.array, *carried: mx.array) -> tuple[mx.array, list, list]:
        """x (B, 1, D) at position pos (1,) int32, the `carried` cache arrays -> (out (B, 1, D), the
        `carried` arrays to store back, the MoE layer's routing arrays or []).

        The two RMSNorms are left to the kernels that read their output (the mixer's input
        projection; the router, experts and shared expert): no launch of their own."""
        input_norm = (self.input_layernorm, self.eps)
        if self.is_linear:
            cache = LinearAttentionCache()
            cache.conv, cache.state_ = carried
            h = self.mixer(x, cache, residual=x, norm=input_norm)
            stored = [cache.conv, cache.state_]
        else:
            (kv,) = carried
            h, kv_new = self.mixer.decode(x, kv, pos, residual=x, norm=input_norm)
            stored = [kv_new]
        out = self.mlp(h, residual=h, norm=(self.post_attention_layernorm, self.eps))
        routing = self.mlp.last_routing if isinstance(self.mlp, MoE) else None
        return out, stored, [] if routing is None else [routing.logits, routing.experts, routing.weights]

    def commit(self, cache, outputs: list[mx.array]) -> list[mx.array]:
        """Store this layer's part of the step's outputs (its `carried` arrays: the new conv and
        state, or the new token's kv written at the cache's offset; then the routing's three arrays
        for an MoE layer); return the rest."""
        if self.is_linear:
            cache.conv, cache.state_ = outputs[:2]
            cache.offset += 1
        else:
            cache.write(outputs[0])
        outputs = outputs[self.carried :]
        if not isinstance(self.mlp, MoE):
            return outputs
        self.mlp.last_routing = Routing(*outputs[:3])
        return outputs[3:]

    def make_cache(self):
        return LinearAttentionCache() if self.is_linear else KVCache()


class Model:
    """A loaded model: `model(tokens, cache) -> logits`; `make_cache()` for incremental decoding."""

    def __init__(self, store: TensorStore, args: ModelArgs, k: int | None = None, experts=RESIDENT):
        """`experts` builds each MoE layer's experts object (ResidentSource, or streaming.ExpertStreamer)."""
        self.args = args
        self.backend = store.backend  # the kernel backend its layers run on
        root = args.arch.weight_prefix
        self.embed_tokens = store.embedding(f"{root}model.embed_tokens")
        self.layers = [
            DecoderLayer(store, f"{root}model.layers.{i}", i, args, k, experts)
            for i in range(args.num_hidden_layers)
        ]
        self.norm = store.take(f"{root}model.norm.weight")
        # mlx-lm keeps lm_head whenever the checkpoint has one (qwen2_moe even when tied).
        has_head = store.has(f"{root}lm_head.weight") or not args.tie_word_embeddings
        self.lm_head = store.linear(f"{root}lm_head") if has_head else None
        self.report = None  # what the loader found (flashmoe.loader.LoadReport), set by the loader
        self.compiled = all(layer.compiled for layer in self.layers)
        self._step = mx.compile(self._pure_step)
        self._positions: mx.array | None = None  # 0, 1, 2, ... on the device (_position)
        self._held_ready = False  # held_arrays(self) evaluated before the first trace (_decode)

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        """tokens (B, T) int32 -> logits (B, T, vocab); caches are updated in place."""
        if self._compiled_step_runs(tokens, cache):
            return self._decode(tokens, cache)
        h = self.embed_tokens(tokens)  # (B, T, D)
        timer.mark("embedding", h)
        for layer, layer_cache in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, layer_cache)
        return self._output(h)

    def _output(self, h: mx.array) -> mx.array:
        """The last hidden state (B, T, D) -> logits (B, T, vocab): the final RMSNorm, which the
        head's kernel applies as it reads h for one token on a GPU, and the head."""
        norm = (self.norm, self.args.rms_norm_eps)
        head = self.lm_head if self.lm_head is not None else self.embed_tokens.as_linear
        logits = head(h, norm=norm)
        timer.mark("output", logits)
        return logits

    def _compiled_step_runs(self, tokens: mx.array, cache: list | None) -> bool:
        """One decode token, every layer compilable, every cache holding state, no --timing (which
        syncs between phases): the compiled step runs."""
        return (
            self.compiled
            and tokens.shape[1] == 1
            and cache is not None
            and not timer.enabled
            and all(layer.ready(c) for layer, c in zip(self.layers, cache))
        )

    def _decode(self, tokens: mx.array, cache: list) -> mx.array:
        """One decode token through the compiled step: the whole stack, embedding to logits, in one
        mx.compile'd call (traced again only when the KV buffers grow), then the caches updated."""
        if not self._held_ready:
            # Arrays derived at load (stacked projections and routers, a contiguous conv kernel) are lazy
            # until something reads them; the compiled step must close over their data, or its trace
            # would take the derivation in and redo it every token (24 concatenations a cn8 step,
            # seen on the H200). Not at load: training builds a model inside its compiled gradient.
            mx.eval(held_arrays(self))
            self._held_ready = True
        inputs = [a for layer, c in zip(self.layers, cache) for a in layer.step_inputs(c)]
        logits, *outputs = self._step(tokens, self._position(cache[0].offset), *inputs)
        for layer, c in zip(self.layers, cache):
            outputs = layer.commit(c, outputs)
        return logits

    def _position(self, offset: int) -> mx.array:
        """offset as a (1,) int32 array (so the compiled step's trace does not depend on it): a view
        into positions the device wrote once. An array the host made each step would be 4 bytes
        in MLX CUDA's shared pool of managed memory, which every kernel reading it waits for (page faults)."""
        if self._positions is None or offset >= self._positions.size:
            self._positions = mx.arange(-(-(offset + 1) // POSITIONS) * POSITIONS, dtype=mx.int32)
            mx.eval(self._positions)
        return self._positions[offset : offset + 1]

    def _pure_step(self, tokens: mx.array, pos: mx.array, *inputs: mx.array) -> list[mx.array]:
        """tokens (B, 1), pos (1,) int32, each layer's `carried` cache arrays in turn -> [logits (B, 1,
        vocab), then per layer its arrays to store back and the routing's logits, experts and weights]."""
        h, outputs, at = self.embed_tokens(tokens), [], 0
        for layer in self.layers:
            h, stored, routing = layer.step(h, pos, *inputs[at : at + layer.carried])
            outputs += stored + routing
            at += layer.carried
        return [self._output(h), *outputs]

    def make_cache(self) -> list:
        """Fresh per-layer caches: KV for attention layers, conv + recurrent state for Gated DeltaNet."""
        return [layer.make_cache() for layer in self.layers]

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers that route to experts."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer.mlp, MoE)]

    def routing(self) -> dict[int, Routing]:
        """The routing of the last forward call, per MoE layer (for analysis)."""
        return {i: self.layers[i].mlp.last_routing for i in self.moe_layers}
