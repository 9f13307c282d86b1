"""The decoding loop and its KV cache."""
from .cache import StaticKVCache
from .loop import METHODS, GenerateOutput, GenerateStats, available_methods, generate

__all__ = ["StaticKVCache", "METHODS", "GenerateOutput", "GenerateStats", "available_methods", "generate"]
