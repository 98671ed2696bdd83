"""quantkit's built-in plugin: GPTQ in plain torch, GPTQ checkpoint format, and its kernels."""

from quantkit.core.hookspecs import hookimpl
from quantkit.core.inductor_kernels import gemv_inductor_kernel
from quantkit.core.torch_kernels import int4_cpu_kernel, int4_cuda_kernel

from .backend import GPTQBackend
from .qlinear import GPTQLinear


@hookimpl
def quantkit_register_backends(register) -> None:
    register(GPTQBackend())


@hookimpl
def quantkit_register_kernels(register) -> None:
    int4_cpu = int4_cpu_kernel(GPTQLinear)
    register(int4_cpu)
    register(int4_cuda_kernel(int4_cpu))
    register(gemv_inductor_kernel(GPTQLinear))
