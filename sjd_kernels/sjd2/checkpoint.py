"""SJD2 checkpoints of the bundled models, and the few model hooks SJD2 uses.

A fine-tuned model is ``weights/<model>_sjd2.safetensors`` (every GPT tensor, plus
``sjd2.level_embed.weight``, ``sjd2.norm.mean``, ``sjd2.norm.std``) and ``<model>_sjd2.json``
(GPT config, noise schedule, SHA-256 of the weights file and of the base GPT file it started
from, how it was trained). ``load_finetuned`` checks the hash and the tensor names and shapes
and names the file and the mismatch when they differ; a fine-tune of another base GPT than the
one ``<model>.json`` lists is refused.

Model hooks (the in-package GPT, ``sjd_kernels.models.gpt``): ``embed_tokens(ids)`` for image
ids ``0..V-1``, ``embed_cond(cond) -> [B, 1, d]`` (class ``num_classes`` = null) and
``forward(inputs_embeds, positions)`` (condition at model position 0, image token i at i + 1).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models import bundled
from ..models.protocol import read_json
from ..ops._common import check_tensor
from .noise import EmbedNorm, NoiseSchedule, SJD2Embedding
from .train import noisy_image_inputs

PREFIX = "sjd2."


def image_embedding(gpt) -> torch.Tensor:
    """The image-token embedding rows ``[V, d]`` (ids ``0..V-1``), detached."""
    V = gpt.config.vocab_size
    dev = next(gpt.parameters()).device        # the ids on the model's device (CPU ids failed on a CUDA model)
    with torch.no_grad():
        return gpt.embed_tokens(torch.arange(V, device=dev)).detach()


def drop_condition(labels, p, num_classes, generator=None):
    from ..models.gpt import drop_condition as _drop
    return _drop(labels, p, num_classes, generator=generator)


def noisy_logits(gpt, sjd2: SJD2Embedding, cond: torch.Tensor, tokens: torch.Tensor, levels: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Teacher-forced image logits ``[B, T, V]`` with the image inputs noised at ``levels [B, T]``.

    The input of image position t (which predicts position t+1) is token t at level
    ``levels[:, t]``; the last level column is unused (no input follows the last token).
    """
    check_tensor("tokens", tokens, dim=2, last_contiguous=False)
    check_tensor("levels", levels, dim=2, shape=tuple(tokens.shape), last_contiguous=False)
    B, N = tokens.shape
    e = gpt.embed_tokens(tokens[:, :-1])
    x = torch.cat([gpt.embed_cond(cond), noisy_image_inputs(sjd2, e, levels[:, :-1], generator)], 1)
    return gpt(x, torch.arange(N, device=tokens.device).expand(B, N))


def gpt_forward_parts(gpt, cond: torch.Tensor, cfg: bool):
    """What ``generate_sjd2`` needs of a class-conditional GPT: ``(image embedding rows [V, d],
    prompt embeddings [B or 2B, 1, d] (conditional rows, then the null class for CFG),
    model_fn(inputs_embeds) -> logits, image_start)``."""
    cond = gpt.check_cond(cond)
    E = image_embedding(gpt)
    nc = gpt.config.num_classes
    c = torch.cat([cond, torch.full_like(cond, nc)]) if cfg else cond
    prompt = gpt.embed_cond(c.to(E.device)).reshape(c.shape[0], 1, -1)

    def model_fn(x):
        R, L, _ = x.shape
        return gpt(x, torch.arange(L, device=x.device).expand(R, L))
    return E.contiguous(), prompt, model_fn, 0


def _files(model: str, out=None) -> tuple[Path, Path]:
    bundled.check_name(model, "model")
    d = bundled.WEIGHTS_DIR if out is None else Path(out)
    return d / f"{model}_sjd2.safetensors", d / f"{model}_sjd2.json"


def save(model: str, gpt, sjd2: SJD2Embedding, *, out=None, training: dict | None = None) -> dict:
    """Write ``<model>_sjd2.safetensors`` and ``<model>_sjd2.json`` in ``out`` (default: the bundled weights),
    beside the base manifest ``<model>.json`` there. Everything is checked before a file is written (a
    missing base manifest used to fail after the weights file had replaced the previous fine-tune's): the
    base manifest exists, ``gpt`` has its GPT config (the manifest records it and ``load_finetuned`` builds
    the model from it) and ``sjd2`` the width of ``gpt``'s token embedding (``generate_sjd2`` refuses others).
    The files are replaced together only once both are written (``bundled.write_together``): a ``training``
    value JSON cannot hold leaves the previous fine-tune loadable."""
    from ..models.gpt import GPTConfig
    from ..ops._common import SJDInputError
    from .decode import check_sjd2_params
    wpath, mpath = _files(model, out)
    base = bundled.manifest(model, out)
    if not isinstance(sjd2, SJD2Embedding):
        raise SJDInputError(f"sjd2 must be an SJD2Embedding, got {type(sjd2).__name__}")
    cfg = getattr(gpt, "config", None)
    try:
        want = GPTConfig(**base["gpt"])
    except (TypeError, ValueError) as e:
        raise bundled.BundledModelError(f"{model}.json in {wpath.parent}: its gpt config cannot be built: {e}") from None
    if cfg != want:
        raise SJDInputError(f"gpt: its config {cfg} differs from the base model's in {model}.json ({want}): the "
                            f"fine-tune is recorded with the base config, so it would not load")
    check_sjd2_params(sjd2, image_embedding(gpt).shape[1])
    bad = bundled.nonfinite(gpt.state_dict())
    if bad:
        raise SJDInputError(f"gpt: tensors {bad[:5]} hold NaN or infinite values; nothing was saved")
    wpath.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in gpt.state_dict().items()}
    sd.update({PREFIX + k: v.detach().to("cpu").contiguous() for k, v in sjd2.state_dict().items()})

    def make(stats):
        sha, size = stats[wpath]
        return {"name": f"{model}_sjd2", "base": model, "file": wpath.name, "sha256": sha, "bytes": size,
                "base_gpt_sha256": base["files"]["gpt"]["sha256"], "gpt": base["gpt"],
                "schedule": sjd2.schedule.to_dict(), "training": training or {}}
    return bundled.write_together({wpath: sd}, mpath, make)


def manifest(model: str, weights_dir=None) -> dict:
    _, mpath = _files(model, weights_dir)
    if not mpath.exists():
        raise bundled.BundledModelError(f"{mpath} is missing; fine-tune with: PYTHONPATH=. python "
                                        f"python/finetune_sjd2.py --model {model}")
    man = read_json(mpath, bundled.BundledModelError, ("sha256", "gpt", "schedule", "base_gpt_sha256"))
    # a fine-tune is a whole GPT, so a stale one would still run: refuse it, or its results would be
    # reported as those of the base model now bundled
    base = bundled.manifest(model, weights_dir)["files"]["gpt"]["sha256"]
    if man["base_gpt_sha256"] != base:
        raise bundled.BundledModelError(
            f"{mpath} was fine-tuned from the {model} GPT with SHA-256 {str(man['base_gpt_sha256'])[:12]}..., but "
            f"{model}.json now lists {base[:12]}...: the fine-tune is stale; re-run PYTHONPATH=. python "
            f"python/finetune_sjd2.py --model {model}")
    return man


def load_finetuned(model: str = "mnist", weights_dir=None, device="cpu", dtype=torch.float32):
    """``(gpt, sjd2)`` of the SJD2 fine-tune of a bundled model, hash- and shape-checked."""
    from safetensors.torch import load_file

    from ..models.gpt import GPT, GPTConfig
    man = manifest(model, weights_dir)
    wpath, _ = _files(model, weights_dir)
    if not wpath.exists():
        raise bundled.BundledModelError(f"{wpath} is missing (listed in {model}_sjd2.json)")
    digest = bundled.sha256_file(wpath)
    if digest != man["sha256"]:
        raise bundled.BundledModelError(f"{wpath} has SHA-256 {digest}, but {model}_sjd2.json expects "
                                        f"{man['sha256']}: the file was altered or belongs to another run")
    tensors = load_file(str(wpath))
    _, mpath = _files(model, weights_dir)
    try:
        gpt = GPT(GPTConfig(**man["gpt"]))
        schedule = NoiseSchedule(**man["schedule"])
    except (TypeError, ValueError) as e:      # an unknown key or a bad value (SJDInputError is a ValueError)
        raise bundled.BundledModelError(f"{mpath}: its gpt config or noise schedule cannot be built: "
                                        f"{type(e).__name__}: {e}") from None
    d = tensors[PREFIX + "norm.mean"].shape[0] if PREFIX + "norm.mean" in tensors else 0
    sjd2 = SJD2Embedding(schedule, EmbedNorm(d))
    expected = {k: tuple(v.shape) for k, v in gpt.state_dict().items()}
    expected.update({PREFIX + k: tuple(v.shape) for k, v in sjd2.state_dict().items()})
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise bundled.BundledModelError(f"{wpath}: tensor names differ from the model built from "
                                        f"{model}_sjd2.json: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise bundled.BundledModelError(f"{wpath}: tensor {k!r} has shape {list(tensors[k].shape)}, "
                                            f"the config implies {list(shape)}")
    bad = bundled.nonfinite(tensors)
    if bad:
        raise bundled.BundledModelError(f"{wpath}: tensors {bad[:5]} hold NaN or infinite values")
    gpt.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(PREFIX)})
    sjd2.load_state_dict({k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)})
    gpt = gpt.to(device=device, dtype=dtype).eval()
    # a plain attribute, not a submodule: the GPT's own state dict stays the base format, and
    # generate(..., method="sjd2") finds the SJD2 parameters on the model
    gpt.__dict__["sjd2"] = sjd2.to(device).eval()
    return gpt, gpt.sjd2
