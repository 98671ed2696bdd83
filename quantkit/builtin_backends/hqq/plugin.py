"""quantkit's built-in plugin: HQQ through the hqq library, safetensors layout of quantkit's own, and its kernels."""

from quantkit.core.hookspecs import hookimpl

from .backend import HQQBackend
from .kernels import GEMV_INDUCTOR, INT4_CPU, INT4_CUDA


@hookimpl
def quantkit_register_backends(register) -> None:
    register(HQQBackend())


@hookimpl
def quantkit_register_kernels(register) -> None:
    register(INT4_CPU)
    register(INT4_CUDA)
    register(GEMV_INDUCTOR)
