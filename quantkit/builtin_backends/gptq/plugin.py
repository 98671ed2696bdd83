"""quantkit's built-in plugin: GPTQ in plain torch, GPTQ checkpoint format."""

from quantkit.core.hookspecs import hookimpl

from .backend import GPTQBackend


@hookimpl
def quantkit_register_backends(register) -> None:
    register(GPTQBackend())
