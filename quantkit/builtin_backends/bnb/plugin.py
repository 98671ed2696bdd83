"""quantkit's built-in plugin: bitsandbytes (NF4/FP4/LLM.int8) through bitsandbytes, and its kernels."""

from quantkit.core.hookspecs import hookimpl

from .backend import BnbBackend
from .kernels import BITSANDBYTES, BITSANDBYTES_INT8, BNB_CPU, GEMV_INDUCTOR_INT8


@hookimpl
def quantkit_register_backends(register) -> None:
    register(BnbBackend())


@hookimpl
def quantkit_register_kernels(register) -> None:
    register(BNB_CPU)
    register(BITSANDBYTES)
    register(GEMV_INDUCTOR_INT8)
    register(BITSANDBYTES_INT8)
