"""quantkit's built-in plugin: bitsandbytes (NF4/FP4/LLM.int8) through bitsandbytes, and its 4-bit kernels."""

from quantkit.core.hookspecs import hookimpl

from .backend import BnbBackend
from .kernels import BITSANDBYTES, BNB_CPU


@hookimpl
def quantkit_register_backends(register) -> None:
    register(BnbBackend())


@hookimpl
def quantkit_register_kernels(register) -> None:
    register(BNB_CPU)
    register(BITSANDBYTES)
