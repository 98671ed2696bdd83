"""An example third-party quantkit backend: per-output-channel absmax int8 weights."""
