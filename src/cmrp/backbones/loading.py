"""Loading what `cmrp fit` saved: a backbone folder, with a LoRA adapter folded in when there is one. The one
home of checkpoint loading: training (a run that starts from another), evaluation and chat all read here."""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmrp.checkpoint import folder_damage
from cmrp.config import load_recipe, resolve_recipe_parts
from cmrp.errors import ConfigError, WeightsError
from cmrp.registry import BACKBONES

__all__ = ["find_checkpoint", "load_backbone_folder", "load_checkpoint", "load_recipe_of", "merge_saved_adapter",
           "reading_weights"]


def _damaged(err: BaseException) -> bool:
    """Whether `err` is how safetensors or torch.load report a damaged or foreign weights file."""
    if type(err).__name__ == "SafetensorError" or isinstance(err, pickle.UnpicklingError | EOFError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        mark in text for mark in ("PytorchStreamReader", "invalid header", "zip archive", "weights_only"))


@contextlib.contextmanager
def reading_weights(where: str | Path) -> Iterator[None]:
    """Turn a damaged weights file under `where` (a header that does not parse, a file cut short, a pickle
    where tensors belong) into one WeightsError naming the folder; torch's advice to load unsafely is not
    repeated. Anything else passes through."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only the damage cases are mapped
        if not _damaged(err):
            raise
        detail = "" if "weights_only" in str(err) else f": {' '.join(str(err).split())[:160]}"
        raise WeightsError(f"{where}: a weights file there is damaged or was not written by cmrp "
                           f"({type(err).__name__}{detail}); restore it or re-run `cmrp fit`") from None


def merge_saved_adapter(adapter: Any, directory: str | Path) -> None:
    """Fold a saved PEFT adapter into the backbone's base weights (a LoRA run's result as a new start or
    for evaluation); `peft` loads it from its own format."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise WeightsError(f"{directory}: no adapter_config.json; not a PEFT adapter saved by `cmrp fit`")
    with reading_weights(directory):
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


def load_backbone_folder(folder: Path, fix: str) -> Any:
    """A saved backbone folder (its config.json names the adapter class), without any LoRA folded in; a
    damaged weights file is one clear error, not safetensors' traceback. `fix` ends the error when config.json
    cannot be read."""
    config_file = folder / "config.json"
    try:
        name = json.loads(config_file.read_text())["adapter"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{config_file}: cannot read the backbone's adapter name ({type(err).__name__}); "
                           f"{fix}") from None
    adapter_cls = BACKBONES.get(name, where=f"{config_file} key 'adapter'")
    with reading_weights(folder):
        return adapter_cls.from_pretrained(folder)


def load_recipe_of(ckpt: Path) -> Any:
    """The resolved recipe a run saved beside its checkpoint (checkpoint/recipe.yaml)."""
    recipe = ckpt / "recipe.yaml"
    if not recipe.is_file():
        raise ConfigError(f"{recipe} not found: `cmrp fit` writes it beside the checkpoint; without it the "
                          "character and backbone card of the run are unknown")
    return load_recipe(str(recipe), [])


def load_checkpoint(ckpt: Path, cfg: Any | None = None) -> Any:
    """The backbone of checkpoint/backbone (adapter named in its config.json), with checkpoint/adapter
    (a PEFT LoRA adapter) merged in when present. A LoRA run on a card's pretrained weights keeps no
    checkpoint/backbone: its base is then built from the recipe's card (`cfg`), as `cmrp fit` did."""
    damage = folder_damage(ckpt)
    if damage:
        raise WeightsError(f"{damage}: the checkpoint changed after `cmrp fit` wrote it (damaged or edited); restore "
                           f"it from a copy or re-run `cmrp fit`")
    if not (ckpt / "backbone").is_dir() and (ckpt / "adapter").is_dir() and cfg is not None:
        # a LoRA run on a card's pretrained weights: the base is the card's, as `cmrp fit` loaded it
        card, _ = resolve_recipe_parts(cfg)
        adapter = BACKBONES.get(card.adapter, where="backbone card `adapter`").build(card)
    else:
        adapter = load_backbone_folder(ckpt / "backbone", "the checkpoint is incomplete — re-run `cmrp fit` or pass "
                                       "another run")
    if (ckpt / "adapter").is_dir():
        merge_saved_adapter(adapter, ckpt / "adapter")
    if cfg is not None:
        adapter.max_text_tokens = cfg.data.max_text_tokens
    adapter.model.eval()
    return adapter
