"""quantkit's built-in plugin: round-to-nearest, GPTQ checkpoint format."""

from quantkit.core.hookspecs import hookimpl

from .backend import RTNBackend


@hookimpl
def quantkit_register_backends(register) -> None:
    register(RTNBackend())
