"""The decoding loop, its static ragged KV cache, and the method table.

``generate(model, cond, num_tokens, method=...)`` is the entry point (re-exported as
``sjd_kernels.generate``).
"""
from .cache import StaticKVCache
from .loop import GenerateOutput, GenerateStats, derive_seeds, generate, request_seeds
from .methods import METHODS, Method, available_methods

__all__ = ["METHODS", "GenerateOutput", "GenerateStats", "Method", "StaticKVCache", "available_methods",
           "derive_seeds", "generate", "request_seeds"]
