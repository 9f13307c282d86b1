"""Models: the in-package GPT, the bundled trained models and their tokenizers."""
from .gpt import GPT, GPTConfig, drop_condition

__all__ = ["GPT", "GPTConfig", "drop_condition"]
