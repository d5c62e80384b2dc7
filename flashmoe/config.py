"""Model dimensions from config.json, through one dataclass (unknown keys are ignored)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import FlashMoeError

SUPPORTED_MODEL_TYPES = ("qwen3_next", "qwen3_5_moe", "qwen3_moe", "qwen2_moe")


@dataclass
class ModelArgs:
    """Everything the forward pass needs to know about a model's shape."""

    model_type: str  # one of SUPPORTED_MODEL_TYPES
    hidden_size: int  # D
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int = 0  # 0: same as num_attention_heads
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # share of head_dim that rotary embedding turns
    rope_traditional: bool = False
    rope_scaling: dict | None = None  # only "default" / "linear" are supported
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (always true for qwen2_moe)
    intermediate_size: int = 0  # width of dense MLP layers
    num_experts: int = 0  # E
    num_experts_per_tok: int = 0  # K
    moe_intermediate_size: int = 0  # I, each expert's width
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool = False  # renormalise the K routing weights to sum to 1
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    full_attention_interval: int = 0  # hybrid models: layer i is full attention when (i+1) % n == 0
    linear_num_key_heads: int = 0  # Gated DeltaNet key heads
    linear_num_value_heads: int = 0  # Gated DeltaNet value heads
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4  # depthwise causal conv width

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """Read a config.json dict; the model type decides where fields live and their defaults."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise FlashMoeError(
                f"config.json: model_type {model_type!r} is not supported; "
                f"flashmoe runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        fields = dict(config.get("text_config") or config) if model_type == "qwen3_5_moe" else dict(config)
        fields["model_type"] = model_type
        rope = fields.get("rope_parameters")
        if rope:  # qwen3_5_moe keeps rope settings here
            fields.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            fields.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
            fields.setdefault("rope_scaling", rope)  # its "type" decides the scaling, as rope_scaling's does
        if model_type == "qwen2_moe":
            fields["attention_bias"] = True
        if model_type in ("qwen3_next", "qwen3_5_moe"):
            fields.setdefault("full_attention_interval", 4)
        if model_type == "qwen3_5_moe":
            fields.setdefault("norm_topk_prob", True)  # mlx-lm's default for this family
        known = {f.name for f in dataclasses.fields(cls)}
        required = [f for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [f.name for f in required if f.name not in fields]
        if missing:
            raise FlashMoeError(f"config.json: {model_type} needs {missing}, which are missing")
        args = cls(**{k: v for k, v in fields.items() if k in known and v is not None})
        args.num_key_value_heads = args.num_key_value_heads or args.num_attention_heads
        args.head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
        return args

    def is_linear_attention(self, layer: int) -> bool:
        """Gated DeltaNet layer (hybrid models) rather than full attention."""
        interval = self.full_attention_interval
        return interval > 0 and (layer + 1) % interval != 0

    def is_moe(self, layer: int) -> bool:
        """Whether layer `layer` routes to experts (else a dense MLP)."""
        if self.num_experts == 0:
            return False
        if self.model_type in ("qwen3_5_moe", "qwen2_moe"):
            return True
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0
