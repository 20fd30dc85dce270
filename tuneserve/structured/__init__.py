"""Structured output: a grammar compiled per request constrains which tokens it may sample.

backend.py is the small interface the engine uses (compile; per request a matcher with accept, rollback,
fill_bitmask, is_terminated); llguidance_backend.py implements it with llguidance.
"""
