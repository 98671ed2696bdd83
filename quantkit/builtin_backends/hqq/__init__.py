"""HQQ through the hqq library, safetensors layout of quantkit's own."""
