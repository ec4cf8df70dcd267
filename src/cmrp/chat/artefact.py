"""Shareable characters: an adapter in PEFT's own format + a character card, and a pool of them on one base.

An artefact folder:
```
character_card.json    name, profile, decoding default, kind (lora | full), base model reference, thumbnails
adapter/               LoRA runs: the PEFT adapter (adapter_config.json + adapter_model.safetensors)
backbone/              full fine-tuning runs: the whole backbone instead (no adapter exists)
thumbnails/ref-*.png   small copies of the reference images
```
The base model is referenced by the folder it was loaded from (or the card's weights id) and the sha256 of
its `model.safetensors` as revision, checked when the character is loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cmrp.backbones.loading import reading_weights
from cmrp.chat.session import CharacterInfo, ChatSession, Reply
from cmrp.checkpoint import file_sha256
from cmrp.errors import ConfigError, WeightsError

__all__ = ["CARD_FILE", "CharacterPool", "load_character", "load_chat_source", "save_character"]

CARD_FILE = "character_card.json"
CARD_FORMAT = "cmrp-character/1"
WEIGHTS_FILE = "model.safetensors"
THUMBNAIL_SIZE = 64


def _load_backbone_folder(folder: Path) -> Any:
    """A saved backbone folder (config.json names its adapter class), without any LoRA folded in."""
    from cmrp.registry import BACKBONES

    config_file = folder / "config.json"
    try:
        name = json.loads(config_file.read_text())["adapter"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{config_file}: cannot read the backbone's adapter name ({type(err).__name__}); "
                           "pass a backbone folder written by `cmrp fit` (output_dir/checkpoint/backbone)") from None
    adapter_cls = BACKBONES.get(name, where=f"{config_file} key 'adapter'")
    with reading_weights(folder):
        backbone = adapter_cls.from_pretrained(folder)
    backbone.model.eval()
    return backbone


def _run_character(cfg: Any, run_dir: Path):
    """The run's `Character` (a sandbox run's generated one lives in run_dir/character), or None."""
    from cmrp.data.sources import SANDBOX_SCHEME
    from cmrp.data.validate import load_character as load_data_character
    from cmrp.errors import DataError

    path = str(cfg.data.path)
    folder = run_dir / "character" if path.startswith(SANDBOX_SCHEME) else Path(path).expanduser()
    if not folder.exists():
        return None
    try:
        return load_data_character(folder, format=cfg.data.format, character=cfg.data.character)
    except DataError:
        return None


def _run_parts(run: Path) -> tuple[Path, Any, Any]:
    from cmrp.backbones.loading import find_checkpoint
    from cmrp.evaluation.runner import load_recipe_of

    ckpt = find_checkpoint(run)
    cfg = load_recipe_of(ckpt)
    return ckpt, cfg, _run_character(cfg, ckpt.parent)


def _info(character: Any, cfg: Any, fallback: str) -> CharacterInfo:
    name = character.name if character is not None else fallback
    profile = character.profile.text if character is not None else ""
    from cmrp.sampling.guidance import recipe_sampling_kwargs

    # images are drawn with the run's guidance and timestep shift (its `grpo:` section)
    return CharacterInfo(name=name, profile=profile, decoding=str(cfg.decoding),
                         extra={"image_kwargs": recipe_sampling_kwargs(cfg.grpo)})


# -- saving --------------------------------------------------------------------------------------------
def save_character(run_dir: str | Path, out_dir: str | Path, *, max_thumbnails: int = 4) -> Path:
    """Write the character of a `cmrp fit` run (output_dir or its checkpoint/) as a shareable artefact."""
    ckpt, cfg, character = _run_parts(Path(run_dir))
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; pass a new folder for the character artefact")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    base_folder = (ckpt / "backbone").resolve()
    if not base_folder.is_dir():
        raise ConfigError(f"{ckpt}: this LoRA run trained on its backbone card's pretrained weights and kept no "
                          "base beside its adapter; a character artefact needs that base folder. Save the base "
                          f"there first (the adapter class's from_pretrained(<the card's weights>)"
                          f".save_pretrained('{ckpt / 'backbone'}')), then run save-character again")
    base_config = json.loads((base_folder / "config.json").read_text())
    base_weights_id = ((base_config.get("card") or {}).get("weights")) or None
    if (ckpt / "adapter").is_dir():
        shutil.copytree(ckpt / "adapter", staging / "adapter")
        kind, note = "lora", "PEFT LoRA adapter in adapter/; load it on the base model below"
        base = {"path": str(base_folder), "weights": base_weights_id, "sha256": file_sha256(base_folder / WEIGHTS_FILE),
                "adapter_class": base_config.get("adapter")}
    else:
        shutil.copytree(ckpt / "backbone", staging / "backbone")
        kind = "full"
        note = ("full fine-tuning run: there is no LoRA adapter, so backbone/ holds the whole fine-tuned backbone; "
                "it cannot share a base model with other characters")
        base = {"path": None, "weights": base_weights_id, "sha256": None, "adapter_class": base_config.get("adapter")}
    thumbs = _write_thumbnails(character, staging / "thumbnails", max_thumbnails)
    info = _info(character, cfg, fallback=ckpt.parent.name)
    card = {
        "format": CARD_FORMAT,
        "name": info.name,
        "profile": info.profile,
        "decoding": info.decoding,
        "kind": kind,
        "note": note,
        "base": base,
        "thumbnails": thumbs,
        "source_run": str(ckpt.parent.resolve()),
        "finetune": {"mode": str(cfg.finetune.mode), "r": cfg.finetune.get("r"), "alpha": cfg.finetune.get("alpha")},
        "sampling": info.extra["image_kwargs"],  # guidance / timestep shift the images are drawn with
    }
    (staging / CARD_FILE).write_text(json.dumps(card, indent=2, ensure_ascii=False))
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.replace(out)
    return out


def _write_thumbnails(character: Any, folder: Path, limit: int) -> list[str]:
    from PIL import Image, UnidentifiedImageError

    names: list[str] = []
    refs = list(character.reference_images)[:limit] if character is not None else []
    for ref in refs:
        try:
            with Image.open(ref.path) as img:
                thumb = img.convert("RGB")
                thumb.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
                folder.mkdir(parents=True, exist_ok=True)
                name = f"thumbnails/ref-{len(names)}.png"
                thumb.save(folder.parent / name, format="PNG")
                names.append(name)
        except (OSError, UnidentifiedImageError):
            continue
    return names


# -- loading -------------------------------------------------------------------------------------------
def read_card(artefact_dir: str | Path) -> dict[str, Any]:
    path = Path(artefact_dir).expanduser() / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the character card ({type(err).__name__}); "
                          "pass a folder written by save_character") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ConfigError(f"{path}: not a cmrp character card (expected format {CARD_FORMAT!r})")
    return card


def _base_folder(card: dict[str, Any], base: str | Path | None, where: Path) -> Path:
    folder = Path(base).expanduser() if base is not None else None
    if folder is None:
        path = (card.get("base") or {}).get("path")
        if not path:
            raise WeightsError(f"{where}: the card names no base model folder; pass base=<backbone folder>")
        folder = Path(path)
    if (folder / "checkpoint" / "backbone").is_dir():
        folder = folder / "checkpoint" / "backbone"
    elif (folder / "backbone").is_dir() and not (folder / WEIGHTS_FILE).is_file():
        folder = folder / "backbone"
    if not (folder / WEIGHTS_FILE).is_file():
        raise WeightsError(f"{where}: base model {folder} not found (no {WEIGHTS_FILE}); pass base=<the base "
                           "backbone folder> (cmrp chat: --base)")
    want = (card.get("base") or {}).get("sha256")
    if want and file_sha256(folder / WEIGHTS_FILE) != want:
        raise WeightsError(f"{where}: base model {folder} is not the revision this character was trained on "
                           f"(sha256 of {WEIGHTS_FILE} differs from {want[:12]}...); pass the right base")
    return folder


def load_character(artefact_dir: str | Path, base: str | Path | None = None, *, merge: bool = True):
    """(backbone, CharacterInfo) of an artefact; LoRA characters are loaded onto `base` (default: the
    folder the card names), merged into its weights unless `merge=False`."""
    from peft import PeftModel

    folder = Path(artefact_dir).expanduser()
    card = read_card(folder)
    info = CharacterInfo(name=card.get("name") or folder.name, profile=card.get("profile") or "",
                         decoding=card.get("decoding") or "chain", extra={"card": card, "artefact": str(folder),
                                                                          "image_kwargs": card.get("sampling") or {}})
    if card.get("kind") == "full":
        return _load_backbone_folder(folder / "backbone"), info
    backbone = _load_backbone_folder(_base_folder(card, base, folder))
    if not (folder / "adapter" / "adapter_config.json").is_file():
        raise WeightsError(f"{folder}/adapter: no adapter_config.json; the artefact is incomplete")
    with reading_weights(folder / "adapter"):
        model = PeftModel.from_pretrained(backbone.model, str(folder / "adapter"))
    backbone.model = model.merge_and_unload() if merge else model
    backbone.model.eval()
    return backbone, info


def load_chat_source(path: str | Path, base: str | Path | None = None):
    """(backbone, CharacterInfo) of what `cmrp chat` was given: a character artefact, or a `cmrp fit` run."""
    from cmrp.evaluation.runner import load_checkpoint

    path = Path(path).expanduser()
    if (path / CARD_FILE).is_file():
        return load_character(path, base)
    ckpt, cfg, character = _run_parts(path)
    backbone = load_checkpoint(ckpt, cfg)
    return backbone, _info(character, cfg, fallback=ckpt.parent.name)


# -- several characters on one base -------------------------------------------------------------------
class _AdapterView:
    """The pool's backbone with one named adapter switched on for every call that runs the model."""

    # the protocol's inference methods: each call switches the pool to this view's adapter first
    _MODEL_CALLS = frozenset({"generate_text", "sample_images", "think_and_sample", "score_text", "answer"})

    def __init__(self, pool: CharacterPool, name: str):
        self._pool, self._name = pool, name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._pool.backbone, attr)
        if attr not in self._MODEL_CALLS:
            return value

        def as_this_character(*args: Any, **kwargs: Any) -> Any:
            self._pool.activate(self._name)
            return getattr(self._pool.backbone, attr)(*args, **kwargs)

        return as_this_character


class CharacterPool:
    """One base model, several LoRA characters as named PEFT adapters, switched per request (hot-swap)."""

    def __init__(self, base_dir: str | Path, **session_defaults: Any):
        self.base_dir = _base_folder({}, base_dir, Path(base_dir))
        self.base_sha256 = file_sha256(self.base_dir / WEIGHTS_FILE)
        self.backbone = _load_backbone_folder(self.base_dir)
        self.characters: dict[str, CharacterInfo] = {}
        self.sessions: dict[str, ChatSession] = {}
        self.session_defaults = session_defaults
        self.active: str | None = None

    def add(self, artefact_dir: str | Path, name: str | None = None) -> str:
        from peft import PeftModel

        folder = Path(artefact_dir).expanduser()
        card = read_card(folder)
        if card.get("kind") != "lora":
            raise ConfigError(f"{folder}: a {card.get('kind')!r} character holds a whole backbone; only LoRA "
                              "characters can share a base model in a pool")
        want = (card.get("base") or {}).get("sha256")
        if want and want != self.base_sha256:
            raise WeightsError(f"{folder}: trained on another base model (sha256 {want[:12]}...) than the pool's "
                               f"{self.base_dir} ({self.base_sha256[:12]}...)")
        name = name or card.get("name") or folder.name
        if name in self.characters:
            raise ConfigError(f"a character named {name!r} is already in the pool; pass another name")
        adapter_dir = str(folder / "adapter")
        if hasattr(self.backbone.model, "load_adapter") and hasattr(self.backbone.model, "peft_config"):
            self.backbone.model.load_adapter(adapter_dir, adapter_name=name)
        else:
            self.backbone.model = PeftModel.from_pretrained(self.backbone.model, adapter_dir, adapter_name=name)
        self.backbone.model.eval()
        self.active = None
        self.characters[name] = CharacterInfo(name=card.get("name") or name, profile=card.get("profile") or "",
                                              decoding=card.get("decoding") or "chain",
                                              extra={"card": card, "image_kwargs": card.get("sampling") or {}})
        return name

    def activate(self, name: str) -> None:
        if name not in self.characters:
            raise ConfigError(f"no character {name!r} in the pool; loaded: {sorted(self.characters)}")
        if self.active != name:
            self.backbone.model.set_adapter(name)
            self.active = name

    def view(self, name: str) -> _AdapterView:
        """A backbone-like object that always answers as `name`."""
        self.activate(name)
        return _AdapterView(self, name)

    def session(self, name: str, **kwargs: Any) -> ChatSession:
        """The running conversation with `name` (created on first use)."""
        if name not in self.sessions:
            info = self.characters.get(name) or self.view(name)  # raises for unknown names
            opts = {"decoding": info.decoding, **self.session_defaults, **kwargs}
            self.sessions[name] = ChatSession(self.view(name), info, **opts)
        return self.sessions[name]

    def reply(self, name: str, message: str, *, image: bool = False) -> Reply:
        """`name`'s reply in its own conversation, its adapter switched on for this request."""
        return self.session(name).reply(message, image=image)
