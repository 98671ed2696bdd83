"""quantkit: one API for many quantization backends.

>>> import quantkit
>>> model = quantkit.quantize(model, quantkit.BnbConfig(quant_type="nf4"))
>>> quantkit.save(model, "out/")
"""

from .api import backends, load, quantize, save
from .backend import Backend
from .capabilities import Availability, Capabilities
from .configs import (
    AWQConfig,
    BnbConfig,
    GGUFConfig,
    GPTQConfig,
    HQQConfig,
    QuantConfig,
    RTNConfig,
    as_config,
    config_from_dict,
    config_from_hf_dict,
)
from .errors import (
    BackendUnavailableError,
    ConfigTypeError,
    ConfigValueError,
    ModelFormatError,
    NotTrainableError,
    QuantizationError,
    QuantkitError,
    UnknownFieldError,
    UnknownMethodError,
    UnsupportedHardwareError,
)
from .estimate import estimate
from .hardware import Hardware
from .hookspecs import hookimpl

__all__ = [
    "AWQConfig", "Availability", "Backend", "BackendUnavailableError", "BnbConfig", "Capabilities",
    "ConfigTypeError", "ConfigValueError", "GGUFConfig", "GPTQConfig", "HQQConfig", "Hardware",
    "ModelFormatError", "NotTrainableError", "QuantConfig", "QuantizationError", "QuantkitError",
    "RTNConfig", "UnknownFieldError", "UnknownMethodError", "UnsupportedHardwareError", "as_config",
    "backends", "config_from_dict", "config_from_hf_dict", "estimate", "hookimpl", "load", "quantize", "save",
]
