"""quantkit's built-in plugin: AWQ in plain torch, AutoAWQ GEMM checkpoint format, and its kernels."""

from quantkit.core.hookspecs import hookimpl
from quantkit.core.inductor_kernels import gemv_inductor_kernel
from quantkit.core.torch_kernels import int4_cpu_kernel, int4_cuda_kernel

from .backend import AWQBackend
from .qlinear import AWQLinear


@hookimpl
def quantkit_register_backends(register) -> None:
    register(AWQBackend())


@hookimpl
def quantkit_register_kernels(register) -> None:
    int4_cpu = int4_cpu_kernel(AWQLinear)
    register(int4_cpu)
    register(int4_cuda_kernel(int4_cpu))
    register(gemv_inductor_kernel(AWQLinear))
