"""Shareable characters: an adapter in PEFT's own format + a character card, and a pool of them on one base.

An artefact folder travels on its own (copy it to another directory or machine and `cmrp chat` it):
```
character_card.json    name, profile, decoding default, kind (lora | full), the base model, thumbnails
adapter/               LoRA runs: the PEFT adapter (adapter_config.json + adapter_model.safetensors)
base/                  LoRA runs whose base exists only in their run (random init, merged): that base
backbone/              full fine-tuning runs: the whole backbone instead (no adapter exists)
thumbnails/ref-*.png   small copies of the reference images
```
The card names the base by content (the sha256 of its weights, checked when the character is loaded) and by
a portable reference: a base shipped with cmrp (`sandbox://base`), a path relative to the card (`base`, the
copy above), or the backbone card's weights (a hub id) with the card itself. `adapter_config.json`'s
`base_model_name_or_path` holds the same reference. Cards written before this format (an absolute `path`
and the file's sha256) still load.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from pathlib import Path
from typing import Any, cast

from cmrp.backbones.loading import (
    find_checkpoint,
    load_backbone_folder,
    load_checkpoint,
    load_recipe_of,
    reading_weights,
)
from cmrp.backbones.protocol import Backbone
from cmrp.chat.session import CharacterInfo, ChatSession, Reply
from cmrp.checkpoint import file_sha256
from cmrp.config import load_backbone_card, resolve_recipe_parts
from cmrp.data.sources import SANDBOX_SCHEME
from cmrp.data.validate import load_character as load_data_character
from cmrp.errors import ConfigError, DataError, WeightsError
from cmrp.jsonio import write_json
from cmrp.registry import BACKBONES
from cmrp.resources import shipped_base
from cmrp.sampling.spec import recipe_sampling_settings

__all__ = ["CARD_FILE", "CharacterPool", "load_character", "load_chat_source", "save_character", "weights_sha256"]

CARD_FILE = "character_card.json"
CARD_FORMAT = "cmrp-character/1"
WEIGHTS_FILE = "model.safetensors"
THUMBNAIL_SIZE = 64
SHIPPED = "sandbox://"
COPIED_BASE = "base"


def weights_sha256(path: Path) -> str:
    """The sha256 of a safetensors file's tensors (names, dtypes, shapes, values in name order), not of its
    bytes: the same weights saved again, with other metadata or order, hash the same."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as fh:
        for name in sorted(fh.keys()):
            tensor = fh.get_tensor(name).contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_backbone_folder(folder: Path) -> Any:
    """A saved backbone folder, without any LoRA folded in, ready to chat."""
    backbone = load_backbone_folder(folder, "pass a backbone folder written by `cmrp fit` "
                                            "(output_dir/checkpoint/backbone)")
    backbone.model.eval()
    return backbone


def _run_character(cfg: Any, run_dir: Path):
    """The run's `Character` (a sandbox run's generated one lives in run_dir/character), or None."""
    path = str(cfg.data.path)
    folder = run_dir / "character" if path.startswith(SANDBOX_SCHEME) else Path(path).expanduser()
    if not folder.exists():
        return None
    try:
        return load_data_character(folder, format=cfg.data.format, character=cfg.data.character)
    except DataError:
        return None


def _run_parts(run: Path) -> tuple[Path, Any, Any]:
    ckpt = find_checkpoint(run)
    cfg = load_recipe_of(ckpt)
    return ckpt, cfg, _run_character(cfg, ckpt.parent)


def _info(character: Any, cfg: Any, fallback: str) -> CharacterInfo:
    name = character.name if character is not None else fallback
    profile = character.profile.text if character is not None else ""

    # images are drawn with the run's guidance and timestep shift (its `grpo:` section)
    return CharacterInfo(name=name, profile=profile, decoding=str(cfg.decoding),
                         extra={"sampling": recipe_sampling_settings(cfg.grpo)})


# -- saving --------------------------------------------------------------------------------------------
def _portable_base(base_folder: Path, weights: str | None, staging: Path) -> dict[str, Any]:
    """How the card names a LoRA character's base: the shipped base it is (same weights), else a copy in the
    artefact (`base/`, the run made this base: random init or merged)."""
    digest = weights_sha256(base_folder / WEIGHTS_FILE)
    if weights and weights.startswith(SHIPPED):
        try:
            shipped = shipped_base(weights[len(SHIPPED):])
        except WeightsError:
            shipped = None
        if shipped is not None and weights_sha256(shipped / WEIGHTS_FILE) == digest:
            return {"ref": weights, "content_sha256": digest}
    shutil.copytree(base_folder, staging / COPIED_BASE)
    return {"ref": COPIED_BASE, "content_sha256": digest}


def _set_base_reference(adapter_dir: Path, ref: str) -> None:
    """PEFT's `base_model_name_or_path` (null when the run trained an in-memory model): the portable
    reference, a path relative to adapter/ for a copied base."""
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = f"../{ref}" if ref == COPIED_BASE else ref
    write_json(config_file, config)


def save_character(run_dir: str | Path, out_dir: str | Path, *, max_thumbnails: int = 4) -> Path:
    """Write the character of a `cmrp fit` run (output_dir or its checkpoint/) as a shareable artefact."""
    ckpt, cfg, character = _run_parts(Path(run_dir))
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; pass a new folder for the character artefact")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    from omegaconf import OmegaConf

    base_folder = (ckpt / "backbone").resolve()
    card_cfg, _ = resolve_recipe_parts(cfg)  # the run's backbone card: where its base's weights came from
    weights = str(card_cfg.weights) if card_cfg.get("weights") else None
    if (ckpt / "adapter").is_dir():
        shutil.copytree(ckpt / "adapter", staging / "adapter")
        kind, note = "lora", "PEFT LoRA adapter in adapter/; load it on the base model below"
        if base_folder.is_dir():
            base_config = json.loads((base_folder / "config.json").read_text())
            base = {**_portable_base(base_folder, weights, staging), "weights": weights,
                    "adapter_class": base_config.get("adapter")}
        else:  # a LoRA run on its backbone card's pretrained weights: the card says where they come from
            base = {"ref": weights, "content_sha256": None, "weights": weights, "adapter_class": str(card_cfg.adapter),
                    "card": OmegaConf.to_container(card_cfg, resolve=True)}
        _set_base_reference(staging / "adapter", base["ref"])
    else:
        shutil.copytree(ckpt / "backbone", staging / "backbone")
        kind = "full"
        note = ("full fine-tuning run: there is no LoRA adapter, so backbone/ holds the whole fine-tuned backbone; "
                "it cannot share a base model with other characters")
        base = {"ref": None, "weights": weights, "content_sha256": None, "adapter_class": str(card_cfg.adapter)}
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
        "source_run": ckpt.parent.name,  # where it came from, for people; never read back
        "finetune": {"mode": str(cfg.finetune.mode), "r": cfg.finetune.get("r"), "alpha": cfg.finetune.get("alpha")},
        "sampling": info.extra["sampling"],  # guidance / timestep shift the images are drawn with
    }
    write_json(staging / CARD_FILE, card)
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


def _check_revision(folder: Path, info: dict[str, Any], where: Path) -> None:
    want_content, want_file = info.get("content_sha256"), info.get("sha256")  # sha256: cards before content hashes
    if want_content and weights_sha256(folder / WEIGHTS_FILE) != want_content:
        raise WeightsError(f"{where}: base model {folder} is not the revision this character was trained on "
                           f"(its weights' sha256 differs from {want_content[:12]}...); pass the right base")
    if not want_content and want_file and file_sha256(folder / WEIGHTS_FILE) != want_file:
        raise WeightsError(f"{where}: base model {folder} is not the revision this character was trained on "
                           f"(sha256 of {WEIGHTS_FILE} differs from {want_file[:12]}...); pass the right base")


def _base_folder(card: dict[str, Any], base: str | Path | None, where: Path) -> Path:
    """The folder of a character's base: `base` (cmrp chat --base) when given, else the card's reference — a
    shipped base, a folder relative to the card, or (older cards) an absolute path."""
    info = card.get("base") or {}
    if base is not None:
        folder = Path(base).expanduser()
    elif str(info.get("ref") or "").startswith(SHIPPED):
        folder = shipped_base(info["ref"][len(SHIPPED):], f"{where / CARD_FILE} base")
    elif info.get("ref") or info.get("path"):
        folder = Path(info.get("ref") or info["path"])
        folder = folder if folder.is_absolute() else where / folder
    else:
        raise WeightsError(f"{where}: the card names no base model; pass base=<backbone folder> (cmrp chat: --base)")
    if (folder / "checkpoint" / "backbone").is_dir():
        folder = folder / "checkpoint" / "backbone"
    elif (folder / "backbone").is_dir() and not (folder / WEIGHTS_FILE).is_file():
        folder = folder / "backbone"
    if not (folder / WEIGHTS_FILE).is_file():
        raise WeightsError(f"{where}: base model {folder} not found (no {WEIGHTS_FILE}); pass base=<the base "
                           "backbone folder> (cmrp chat: --base)")
    _check_revision(folder, info, where)
    return folder


def _load_base(card: dict[str, Any], base: str | Path | None, folder: Path) -> Any:
    """The base backbone of a LoRA character: from a folder, or built from the backbone card the character
    card carries (a LoRA run on a card's pretrained weights, e.g. a hub id)."""
    info = card.get("base") or {}
    if base is None and info.get("card") and not str(info.get("ref") or "").startswith(SHIPPED):
        card_cfg = load_backbone_card(info["card"])
        backbone = BACKBONES.get(card_cfg.adapter, where=f"{folder / CARD_FILE} base.card.adapter").build(card_cfg)
        backbone.model.eval()
        return backbone
    return _load_backbone_folder(_base_folder(card, base, folder))


def load_character(artefact_dir: str | Path, base: str | Path | None = None, *, merge: bool = True):
    """(backbone, CharacterInfo) of an artefact; LoRA characters are loaded onto `base` (default: the
    base the card names), merged into its weights unless `merge=False`."""
    from peft import PeftModel

    folder = Path(artefact_dir).expanduser().resolve()
    card = read_card(folder)
    info = CharacterInfo(name=card.get("name") or folder.name, profile=card.get("profile") or "",
                         decoding=card.get("decoding") or "chain", extra={"card": card, "artefact": str(folder),
                                                                          "sampling": card.get("sampling") or {}})
    if card.get("kind") == "full":
        if base is not None:
            raise ConfigError(f"{folder / CARD_FILE}: a full fine-tuning character carries its whole model, so a "
                              f"base ({base}) cannot apply; drop --base (base=) for this character")
        return _load_backbone_folder(folder / "backbone"), info
    backbone = _load_base(card, base, folder)
    if not (folder / "adapter" / "adapter_config.json").is_file():
        raise WeightsError(f"{folder}/adapter: no adapter_config.json; the artefact is incomplete")
    with reading_weights(folder / "adapter"):
        model = PeftModel.from_pretrained(backbone.model, str(folder / "adapter"))
    backbone.model = model.merge_and_unload() if merge else model
    backbone.model.eval()
    return backbone, info


def load_chat_source(path: str | Path, base: str | Path | None = None):
    """(backbone, CharacterInfo) of what `cmrp chat` was given: a character artefact, or a `cmrp fit` run."""
    path = Path(path).expanduser()
    if (path / CARD_FILE).is_file():
        return load_character(path, base)
    ckpt, cfg, character = _run_parts(path)
    backbone = load_checkpoint(ckpt, cfg)
    return backbone, _info(character, cfg, fallback=ckpt.parent.name)


# -- several characters on one base -------------------------------------------------------------------
class _AdapterView:
    """The pool's backbone with one named adapter switched on for every method it runs.

    Every method is wrapped — the protocol's, a capability's, one added later — not a list of names that a
    new method could miss; switching is a no-op when the adapter is already active. Data attributes pass
    through."""

    def __init__(self, pool: CharacterPool, name: str):
        self._pool, self._name = pool, name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._pool.backbone, attr)
        if not inspect.ismethod(value):
            return value

        def as_this_character(*args: Any, **kwargs: Any) -> Any:
            self._pool.activate(self._name)
            return getattr(self._pool.backbone, attr)(*args, **kwargs)

        return as_this_character


class CharacterPool:
    """One base model, several LoRA characters as named PEFT adapters, switched per request (hot-swap)."""

    def __init__(self, base_dir: str | Path, **session_defaults: Any):
        self.base_dir = _base_folder({}, base_dir, Path(base_dir))
        self.base_sha256 = weights_sha256(self.base_dir / WEIGHTS_FILE)
        self._base_file_sha256: str | None = None  # for cards written before content hashes
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
        base = card.get("base") or {}
        want, have = base.get("content_sha256"), self.base_sha256
        if not want and base.get("sha256"):
            want = base["sha256"]
            self._base_file_sha256 = have = self._base_file_sha256 or file_sha256(self.base_dir / WEIGHTS_FILE)
        if want and want != have:
            raise WeightsError(f"{folder}: trained on another base model (sha256 {want[:12]}...) than the pool's "
                               f"{self.base_dir} ({have[:12]}...)")
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
                                              extra={"card": card, "sampling": card.get("sampling") or {}})
        return name

    def activate(self, name: str) -> None:
        if name not in self.characters:
            raise ConfigError(f"no character {name!r} in the pool; loaded: {sorted(self.characters)}")
        if self.active != name:
            self.backbone.model.set_adapter(name)
            self.active = name

    def view(self, name: str) -> Backbone:
        """The backbone as `name`: every method runs with `name`'s adapter switched on."""
        self.activate(name)
        return cast("Backbone", _AdapterView(self, name))  # the protocol's members, forwarded by __getattr__

    def session(self, name: str, **kwargs: Any) -> ChatSession:
        """The running conversation with `name` (created on first use)."""
        if name not in self.sessions:
            self.activate(name)  # one clear error for a name not in the pool
            info = self.characters[name]
            opts = {"decoding": info.decoding, **self.session_defaults, **kwargs}
            self.sessions[name] = ChatSession(self.view(name), info, **opts)
        return self.sessions[name]

    def reply(self, name: str, message: str, *, image: bool = False) -> Reply:
        """`name`'s reply in its own conversation, its adapter switched on for this request."""
        return self.session(name).reply(message, image=image)
