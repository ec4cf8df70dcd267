"""What every backbone adapter needs around its model, written once: where a card's weights are on this
machine (`resolve_weights`), a card section as plain containers (`plain`), and the model under a PEFT wrapper
(`unwrap_peft`, `require_unwrapped`). Images: `cmrp.backbones.images`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Self

from cmrp.errors import WeightsError
from cmrp.resources import shipped_base

__all__ = ["SANDBOX_WEIGHTS", "HoldsModel", "plain", "require_unwrapped", "resolve_weights", "unwrap_peft"]

SANDBOX_WEIGHTS = "sandbox://"  # a base shipped in the package (cmrp/sandbox/assets/<name>)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def plain(value: Any) -> Any:
    """A card section as plain Python containers (cards arrive as omegaconf DictConfigs)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


class HoldsModel:
    """`to` and `device` of an adapter whose weights all live in `self.model` (an adapter with more, such as
    Show-o's separate VQ model, extends `to`)."""

    model: Any

    def to(self, device: Any) -> Self:
        self.model.to(device)
        return self

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device


def unwrap_peft(model: Any) -> Any:
    """The model itself, through a PEFT wrapper if LoRA put one around it (the official module's attributes
    and parameter names live there)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def require_unwrapped(model: Any) -> None:
    """Saving writes the base model's own layout: refuse a PEFT-wrapped one (its LoRA weights would be lost or
    mixed in)."""
    if hasattr(model, "get_base_model"):
        raise ValueError("save the base model before wrapping it with PEFT, or merge the adapter first")


def resolve_weights(ref: str | Path, where: str = "weights") -> Path:
    """A folder on this machine for `ref`: a local folder, a Hugging Face hub id (owner/name) already in the
    local cache, or `sandbox://<name>`, a base shipped with cmrp. Never downloads: anything else raises one
    WeightsError (`where` names the card key) saying how to get the weights."""
    text = str(ref)
    if text.startswith(SANDBOX_WEIGHTS):
        return shipped_base(text[len(SANDBOX_WEIGHTS):], where)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not _HUB_ID.fullmatch(text):
        what = "is not a folder" if path.exists() else "does not exist"
        raise WeightsError(f"{where}: {text} {what}; point it at a checkpoint folder or a Hugging Face hub id "
                           "(owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=text, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as err:
        raise WeightsError(
            f"{where}: {text} is not in the local Hugging Face cache ({type(err).__name__}); cmrp never downloads "
            f"weights itself. Fetch them once with `hf download {text}` (HF_HOME chooses the cache), "
            f"or download to a folder (`--local-dir DIR`) and point the card's `weights` at it"
        ) from None
