"""quantkit's built-in plugin: AQLM in plain torch, aqlm/transformers checkpoint format."""

from quantkit.core.hookspecs import hookimpl

from .backend import AQLMBackend


@hookimpl
def quantkit_register_backends(register) -> None:
    register(AQLMBackend())
