"""quantkit's built-in plugin: AWQ in plain torch, AutoAWQ GEMM checkpoint format."""

from quantkit.core.hookspecs import hookimpl

from .backend import AWQBackend


@hookimpl
def quantkit_register_backends(register) -> None:
    register(AWQBackend())
