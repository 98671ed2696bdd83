"""quantkit's built-in plugin: GGUF (llama.cpp) tensor types and mixes in torch, .gguf export and
import, and their kernels."""

from quantkit.core.hookspecs import hookimpl

from .backend import GGUFBackend
from .kernels import DEQUANTIZE_CACHED, GEMV_INDUCTOR, INT4_CPU, INT4_CUDA, INT4X2_CPU
from .q6_k_kernel import Q6_K_AVX512


@hookimpl
def quantkit_register_backends(register) -> None:
    register(GGUFBackend())


@hookimpl
def quantkit_register_kernels(register) -> None:
    register(INT4_CPU)
    register(INT4_CUDA)
    register(INT4X2_CPU)
    register(Q6_K_AVX512)
    register(GEMV_INDUCTOR)
    register(DEQUANTIZE_CACHED)
