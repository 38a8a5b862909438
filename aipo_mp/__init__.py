"""aipo_mp: iterative preference optimization (AIPO and the DPO family) on megatron-core."""

__version__ = "0.1.0"
