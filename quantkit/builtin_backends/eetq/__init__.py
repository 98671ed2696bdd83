"""EETQ: int8 weight-only, per output channel, in the layout of EETQ's CUTLASS kernel."""
