"""quantkit's built-in plugin: GPTQ and round-to-nearest in plain torch, GPTQ checkpoint format."""

from quantkit import hookimpl

from .backend import GPTQBackend, RTNBackend


@hookimpl
def quantkit_register_backends(register) -> None:
    register(GPTQBackend())
    register(RTNBackend())
