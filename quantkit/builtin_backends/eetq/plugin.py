"""quantkit's built-in plugin: EETQ int8 weight-only, transformers' EETQ layout."""

from quantkit.core.hookspecs import hookimpl

from .backend import EetqBackend


@hookimpl
def quantkit_register_backends(register) -> None:
    register(EetqBackend())
