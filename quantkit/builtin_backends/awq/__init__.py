"""AWQ in plain torch, AutoAWQ GEMM checkpoint format."""
