"""quantkit: one API for many quantization backends.

>>> import quantkit
>>> model = quantkit.quantize(model, quantkit.BnbConfig(quant_type="nf4"))
>>> quantkit.save(model, "out/")

The built-in configs are importable here without their backends' libraries.
"""

from .api import backends, load, quantize, save
from .autobits import choose_mixed_precision
from .builtin_backends.aqlm.config import AQLMConfig
from .builtin_backends.awq.config import AWQConfig
from .builtin_backends.bnb.config import BnbConfig
from .builtin_backends.eetq.config import EETQConfig
from .builtin_backends.gguf.config import GGUFConfig
from .builtin_backends.gguf.imatrix import collect_imatrix
from .builtin_backends.gguf.imatrix_files import ImportanceMatrix, load_imatrix
from .builtin_backends.gptq.config import GPTQConfig
from .builtin_backends.hqq.config import HQQConfig
from .builtin_backends.rtn.config import RTNConfig
from .core.backend import Backend
from .core.capabilities import ALL_HARDWARE, Availability, Capabilities, ShapeLimitError
from .core.commands import Command
from .core.config import CalibratedConfig, QuantConfig, spec
from .core.dispatch import KernelLinear, chosen_kernels, set_kernel
from .core.errors import (
    BackendUnavailableError,
    ConfigTypeError,
    ConfigValueError,
    MemoryBudgetError,
    ModelFormatError,
    NotTrainableError,
    QuantizationError,
    QuantkitError,
    SaveError,
    UnknownFieldError,
    UnknownMethodError,
    UnknownNameError,
    UnsupportedHardwareError,
)
from .core.hardware import Hardware
from .core.hookspecs import hookimpl
from .core.kernels import Kernel, KernelUnavailableError
from .core.presets import Preset
from .core.resolve import as_config, config_from_dict, config_from_hf_dict, config_from_json_file
from .core.text import Dataset
from .distributed import Distributed, DistributedError
from .estimate import estimate, estimate_quantization
from .formats.convert import convert
from .formats.grid import LossyConversionError
from .streaming import quantize_streaming

__all__ = [
    "ALL_HARDWARE",
    "AQLMConfig",
    "AWQConfig",
    "Availability",
    "Backend",
    "BackendUnavailableError",
    "BnbConfig",
    "CalibratedConfig",
    "Capabilities",
    "Command",
    "ConfigTypeError",
    "ConfigValueError",
    "Dataset",
    "Distributed",
    "DistributedError",
    "EETQConfig",
    "GGUFConfig",
    "GPTQConfig",
    "HQQConfig",
    "Hardware",
    "ImportanceMatrix",
    "Kernel",
    "KernelLinear",
    "KernelUnavailableError",
    "LossyConversionError",
    "MemoryBudgetError",
    "ModelFormatError",
    "NotTrainableError",
    "Preset",
    "QuantConfig",
    "QuantizationError",
    "QuantkitError",
    "RTNConfig",
    "SaveError",
    "ShapeLimitError",
    "UnknownFieldError",
    "UnknownMethodError",
    "UnknownNameError",
    "UnsupportedHardwareError",
    "as_config",
    "backends",
    "choose_mixed_precision",
    "chosen_kernels",
    "collect_imatrix",
    "config_from_dict",
    "config_from_hf_dict",
    "config_from_json_file",
    "convert",
    "estimate",
    "estimate_quantization",
    "hookimpl",
    "load",
    "load_imatrix",
    "quantize",
    "quantize_streaming",
    "save",
    "set_kernel",
    "spec",
]
