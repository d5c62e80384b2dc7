"""The default model's config.json: a tiny Qwen3-Next (Gated DeltaNet + full attention, routed + shared experts).

Every width that a 4-bit, group-64 quantization reads along is a multiple of 64.
`python -m training.model_config` prints the parameter counts and checkpoint sizes.
"""

from __future__ import annotations

import json
import sys

CONFIG = dict(
    model_type="qwen3_next",
    vocab_size=2048,  # flashmoe/assets/flashmoe-coder-tiny/tokenizer.json
    hidden_size=256,  # D
    num_hidden_layers=8,
    full_attention_interval=4,  # layers 3 and 7 are full attention, the rest Gated DeltaNet
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    partial_rotary_factor=0.25,  # rotary on 16 of each head's 64 dims
    rope_theta=10000.0,
    max_position_embeddings=4096,
    linear_num_key_heads=2,
    linear_key_head_dim=64,
    linear_num_value_heads=4,
    linear_value_head_dim=64,
    linear_conv_kernel_dim=4,
    num_experts=32,  # E
    num_experts_per_tok=4,  # K
    moe_intermediate_size=64,  # I, each routed expert's width
    shared_expert_intermediate_size=128,
    norm_topk_prob=True,
    decoder_sparse_step=1,  # every layer is MoE ...
    mlp_only_layers=[],  # ... none is dense
    intermediate_size=512,  # a dense layer's width (unused while every layer is MoE)
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    attention_bias=False,
    hidden_act="silu",
    bos_token_id=0,
    eos_token_id=0,  # <|endoftext|>
)


def config(**overrides) -> dict:
    """A copy of CONFIG with `overrides` applied (tests use small ones)."""
    return json.loads(json.dumps({**CONFIG, **overrides}))


def param_counts(cfg: dict) -> dict[str, int]:
    """Total parameters, those a token uses (K of E routed experts), and the routed experts' share."""
    from .init import param_shapes

    sizes = {name: _prod(shape) for name, shape in param_shapes(cfg).items()}
    total = sum(sizes.values())
    routed = sum(n for name, n in sizes.items() if ".switch_mlp." in name)
    unused = routed * (cfg["num_experts"] - cfg["num_experts_per_tok"]) // max(cfg["num_experts"], 1)
    embed = sizes["model.embed_tokens.weight"]
    return {
        "total": total,
        "active": total - unused,
        "routed_experts": routed,
        "embedding": embed,
        "active_without_embedding": total - unused - embed,
    }


def quantized_bytes(cfg: dict, bits: int = 4, group_size: int = 64, gate_bits: int = 8) -> int:
    """Bytes of an mlx-lm quantization (bf16 scales and biases per group; routers at `gate_bits`)."""
    from .init import param_shapes

    total = 0
    for name, shape in param_shapes(cfg).items():
        n = _prod(shape)
        if len(shape) < 2 or shape[-1] % group_size or name.endswith(("conv1d.weight", "A_log", "dt_bias")):
            # kept float (bf16; A_log float32)
            total += 4 * n if name.endswith(("A_log", "dt_bias")) else 2 * n
            continue
        b = gate_bits if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) else bits
        total += n * b // 8 + 2 * 2 * (n // group_size)
    return total


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main() -> None:
    counts = param_counts(CONFIG)
    for key, value in counts.items():
        print(f"{key:26s} {value:>12,d}")
    print(f"{'float32 weights (MiB)':26s} {4 * counts['total'] / 2**20:12.1f}")
    print(f"{'4-bit g64 (MiB)':26s} {quantized_bytes(CONFIG) / 2**20:12.1f}")
    json.dump(CONFIG, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
