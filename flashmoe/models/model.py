"""The decoder stack shared by the four architectures, built from a TensorStore.

    tokens (B, T) -> embed (B, T, D) -> layers -> RMSNorm -> lm_head -> logits (B, T, vocab)

Each layer: h = x + mixer(norm(x)); out = h + mlp(norm(h)), where the mixer is full
attention or (hybrid models) Gated DeltaNet, and the mlp is an MoE block or a dense MLP.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from .. import kernels
from ..timing import timer
from .args import ModelArgs
from .attention import Attention
from .cache import KVCache, LinearAttentionCache
from .gated_delta import GatedDeltaNet
from .moe import MLP, RESIDENT, MoE, ResidentExperts, Routing
from .store import TensorStore


@functools.lru_cache(maxsize=4)
def position(offset: int) -> mx.array:
    """A decode token's position as the (1,) int32 array the compiled step takes, made once per
    token for all the layers."""
    return mx.array([offset], dtype=mx.int32)


class DecoderLayer:
    """One transformer block: a token mixer and a feed-forward, each with a pre-norm and a residual.

    On a GPU backend a decode token (T = 1) runs through an mx.compile'd function of the whole
    layer, which fuses the elementwise work and drops Python from the step: the Gated DeltaNet
    layer with its conv and recurrent state in and out, or the full-attention layer with its KV
    buffers and the position in, the new key and value out (traced again only when the buffers
    grow); the layer then writes those into the buffers with a plain slice write.
    Streamed experts read from disk mid-layer, so their layers are never compiled.
    """

    def __init__(self, store: TensorStore, prefix: str, index: int, args: ModelArgs, k: int | None, experts):
        self.eps = args.rms_norm_eps
        self.input_layernorm = store.take(f"{prefix}.input_layernorm.weight")
        self.post_attention_layernorm = store.take(f"{prefix}.post_attention_layernorm.weight")
        self.is_linear = args.is_linear_attention(index)
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
        self._linear_step = mx.compile(self._pure_linear_step)
        self._attention_step = mx.compile(self._pure_attention_step)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        # compiled: one decode token with a cache to carry (a Gated DeltaNet layer's first token
        # has no state yet) and no --timing (which syncs between phases)
        step = self.compiled and x.shape[1] == 1 and cache is not None and not timer.enabled
        if not step or (self.is_linear and cache.state_ is None):
            return self._feed(self._mix(x, cache))
        if self.is_linear:
            out, cache.conv, cache.state_, *routing = self._linear_step(x, cache.conv, cache.state_)
            cache.offset += 1
        else:
            self.mixer.reserve(cache, cache.offset + 1, x)
            out, k_new, v_new, *routing = self._attention_step(
                x, cache.keys, cache.values, position(cache.offset)
            )
            cache.write(k_new, v_new)
        if routing:
            self.mlp.last_routing = Routing(*routing)
        return out

    def _mix(self, x: mx.array, cache) -> mx.array:
        h = x + self.mixer(mx.fast.rms_norm(x, self.input_layernorm, self.eps), cache)
        timer.mark(self.mixer_phase, h)
        return h

    def _feed(self, h: mx.array) -> mx.array:
        out = h + self.mlp(mx.fast.rms_norm(h, self.post_attention_layernorm, self.eps))
        if isinstance(self.mlp, MLP):
            timer.mark("dense mlp", out)
        return out

    def _pure_linear_step(self, x: mx.array, conv: mx.array, state: mx.array) -> list[mx.array]:
        """A Gated DeltaNet layer's decode token as a pure function (compiled): cache in, cache out."""
        cache = LinearAttentionCache()
        cache.conv, cache.state_ = conv, state
        return [self._feed(self._mix(x, cache)), cache.conv, cache.state_, *self._routing()]

    def _pure_attention_step(
        self, x: mx.array, keys: mx.array, values: mx.array, pos: mx.array
    ) -> list[mx.array]:
        """A full-attention layer's decode token as a pure function (compiled): KV buffers in, the
        new token's key and value out (the caller writes them)."""
        mixed, k_new, v_new = self.mixer.decode(
            mx.fast.rms_norm(x, self.input_layernorm, self.eps), keys, values, pos
        )
        return [self._feed(x + mixed), k_new, v_new, *self._routing()]

    def _routing(self) -> list[mx.array]:
        """The MoE layer's routing arrays, returned by the compiled functions for model.routing()."""
        if not isinstance(self.mlp, MoE):
            return []
        r = self.mlp.last_routing
        return [r.logits, r.experts, r.weights]

    def make_cache(self):
        return LinearAttentionCache() if self.is_linear else KVCache()


class Model:
    """A loaded model: `model(tokens, cache) -> logits`; `make_cache()` for incremental decoding."""

    def __init__(self, store: TensorStore, args: ModelArgs, k: int | None = None, experts=RESIDENT):
        """`experts` builds each MoE layer's experts object (ResidentSource, or streaming.ExpertStreamer)."""
        self.args = args
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

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        """tokens (B, T) int32 -> logits (B, T, vocab); caches are updated in place."""
        h = self.embed_tokens(tokens)  # (B, T, D)
        timer.mark("embedding", h)
        for layer, layer_cache in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, layer_cache)
        h = mx.fast.rms_norm(h, self.norm, self.args.rms_norm_eps)
        logits = self.lm_head(h) if self.lm_head is not None else self.embed_tokens.as_linear(h)
        timer.mark("output", logits)
        return logits

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
