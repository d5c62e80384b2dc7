"""`python -m flashmoe.tools.synth --preset NAME --layers N --out DIR`: random checkpoints at real widths.

What mlx-lm's `convert` would write for a real model (config.json with its quantization
section, tensor names and shapes, 4-bit g64 weights with bf16 scales and biases, 8-bit
routers and shared-expert gates, a tokenizer), filled with random values, so that streaming
and memory can be measured on the real sizes without downloading 44 GB. It is written one
shard per layer and one tensor (experts: 32 at a time) at a time, so memory stays small
whatever the model's size.

Values: non-expert weights are normal (std 0.02) and quantized with mx.quantize. Expert
codes are drawn uniformly from the 16 4-bit levels with per-group scales and biases that
centre them on zero: what quantizing uniform weights on that grid gives, at a fraction of
the cost. Routers are not uniform: expert e's row is scaled by 1 + HOT_SCALE * exp(-r_e / HOT_DECAY)
(r_e a random rank per layer), so a few experts per layer are chosen far more often than the
rest, as in trained models. Generated text is gibberish, which is fine for measuring.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import FlashMoeError
from ..models.args import ModelArgs, param_shapes
from ..progress import progress_bar, shown
from ..quant import QuantSpec, quantization_section, with_section
from ..safetensors import SafetensorsWriter
from . import HelpFormatter, add_output_options, output_directory

PRESETS = {
    "qwen3-coder-next": dict(  # Qwen3-Coder-Next / Qwen3-Next-80B-A3B
        architectures=["Qwen3NextForCausalLM"],
        model_type="qwen3_next",
        hidden_size=2048,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        partial_rotary_factor=0.25,
        full_attention_interval=4,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        num_experts=512,
        num_experts_per_tok=10,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        intermediate_size=5120,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        vocab_size=151936,
        rms_norm_eps=1e-6,
        rope_theta=5000000.0,
        max_position_embeddings=262144,
        tie_word_embeddings=False,
        attention_bias=False,
    ),
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        hidden_size=2048,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        intermediate_size=6144,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        vocab_size=151936,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        attention_bias=False,
    ),
}
# A small qwen3_moe for CPU benchmarks: hidden 1024, 64 experts top-8 (the CPU issue's checkpoint shape).
PRESETS["qwen3-moe-small"] = dict(
    PRESETS["qwen3-30b-a3b"],
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=64,
    moe_intermediate_size=512,
    intermediate_size=2816,
    vocab_size=32000,
)
BITS, GROUP_SIZE, ROUTER_BITS = 4, 64, 8
STD = 0.02  # weight init, as Hugging Face's initializer_range
HOT_SCALE, HOT_DECAY = 2.0, 8.0  # router row scaling: a few hot experts per layer
EXPERT_CHUNK = 32  # experts generated and written at a time
TOKENIZER_LINES = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. Mixture-of-Experts models route each token to a few experts.",
    "import numpy as np\nfor i in range(10):\n    print(i, np.sqrt(i))\n",
    "Streaming experts from an SSD lets a laptop run a model larger than its memory.",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Planned:
    """One module or tensor to generate: `kind` says how, `shape` is its float (unquantized) shape."""

    name: str  # module name for quantized kinds, tensor name for the others
    kind: (
        str  # "linear" (4-bit), "router" (8-bit), "experts" (stacked 4-bit codes), "ones", "a_log", "normal"
    )
    shape: tuple[int, ...]

    @property
    def bits(self) -> int:
        return ROUTER_BITS if self.kind == "router" else BITS

    def entries(self) -> list[tuple[str, str, tuple]]:
        """The (name, dtype, shape) tensors this becomes on disk."""
        if self.kind in ("ones", "a_log", "normal"):
            return [(self.name, "BF16", self.shape)]
        *lead, out, inp = self.shape
        return [
            (f"{self.name}.weight", "U32", (*lead, out, inp * self.bits // 32)),
            (f"{self.name}.scales", "BF16", (*lead, out, inp // GROUP_SIZE)),
            (f"{self.name}.biases", "BF16", (*lead, out, inp // GROUP_SIZE)),
        ]


def global_plan(c: dict) -> list[Planned]:
    """Embeddings, final norm and output head."""
    return [
        _planned(name, shape)
        for name, shape in param_shapes(ModelArgs.from_config(c)).items()
        if ".layers." not in name
    ]


def layer_plan(c: dict, i: int) -> list[Planned]:
    """Layer i's tensors, named and shaped as mlx-lm's model (models.args.param_shapes)."""
    prefix = f"model.layers.{i}."
    return [
        _planned(name, shape)
        for name, shape in param_shapes(ModelArgs.from_config(c)).items()
        if name.startswith(prefix)
    ]


def _all_planned(c: dict) -> list[tuple[str, Planned]]:
    return [(name, _planned(name, shape)) for name, shape in param_shapes(ModelArgs.from_config(c)).items()]


def _planned(name: str, shape: tuple[int, ...]) -> Planned:
    """How a tensor is generated, by its name: quantized modules are planned by module name."""
    if name.endswith(("norm.weight", "dt_bias")):
        return Planned(name, "ones", shape)
    if name.endswith("A_log"):
        return Planned(name, "a_log", shape)
    if name.endswith(("conv1d.weight", ".bias")):
        return Planned(name, "normal", shape)
    module = name.removesuffix(".weight")
    if module.endswith((".mlp.gate", ".shared_expert_gate")):
        return Planned(module, "router", shape)
    return Planned(module, "experts" if ".switch_mlp." in name else "linear", shape)


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def generate(item: Planned, rng: np.random.Generator):
    """Yield (tensor name, data) pieces of `item`, in its entries' order."""
    if item.kind == "ones":
        yield item.name, bf16_bits(np.ones(item.shape, np.float32))
    elif item.kind == "a_log":
        yield item.name, bf16_bits(np.log(rng.uniform(1, 16, item.shape)))
    elif item.kind == "normal":
        yield item.name, bf16_bits(rng.standard_normal(item.shape, np.float32) * 0.1)
    elif item.kind == "experts":
        yield from _expert_codes(item, rng)
    else:
        yield from _quantized(item, rng)


def _quantized(item: Planned, rng: np.random.Generator, rows: int = 8192):
    """Normal weights quantized by mx.quantize, `rows` at a time (the embeddings are 151936 rows)."""
    out, inp = item.shape
    scale = np.ones(out, np.float32)
    if item.kind == "router" and out > 1:  # hot experts: a few rows much larger than the rest
        scale = 1 + HOT_SCALE * np.exp(-rng.permutation(out) / HOT_DECAY)
    parts = []
    for start in range(0, out, rows):
        w = (
            rng.standard_normal((min(rows, out - start), inp), np.float32)
            * STD
            * scale[start : start + rows, None]
        )
        parts.append(mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=GROUP_SIZE, bits=item.bits))
        mx.eval(parts[-1])  # keep one chunk of float weights alive at a time
    for index, suffix in enumerate(("weight", "scales", "biases")):
        yield f"{item.name}.{suffix}", mx.concatenate([p[index] for p in parts])


def _expert_codes(item: Planned, rng: np.random.Generator):
    """Stacked expert tensors: uniform 4-bit codes, scales giving std STD, biases centring them on zero."""
    experts, out, inp = item.shape
    levels = 2**BITS - 1
    words = inp * BITS // 32
    for start in range(0, experts, EXPERT_CHUNK):
        n = min(EXPERT_CHUNK, experts - start)
        yield f"{item.name}.weight", rng.integers(0, 2**32, (n, out, words), dtype=np.uint32)
    # uniform codes on 0..levels have std sqrt(((levels + 1)^2 - 1) / 12)
    step = STD / math.sqrt(((levels + 1) ** 2 - 1) / 12)
    scales = step * rng.uniform(0.8, 1.2, (experts, out, inp // GROUP_SIZE)).astype(np.float32)
    yield f"{item.name}.scales", bf16_bits(scales)
    yield f"{item.name}.biases", bf16_bits(-scales * levels / 2)


def synth_config(preset: str, layers: int | None = None, overrides: dict | None = None) -> dict:
    """The preset's config.json, with `layers` layers and mlx-lm's quantization section."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    config = {**PRESETS[preset], **(overrides or {})}
    config["num_hidden_layers"] = layers or config["num_hidden_layers"]
    default, router = QuantSpec(BITS, GROUP_SIZE), QuantSpec(ROUTER_BITS, GROUP_SIZE)
    routers = [name.removesuffix(".weight") for name, plan in _all_planned(config) if plan.kind == "router"]
    return with_section(config, quantization_section({module: router for module in routers}, default))


def write_synthetic(
    preset: str,
    out: str | Path,
    layers: int | None = None,
    seed: int = 0,
    overrides: dict | None = None,
    log=print,
    force: bool = False,
    progress: bool | None = False,
) -> Path:
    """Write the synthetic checkpoint to `out`: one shard for the globals, then one per layer.

    `out` must be new or empty (`force`: an earlier checkpoint there is replaced); on an error or an
    interrupt nothing is left in it. `progress` (None: when stderr is a terminal): a bar over the shards.
    `log` gets one line per shard (None: no lines).
    """
    out = Path(out)
    config = synth_config(preset, layers, overrides)
    count = config["num_hidden_layers"]
    shards = [global_plan(config)] + [layer_plan(config, i) for i in range(count)]
    sizes = [sum(nbytes_of(entry) for item in plan for entry in item.entries()) for plan in shards]
    weight_map, total, drawn = {}, 0, shown(progress)
    with (
        output_directory(out, force),
        progress_bar(total=sum(sizes), desc=f"writing {out.name}", unit="B", enabled=progress) as bar,
    ):
        for index, plan in enumerate(shards):
            tic = time.perf_counter()
            name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            rng = np.random.default_rng([seed, index])
            entries = [e for item in plan for e in item.entries()]
            with SafetensorsWriter(out / name, entries) as writer:
                for item in plan:
                    for tensor, data in generate(item, rng):
                        writer.write(tensor, data)
            weight_map.update({e[0]: name for e in entries})
            size = (out / name).stat().st_size
            total += size
            bar.update(sizes[index])
            if log is not None:  # above the bar while one is drawn
                (bar.write if drawn else log)(
                    f"{name}: {size / 1e6:.0f} MB in {time.perf_counter() - tic:.1f} s"
                )
        eos = _write_tokenizer(out)
        (out / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}, indent=2))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def nbytes_of(entry: tuple[str, str, tuple]) -> int:
    """Bytes of one (name, dtype, shape) entry."""
    from ..safetensors import nbytes

    return nbytes(entry[1], entry[2])


def _write_tokenizer(out: Path) -> int:
    """A small byte-level BPE trained on a few lines (any id below the model's vocab is valid); its EOS id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_LINES, trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=262144,
    )
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer.token_to_id("<|im_end|>")


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m flashmoe.tools.synth --preset NAME [--layers N] --out DIR [--seed S]."""
    parser = argparse.ArgumentParser(
        prog="python -m flashmoe.tools.synth",
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--preset",
        required=True,
        choices=sorted(PRESETS),
        help="the model whose config, tensor names and shapes are reproduced",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="number of layers (default: the model's; fewer give a smaller checkpoint at full width)",
    )
    parser.add_argument("--out", required=True, help="a new (or empty) output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    add_output_options(parser, "--out")
    options = parser.parse_args(argv)
    if options.layers is not None and not 1 <= options.layers <= 4096:
        parser.error(f"--layers must be in [1, 4096], got {options.layers}")
    if not 0 <= options.seed < 2**32:
        parser.error(f"--seed must be in [0, 2**32), got {options.seed}")
    tic = time.perf_counter()
    show = False if options.quiet else None
    log = None if options.quiet else print
    try:
        path = write_synthetic(
            options.preset,
            options.out,
            options.layers,
            options.seed,
            log=log,
            force=options.force,
            progress=show,
        )
    except (FlashMoeError, OSError) as err:
        print(f"flashmoe.tools.synth: error: {err}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in path.iterdir())
    if not options.quiet:
        print(f"wrote {path} ({size / 1e9:.2f} GB) in {time.perf_counter() - tic:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
