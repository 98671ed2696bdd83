"""quantkit's built-in plugin: EETQ int8 weight-only, transformers' EETQ layout, and its kernels."""

from quantkit.core.hookspecs import hookimpl

from .backend import EetqBackend
from .kernels import EETQ_CUDA, INT8_CPU


@hookimpl
def quantkit_register_backends(register) -> None:
    register(EetqBackend())


@hookimpl
def quantkit_register_kernels(register) -> None:
    register(INT8_CPU)
    register(EETQ_CUDA)
