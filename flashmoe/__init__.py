"""flashmoe: quantized Mixture-of-Experts models on MLX, with its own dequantization kernels."""

from . import kernels, quant
from .checkpoint import check_checkpoint
from .errors import BackendUnavailableError, FlashMoeError, QuantConfigError, QuantMismatchError
from .misread import misread_as
from .precision import compute_dtype

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "FlashMoeError",
    "QuantConfigError",
    "QuantMismatchError",
    "check_checkpoint",
    "compute_dtype",
    "kernels",
    "misread_as",
    "quant",
]
