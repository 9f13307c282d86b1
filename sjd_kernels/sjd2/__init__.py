"""SJD2, speculative Jacobi-denoising decoding (SPEC section 6; docs/SJD2.md).

``noise``: schedule, normalisation, segment noising, level embedding. ``train``: the
next-clean-token loss and parameter groups. ``decode``: ``sjd2_loop`` and ``generate_sjd2``.
``checkpoint``: the fine-tuned bundled models and the model hooks. The fused input
preparation is the op ``sjd2_prepare`` (reference, Triton and CUDA).
"""
from ..ops.sjd2_prepare import sjd2_prepare
from .decode import KVForward, SJD2Result, SeqForward, generate_sjd2, sjd2_loop
from .noise import (STREAM_SJD2_NOISE, EmbedNorm, LevelEmbedding, NoiseSchedule, SJD2Embedding, position_noise,
                    sample_segment_levels)

__all__ = ["KVForward", "STREAM_SJD2_NOISE", "EmbedNorm", "LevelEmbedding", "NoiseSchedule", "SJD2Embedding", "SJD2Result",
           "SeqForward", "generate_sjd2", "position_noise", "sample_segment_levels", "sjd2_loop", "sjd2_prepare"]
