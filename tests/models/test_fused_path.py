"""The model's fused, compiled decode path (kernels.moe, kernels.gated_delta, mx.compile: what a GPU runs)
against its plain path. Here the fused functions run as their pure-MLX references, so the plumbing (shapes,
ids, weights, caches, streamed buffers, compilation) is checked on every machine; the kernels themselves
are checked against the same references in tests/kernels."""

from __future__ import annotations

import collections
import dataclasses
import re
import tempfile

import mlx.core as mx
import pytest

from flashmoe import kernels
from flashmoe.analysis.parity import forced_decode_logits
from flashmoe.loader import load_model
from flashmoe.models.cache import KVCache
from flashmoe.models.model import held_arrays
from flashmoe.models.moe import MoE
from tests.helpers import CONFIGS, rel_err, write_checkpoint

PROMPT, TOKENS = [3, 17, 42, 9, 77], [5, 61, 12, 250]


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("stream", [False, True], ids=["resident", "streamed"])
@pytest.mark.parametrize("kv_step", [256, 4], ids=["kv-room", "kv-grows"])
def test_fused_moe_path_matches_the_gathered_path(model_type, stream, kv_step, tmp_path, monkeypatch):
    monkeypatch.setattr(KVCache, "STEP", kv_step)  # 4: the KV buffers grow (and the step retraces) mid-decode
    directory = write_checkpoint(tmp_path / model_type, model_type)
    load = dict(backend="reference", stream_experts=stream, dtype=mx.float32)  # float32 on any device
    gathered = forced_decode_logits(load_model(directory, **load), PROMPT, TOKENS)
    monkeypatch.setattr(kernels, "GPU_BACKENDS", (*kernels.GPU_BACKENDS, "reference"))
    model = load_model(directory, **load)
    fused = forced_decode_logits(model, PROMPT, TOKENS)
    assert fused.shape == gathered.shape and fused.dtype == mx.float32
    assert rel_err(fused, gathered) < 1e-5
    assert all(layer.compiled for layer in model.layers) == (not stream)  # streamed experts sync mid-layer
    routing = model.routing()[model.moe_layers[0]]  # what the last (compiled) step chose, for analysis
    assert routing.experts.shape == (1, 1, model.args.num_experts_per_tok)


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_moe"])
def test_the_compiled_step_is_traced_again_only_when_the_kv_buffers_grow(model_type, tmp_path, monkeypatch):
    """The whole stack is one mx.compile'd function: traced once per KV buffer capacity, never per
    token (a retrace every token would be a silent slowdown on a GPU)."""
    monkeypatch.setattr(KVCache, "STEP", 4)
    monkeypatch.setattr(kernels, "GPU_BACKENDS", (*kernels.GPU_BACKENDS, "reference"))
    model = load_model(
        write_checkpoint(tmp_path / model_type, model_type), backend="reference", dtype=mx.float32
    )
    traced = []
    pure_step = model._pure_step
    monkeypatch.setattr(model, "_step", mx.compile(lambda *a: traced.append(1) or pure_step(*a)))
    cache = model.make_cache()
    model(mx.array([PROMPT]), cache)  # 5 positions: the buffers hold 8
    for t in [5, 61, 12, 250, 7, 99, 3, 17, 42, 9]:  # positions 5..14: the buffers grow at 8 and 12
        mx.eval(model(mx.array([[t]]), cache))
    assert all(c.offset == 15 for c in cache)
    assert len(traced) == 3  # capacities 8, 12 and 16


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_moe"])
def test_a_decode_token_writes_each_kv_cache_once(model_type, tmp_path, monkeypatch):
    """A compiled decode step takes one array per attention layer (its KV buffer) and gives one back
    (the new token's keys and values), which the cache stores with one slice write: on a GPU each
    graph node costs host time per token, so two writes (keys, values) would cost one node more per
    attention layer. Counted in the graph one step leaves behind (mx.export_to_dot)."""
    monkeypatch.setattr(kernels, "GPU_BACKENDS", (*kernels.GPU_BACKENDS, "reference"))
    model = load_model(
        write_checkpoint(tmp_path / model_type, model_type), backend="reference", dtype=mx.float32
    )
    cache = model.make_cache()
    mx.eval(model(mx.array([PROMPT]), cache), [c.state for c in cache])  # nothing of the prefill left
    calls, step = [], model._step

    def recorded(*inputs):
        calls.append((inputs, step(*inputs)))
        return calls[-1][1]

    monkeypatch.setattr(model, "_step", recorded)
    mx.eval(model(mx.array([[TOKENS[0]]]), cache))
    (inputs, outputs), kv_caches = calls[0], [c for c in cache if isinstance(c, KVCache)]
    attention = [layer for layer in model.layers if not layer.is_linear]
    assert len(kv_caches) == len(attention) > 0 and all(layer.carried == 1 for layer in attention)
    assert len(inputs) == 2 + sum(layer.carried for layer in model.layers)  # tokens, pos, the caches
    assert len(outputs) == 1 + sum(layer.carried for layer in model.layers) + 3 * len(model.moe_layers)
    assert all(c.offset == len(PROMPT) + 1 and c.kv.shape[0] == 2 for c in kv_caches)

    mx.eval([c.state for c in cache])
    logits = model(mx.array([[TOKENS[1]]]), cache)
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, logits, *[a for c in cache for a in c.state])
        kinds = collections.Counter(re.findall(r'label ="([^"]+)"', f.read()))
    assert kinds["SliceUpdate"] == len(kv_caches), kinds


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_next"])
def test_the_shared_expert_rides_in_the_experts_launches(model_type, tmp_path, monkeypatch):
    """Where the shared expert is quantized as the routed experts, a decode token's shared expert is
    slot K of the fused launches (MoE.shared never runs), with the router's matvec carrying the shared
    gate's row or, unstacked, the gate on its own; a router swapped after load (as analysis swaps it)
    turns the slot off rather than computing with the weights it was made from."""
    directory = write_checkpoint(tmp_path / model_type, model_type)
    load = dict(backend="reference", dtype=mx.float32)
    gathered = forced_decode_logits(load_model(directory, **load), PROMPT, TOKENS)
    monkeypatch.setattr(kernels, "GPU_BACKENDS", (*kernels.GPU_BACKENDS, "reference"))
    model = load_model(directory, **load)
    blocks = [model.layers[i].mlp for i in model.moe_layers]
    assert all(b.shared_slot is not None and b.shared_slot.router is not None for b in blocks)
    shared_calls = []
    plain_shared = MoE.shared
    monkeypatch.setattr(
        MoE, "shared", lambda self, *a, **k: shared_calls.append(1) or plain_shared(self, *a, **k)
    )

    def decode() -> mx.array:
        model._step = mx.compile(model._pure_step)  # traced anew: the blocks changed
        return forced_decode_logits(model, PROMPT, TOKENS)

    assert rel_err(decode(), gathered) < 1e-5 and not shared_calls  # (the 5-token prompt rides too)
    experts = model.args.num_experts
    assert all(r.logits.shape == (1, 1, experts) for r in model.routing().values())  # the router's alone
    for b in blocks:
        b.shared_slot = dataclasses.replace(b.shared_slot, router=None)
    assert rel_err(decode(), gathered) < 1e-5 and not shared_calls
    for b in blocks:
        b.gate = dataclasses.replace(b.gate)  # an equal router, but not the one the slot was made from
    assert rel_err(decode(), gathered) < 1e-5 and shared_calls  # the plain shared expert again


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_next", "qwen3_5_moe"])
def test_streamed_experts_take_the_shared_expert_into_their_launches(model_type, tmp_path, monkeypatch):
    """With streamed experts a decode token's shared expert is slot K of the fused launches on the
    experts just read, as resident experts take it (MoE.shared never runs); the logits stay those of
    the gathered path. A prompt (many tokens) runs the shared expert apart."""
    directory = write_checkpoint(tmp_path / model_type, model_type)
    load = dict(backend="reference", dtype=mx.float32)
    gathered = forced_decode_logits(load_model(directory, **load), PROMPT, TOKENS)
    monkeypatch.setattr(kernels, "GPU_BACKENDS", (*kernels.GPU_BACKENDS, "reference"))
    model = load_model(directory, **load, stream_experts=True)
    blocks = [model.layers[i].mlp for i in model.moe_layers]
    assert all(b.shared_slot is not None for b in blocks)
    tokens_seen = []
    plain_shared = MoE.shared
    monkeypatch.setattr(
        MoE,
        "shared",
        lambda self, x, *a, **k: tokens_seen.append(x.shape[1]) or plain_shared(self, x, *a, **k),
    )
    assert rel_err(forced_decode_logits(model, PROMPT, TOKENS), gathered) < 1e-5
    assert set(tokens_seen) == {len(PROMPT)}, "a decode token ran the shared expert apart"
    experts = model.args.num_experts
    assert all(r.logits.shape == (1, 1, experts) for r in model.routing().values())


def unevaluated(arrays) -> list:
    """The shapes of those arrays that are still an op to run, not data."""
    shapes = []
    for array in arrays:
        with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
            mx.export_to_dot(f.name, array)
            shapes += [array.shape] if "label" in f.read() else []
    return shapes


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_what_the_compiled_step_reads_is_evaluated_before_it_is_traced(model_type, tmp_path, monkeypatch):
    """After a prompt too long for the fused kernels (the plain path), every array the model holds is
    data by the time the compiled step is first called: an unevaluated one (a lazy stacking, such as
    the shared slot's router, which only decode reads) would be traced into the step and recomputed
    every token (seen on the H200: 24 Concatenate nodes a step)."""
    monkeypatch.setattr(kernels, "GPU_BACKENDS", (*kernels.GPU_BACKENDS, "reference"))
    model = load_model(
        write_checkpoint(tmp_path / model_type, model_type), backend="reference", dtype=mx.float32
    )
    cache = model.make_cache()
    long_prompt = list(range(3, 3 + 70))  # 70 tokens x K > FUSED_MAX_SLOTS: no shared slot in the prompt
    mx.eval(model(mx.array([long_prompt]), cache))
    found, step = [], model._step

    def checked(*inputs):
        found.extend(unevaluated(held_arrays(model.layers)))
        return step(*inputs)

    monkeypatch.setattr(model, "_step", checked)
    mx.eval(model(mx.array([[5]]), cache))
    assert not found, found


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_array_a_model_holds_is_row_contiguous(model_type, tmp_path, monkeypatch):
    """A GPU kernel copies an input that is not row-contiguous, in every launch: a weight kept as a
    transposed view costs a copy launch per layer and token (Gated DeltaNet's conv kernel did, seen on
    the H200). Every array a loaded model holds (the GPU layout: fused paths on) is row-contiguous."""
    monkeypatch.setattr(kernels, "GPU_BACKENDS", (*kernels.GPU_BACKENDS, "reference"))
    model = load_model(
        write_checkpoint(tmp_path / model_type, model_type), backend="reference", dtype=mx.float32
    )
    held = [a for a in held_arrays(model) if a.size > 1]
    mx.eval(held)
    assert held and all(memoryview(a).c_contiguous for a in held), [
        a.shape for a in held if not memoryview(a).c_contiguous
    ]
