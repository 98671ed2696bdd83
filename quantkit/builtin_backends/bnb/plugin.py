"""quantkit's built-in plugin: bitsandbytes (NF4/FP4/LLM.int8) through the bitsandbytes library."""

from quantkit.core.hookspecs import hookimpl

from .backend import BnbBackend


@hookimpl
def quantkit_register_backends(register) -> None:
    register(BnbBackend())
