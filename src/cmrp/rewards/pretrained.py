"""Finding pretrained model files on this machine without loading or downloading them.

Reward terms and `cmrp eval` load CLIP, BLIP-VQA, DINOv2, LPIPS and Inception weights from two local
caches: the Hugging Face hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
~/.cache/huggingface/hub) and the torch hub cache (`$TORCH_HOME/hub/checkpoints`, else
~/.cache/torch/hub/checkpoints). The checks here only look at files, so `Composite.check()` can list
every missing model at once, in well under a second, before any model library is imported. Loaders
reach the network only when `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` do not say offline and the term
was not told `local_files_only`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cmrp.errors import WeightsError

__all__ = [
    "MissingModel",
    "TORCHVISION_WEIGHTS",
    "hf_fetch_hint",
    "hf_hub_cache",
    "hf_load_how",
    "hf_model_missing",
    "load_transformers",
    "missing_hf_model",
    "missing_models_error",
    "offline",
    "torch_checkpoints_dir",
    "torch_fetch_hint",
    "torch_file_missing",
    "where_models_go",
]

T = TypeVar("T")

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# ImageNet backbones of LPIPS (lpips and torchmetrics load them through torchvision); a unit test checks
# these against torchvision's own weight enums
TORCHVISION_WEIGHTS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # hub repos / transformers >= 5 saves


def offline() -> bool:
    """Whether `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` is set to a true value."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARS)


def hf_hub_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face hub cache folder, read from the environment now (not at import time)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def torch_checkpoints_dir() -> Path:
    """Where torchvision / torch.hub keep downloaded weights (`$TORCH_HOME/hub/checkpoints`)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _is_local_reference(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


@dataclass(frozen=True)
class MissingModel:
    """One model a term (or `cmrp eval`) needs that is not on this machine, and how to get it."""

    who: str  # e.g. "clip_similarity", "cmrp eval --features pretrained"
    model: str  # e.g. "openai/clip-vit-large-patch14 (transformers CLIPModel)"
    fix: str  # how to get the files (a command, a file to copy)
    alternative: str = ""  # what else the user can do in this context (a kwarg, another option)

    def line(self) -> str:
        tail = f"; {self.alternative}" if self.alternative else ""
        return f"  - {self.who}: {self.model} — {self.fix}{tail}"


def hf_fetch_hint(repo: str, cache_dir: str | None = None) -> str:
    where = f" --cache-dir {cache_dir}" if cache_dir else ""
    return f"`hf download {repo}{where}`"


def hf_load_how(repo: str, cache_dir: str | None, alternative: str) -> str:
    """How to provide a hub model a loader could not find: the download command, where it lands, `alternative`."""
    return (f"Fetch it with {hf_fetch_hint(repo, cache_dir)} on a machine with network (into {hf_hub_cache(cache_dir)}; "
            f"set HF_HOME to move it), {alternative}")


def hf_model_missing(repo: str, *, cache_dir: str | None = None, processor: bool = False) -> bool:
    """True unless `repo` (a hub id, found in the local hub cache, or a local directory) has its
    config.json, a weights file and, with `processor`, an image-processor config on disk."""
    groups = [("config.json",), _WEIGHT_FILES] + ([_PROCESSOR_FILES] if processor else [])
    path = Path(repo).expanduser()
    if _is_local_reference(repo):
        return not (path.is_dir() and all(any((path / f).is_file() for f in group) for group in groups))
    from huggingface_hub import try_to_load_from_cache

    cache = str(hf_hub_cache(cache_dir))

    def cached(filename: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo, filename, cache_dir=cache), str)
        except Exception:  # an id the hub would reject (HFValidationError) cannot be cached either
            return False

    return not all(any(cached(f) for f in group) for group in groups)


def missing_hf_model(who: str, repo: str, classes: str, *, cache_dir: str | None = None, processor: bool = False,
                     alternative: str = "") -> list[MissingModel]:
    """`[MissingModel]` for a hub model not on this machine (see `hf_model_missing`), else `[]`."""
    if not hf_model_missing(repo, cache_dir=cache_dir, processor=processor):
        return []
    return [MissingModel(who, f"{repo} (transformers {classes})", hf_fetch_hint(repo, cache_dir), alternative)]


def torch_file_missing(url: str) -> Path | None:
    """The path a torch.hub / torchvision download of `url` would be cached at, if it is not there yet."""
    path = torch_checkpoints_dir() / url.rsplit("/", 1)[-1]
    return None if path.is_file() else path


def torch_fetch_hint(url: str) -> str:
    return f"download {url} into {torch_checkpoints_dir()}/ (same file name)"


def where_models_go() -> str:
    return (f"Run downloads on a machine with network: hub models land in {hf_hub_cache()} (set HF_HOME to move it), "
            f"torch files in {torch_checkpoints_dir()} (TORCH_HOME); copy those folders to offline machines.")


def missing_models_error(missing: Sequence[MissingModel], header: str, footer: str = "") -> WeightsError:
    """One WeightsError listing every missing model with its fix, where downloads land, and `footer`."""
    count = f"{len(missing)} pretrained model{'s' if len(missing) != 1 else ''}"
    lines = [f"{header}: {count} not on this machine (nothing was downloaded):", *(m.line() for m in missing),
             where_models_go()]
    if footer:
        lines.append(footer)
    return WeightsError("\n".join(lines))


def load_transformers(repo: str, classes: Sequence[str], build: Callable[..., T], *, cache_dir: str | None,
                      local_files_only: bool | None, what: str, alternative: str) -> T:
    """`build(*parts)` from the transformers `classes` (a model, its processor ...) loaded with `from_pretrained`
    from `repo`: a local directory, or the hub cache first and the hub itself only when not offline and
    `local_files_only` is not True. Any failure is one WeightsError: `what` names the model, then how to
    provide it and `alternative` (what to do instead)."""
    from cmrp.rewards._ops import reason

    try:
        import transformers

        parts = [getattr(transformers, name) for name in classes]
    except ImportError as err:
        raise WeightsError(f"{what} needs the transformers package ({err}): `pip install transformers`, "
                           f"{alternative}") from None
    cache = str(hf_hub_cache(cache_dir))  # the environment now, as the checks read it (not at import)
    how = hf_load_how(repo, cache_dir, alternative)
    path = Path(repo).expanduser()
    is_local = path.exists()
    if not is_local and _is_local_reference(repo):
        raise WeightsError(f"{what}: directory {repo!r} does not exist. {how}")
    source = str(path) if is_local else repo
    if is_local or local_files_only or (offline() and local_files_only is None):
        attempts = [True]
    elif local_files_only is False:
        attempts = [False]
    else:  # cache first, then the hub
        attempts = [True, False]
    error: Exception = RuntimeError("no attempt made")
    for local_only in attempts:
        try:
            return build(*(cls.from_pretrained(source, cache_dir=cache, local_files_only=local_only) for cls in parts))
        except Exception as err:  # missing files / no network come as OSError, ValueError, ...
            error = err
    raise WeightsError(f"{what} could not be loaded from {repo!r}: {reason(error)}. {how}") from None
