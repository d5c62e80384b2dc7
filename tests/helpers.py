"""What several test modules share: backend skips, tiny mlx-lm checkpoints, a tiny tokenizer, a mock model.

Tiny random checkpoints are written by mlx-lm itself (quantize_model + save_model + save_config):
mlx-lm is the reference, and these directories are what its `convert` would write for a model
of each supported architecture, only small.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest
from mlx.utils import tree_map_with_path
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from flashmoe import kernels
from flashmoe.analysis.parity import rel_err  # noqa: F401 (re-exported: the one rel_err)
from flashmoe.tokenizer import Tokenizer


def require_backend(backend: str) -> None:
    """Skip, with the reason, when `backend` cannot run on this machine."""
    if not kernels.backend_available(backend):
        why = {
            "metal": "Metal is not available (mx.metal.is_available() is False); the Apple Silicon CI runs these",
            "cuda": "CUDA is not available (needs an NVIDIA GPU and mlx[cuda13])",
            "native": "native CPU kernels unavailable: "
            f"{kernels.native.why_unavailable() or 'the default device is a GPU'}",
        }[backend]
        pytest.skip(why)


needs_cuda = pytest.mark.skipif(
    not kernels.backend_available("cuda"),
    reason="CUDA is not available here (needs an NVIDIA GPU as MLX's default device and mlx[cuda13])",
)


# --- tiny checkpoints written by mlx-lm ---------------------------------------------------------

# Widths of 128 let every group size (32/64/128) quantize every linear layer.
_COMMON = dict(
    hidden_size=128,
    num_hidden_layers=4,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    rms_norm_eps=1e-6,
    vocab_size=320,  # >= the tiny tokenizer's 300 ids
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
_LINEAR_ATTENTION = dict(
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    full_attention_interval=4,
    shared_expert_intermediate_size=128,
    decoder_sparse_step=1,
    head_dim=32,
)
CONFIGS = {
    "qwen3_next": dict(
        _COMMON,
        **_LINEAR_ATTENTION,
        model_type="qwen3_next",
        mlp_only_layers=[],
        partial_rotary_factor=0.25,
        norm_topk_prob=True,
    ),
    "qwen3_moe": dict(
        _COMMON,
        model_type="qwen3_moe",
        head_dim=32,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        norm_topk_prob=True,
    ),
    "qwen2_moe": dict(_COMMON, model_type="qwen2_moe", shared_expert_intermediate_size=128),
    "qwen3_5_moe": dict(
        model_type="qwen3_5_moe",
        text_config=dict(
            _COMMON,
            **_LINEAR_ATTENTION,
            model_type="qwen3_5_moe_text",
            rope_parameters=dict(type="default", rope_theta=10000.0, partial_rotary_factor=0.25),
        ),
    ),
}


def gates_at_8_bits(path: str, _module) -> dict | bool:
    """The routers at 8 bits, as mlx-lm's own predicates for these models do (qwen2_moe has none)."""
    if path.endswith("mlp.gate") or path.endswith("shared_expert_gate"):
        return {"group_size": 64, "bits": 8}
    return True


def write_checkpoint(
    directory: Path,
    model_type: str,
    *,
    group_size=64,
    bits=4,
    predicate=None,
    seed=0,
    overrides=None,
    quantize=True,
) -> Path:
    """Build a random mlx-lm model of `model_type`, quantize it as mlx-lm does, save it to `directory`."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    config = json.loads(json.dumps(CONFIGS[model_type]))
    fields = config.get("text_config", config)
    fields.update(overrides or {})
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    cast = getattr(model, "cast_predicate", lambda _: True)  # as mlx-lm's convert: bf16, A_log kept
    model.update(
        tree_map_with_path(
            lambda k, v: v.astype(mx.bfloat16) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters(),
        )
    )
    predicate = predicate or getattr(model, "quant_predicate", None) or gates_at_8_bits
    if quantize:
        model, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(directory, model)
    save_config(config, directory / "config.json")
    return directory


# --- a tiny tokenizer and a mock model -----------------------------------------------------------

SENTENCES = [
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Le café est très bon, déjà vu à Paris.",
    "中文测试：你好，世界。模型生成文本。",
    "Emoji time 🎉🚀 and more 🎉 fun 🙂.",
    "The quick brown fox jumps over the lazy dog.",
]
MULTIBYTE = "café 中文 🎉🚀 déjà"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_tokenizer(folder: Path) -> Path:
    """Train a ~300-id byte-level BPE and write the files a model folder carries."""
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(SENTENCES, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save(str(folder / "tokenizer.json"))
    config = {"eos_token": {"content": "<|im_end|>"}, "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return folder


class RecordingCache:
    """Stands in for a layer cache: remembers every id the model was fed through it."""

    def __init__(self):
        self.fed: list[int] = []
        self.state_reads = 0  # prefill forces the state once per chunk

    @property
    def state(self) -> list[mx.array]:
        self.state_reads += 1
        return [mx.array(self.fed or [0])]


class MockModel:
    """Deterministic logits peaked at rule(position, token); by default the next id is (token + 1) % V."""

    def __init__(self, vocab_size: int, rule: Callable[[int, int], int] | None = None):
        self.args = SimpleNamespace(vocab_size=vocab_size)
        self.rule = rule or (lambda position, token: (token + 1) % vocab_size)
        self.calls: list[int] = []  # T of every forward call

    def make_cache(self) -> list[RecordingCache]:
        return [RecordingCache(), RecordingCache()]

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        ids = tokens[0].tolist()
        start = len(cache[0].fed) if cache else 0
        for c in cache or []:
            c.fed.extend(ids)
        self.calls.append(len(ids))
        peaks = mx.array([[self.rule(start + t, tok) for t, tok in enumerate(ids)]])  # (1, T)
        distance = (mx.arange(self.args.vocab_size)[None, None, :] - peaks[..., None]) % self.args.vocab_size
        return -0.5 * distance.astype(mx.float32)  # (1, T, V): the peak id has 0, the rest decay


def script_model(tokenizer: Tokenizer, prompt_len: int, script: list[int]) -> MockModel:
    """A mock model that answers a prompt of `prompt_len` ids with `script`."""
    last = prompt_len - 1
    return MockModel(
        tokenizer.vocab_size, lambda p, t: script[p - last] if 0 <= p - last < len(script) else 1
    )
