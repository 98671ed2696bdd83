"""GGUF (llama.cpp) tensor types and mixes in torch, .gguf export and import."""
