"""quantkit's built-in plugin: GGUF (llama.cpp) tensor types and mixes in torch, .gguf export and import."""

from quantkit.core.hookspecs import hookimpl

from .backend import GGUFBackend


@hookimpl
def quantkit_register_backends(register) -> None:
    register(GGUFBackend())
