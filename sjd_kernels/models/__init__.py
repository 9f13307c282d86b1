"""Models: the decoding protocol, the in-package GPT, Hugging Face adapters, the bundled models."""
from .gpt import GPT, GPTCheckpointError, GPTConfig, drop_condition, load_gpt, save_gpt
from .hf import HFImageLM, JanusImageLM, emu3_forced, from_chameleon, from_emu3, from_janus, grid_forced
from .protocol import ImageModel, KVCacheLike, Prefix, check_model

__all__ = ["GPT", "GPTCheckpointError", "GPTConfig", "HFImageLM", "ImageModel", "JanusImageLM", "KVCacheLike", "Prefix",
           "check_model", "drop_condition", "emu3_forced", "from_chameleon", "from_emu3", "from_janus", "grid_forced",
           "load_gpt", "save_gpt"]
