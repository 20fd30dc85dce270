"""Tensor parallelism: a model split across ranks (Megatron-style), one process per rank."""
