"""flashmoe: quantized Mixture-of-Experts models on MLX, with its own dequantization kernels."""

from . import default_model, kernels, quant
from .checkpoint import check_checkpoint
from .generate import GenerationStep, generate, stream_generate
from .loading import load
from .errors import BackendUnavailableError, FlashMoeError, QuantConfigError, QuantMismatchError
from .misread import misread_as
from .precision import compute_dtype
from .sample import make_sampler
from .tokenizer import StreamingDetokenizer, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "default_model",
    "GenerationStep",
    "StreamingDetokenizer",
    "Tokenizer",
    "generate",
    "load",
    "make_sampler",
    "stream_generate",
    "FlashMoeError",
    "QuantConfigError",
    "QuantMismatchError",
    "check_checkpoint",
    "compute_dtype",
    "kernels",
    "misread_as",
    "quant",
]
