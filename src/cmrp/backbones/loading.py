"""Loading what `cmrp fit` saved: a backbone folder, with a LoRA adapter folded in when there is one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmrp.errors import ConfigError, WeightsError

__all__ = ["find_checkpoint", "merge_saved_adapter"]


def merge_saved_adapter(adapter: Any, directory: str | Path) -> None:
    """Fold a saved PEFT adapter into the backbone's base weights (a LoRA run's result as a new start or
    for evaluation); `peft` loads it from its own format."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise WeightsError(f"{directory}: no adapter_config.json; not a PEFT adapter saved by `cmrp fit`")
    adapter.model = PeftModel.from_pretrained(adapter.model, str(directory)).merge_and_unload()


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder of a `cmrp fit` output dir (or the checkpoint folder itself)."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass the output_dir of a `cmrp fit` run (or its checkpoint/)")
    for candidate in (path, path / "checkpoint"):
        # a LoRA run on a card's pretrained weights keeps only its adapter (the base is the card's)
        if (candidate / "backbone").is_dir() or (candidate / "adapter").is_dir():
            return candidate
    raise ConfigError(f"{path} holds no cmrp checkpoint (expected {path}/checkpoint/backbone or {path}/backbone, "
                      "or an adapter/ folder); pass the output_dir of a `cmrp fit` run")
