"""Loading what `cmrp fit` saved: a backbone folder, with a LoRA adapter folded in when there is one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmrp.errors import WeightsError

__all__ = ["merge_saved_adapter"]


def merge_saved_adapter(adapter: Any, directory: str | Path) -> None:
    """Fold a saved PEFT adapter into the backbone's base weights (a LoRA run's result as a new start or
    for evaluation); `peft` loads it from its own format."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise WeightsError(f"{directory}: no adapter_config.json; not a PEFT adapter saved by `cmrp fit`")
    adapter.model = PeftModel.from_pretrained(adapter.model, str(directory)).merge_and_unload()
