"""quantkit's built-in plugin: HQQ through the hqq library, safetensors layout of quantkit's own."""

from quantkit.core.hookspecs import hookimpl

from .backend import HQQBackend


@hookimpl
def quantkit_register_backends(register) -> None:
    register(HQQBackend())
