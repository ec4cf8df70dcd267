"""The official BAGEL checkpoint layout (ByteDance-Seed/BAGEL-7B-MoT), read and written by name.

An official folder holds:
- `llm_config.json`: a Qwen2 config plus BAGEL's extras (`qk_norm`, `layer_module`,
  `tie_word_embeddings`; the official code forces qk_norm on, untied embeddings and the MoT layer, so
  those are the defaults when a key is absent);
- `vit_config.json`: a SigLIP vision config; BAGEL builds `num_hidden_layers - 1` layers (it uses the
  penultimate layer's features, then `post_layernorm`);
- `ema.safetensors`: the EMA weights of the whole model with the official parameter names
  (`language_model.*`, `*_moe_gen`, `vit_model.*` with the patch embedding stored as a Linear,
  `connector.*`, `vit_pos_embed.pos_embed`, `time_embedder.*`, `vae2llm`, `llm2vae`,
  `latent_pos_embed.pos_embed`); our `Bagel` uses the same names, so loading is by name;
- `ae.safetensors`: the FLUX autoencoder in its original key naming (`encoder.conv_in.weight`, ...);
- the Qwen2 tokenizer files (`tokenizer.json`, `vocab.json`, `merges.txt`, `tokenizer_config.json`): the
  official code reads `vocab.json` + `merges.txt` with its `Qwen2Tokenizer`, so `save_official` writes them
  (with every special token's id) from the tokenizer it has.

Sizes not written in the json files are read from the weights' shapes (the sin-cos tables give
`max_latent_size` and `vit_max_num_patch_per_side`, `vae2llm` the latent patch size, `ae.safetensors`
the autoencoder's channels); `save_official` also writes `cmrp_bagel.json` with the settings no file
carries (timestep shift, autoencoder scale/shift), read back when present and optional otherwise.

Every problem (missing, unexpected or shape-mismatched key, bad config value) is collected and raised
as one `WeightsError` that names the keys and says how to fix them. Nothing here downloads.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from cmrp.backbones.bagel.autoencoder import FluxAEConfig, FluxAutoencoder
from cmrp.backbones.bagel.model import Bagel, BagelArch, PositionEmbedding
from cmrp.backbones.bagel.qwen2_mot import LLMConfig, RotaryEmbedding
from cmrp.backbones.bagel.siglip import ViTConfig, conv_to_linear_weight
from cmrp.backbones.tokenizer import QWEN2_SPLIT, TextTokenizer
from cmrp.errors import WeightsError
from cmrp.jsonio import write_json

__all__ = [
    "AE_FILE", "EMA_FILE", "EXTRA_FILE", "LLM_CONFIG", "VIT_CONFIG",
    "is_official_layout", "load_official", "parameter_counts", "read_official_arch", "save_official",
    "write_tokenizer_files",
]

LLM_CONFIG = "llm_config.json"
VIT_CONFIG = "vit_config.json"
EMA_FILE = "ema.safetensors"
AE_FILE = "ae.safetensors"
EXTRA_FILE = "cmrp_bagel.json"
HUB_ID = "ByteDance-Seed/BAGEL-7B-MoT"

# sin-cos tables: fixed, recomputed when absent (the official trainer drops them when resuming too)
_FIXED_TABLES = ("vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed")
_PATCH_EMBED = "vit_model.vision_model.embeddings.patch_embedding.weight"
_SHOWN = 20


def is_official_layout(path: str | Path) -> bool:
    return (Path(path) / LLM_CONFIG).is_file()


def _fix_hint(path: Path) -> str:
    return (
        f"Fix: point the card's `weights` at the official checkpoint folder unchanged (e.g. "
        f"`hf download {HUB_ID} --local-dir DIR`), or make {LLM_CONFIG} / {VIT_CONFIG} in "
        f"{path} describe the sizes these weights have."
    )


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise WeightsError(f"{file} not found: an official BAGEL folder needs {LLM_CONFIG}, {VIT_CONFIG}, "
                           f"{EMA_FILE}, {AE_FILE} and the tokenizer files ({HUB_ID} layout)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{file}: not valid JSON ({err}); restore the file from the official checkpoint") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{file}: expected a JSON object")
    return data


def _header(file: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file, without reading the tensors."""
    from safetensors import safe_open

    if not file.is_file():
        raise WeightsError(f"{file} not found: the official BAGEL folder needs it ({HUB_ID} layout)")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise WeightsError(f"{file}: not a readable safetensors file ({err}); download it again") from None


def _config_from(cls, data: dict, file: Path, renames: dict[str, str] | None = None):
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key = (renames or {}).get(key, key)
        if key in known:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise WeightsError(f"{file}: {err}") from None


def _llm_config(path: Path) -> LLMConfig:
    file = path / LLM_CONFIG
    data = _read_json(file)
    problems = []
    if data.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {data['hidden_act']!r} (BAGEL's Qwen2 uses 'silu')")
    if data.get("use_sliding_window"):
        problems.append("use_sliding_window: true (BAGEL attends over the whole sequence; set it to false)")
    if data.get("head_dim") not in (None, data.get("hidden_size", 0) // max(1, data.get("num_attention_heads", 1))):
        problems.append(f"head_dim {data['head_dim']} != hidden_size / num_attention_heads")
    if problems:
        raise WeightsError(f"{file}: unsupported setting(s): " + "; ".join(problems))
    data = {"qk_norm": True, "layer_module": "Qwen2MoTDecoderLayer", "tie_word_embeddings": False, **data}
    data.setdefault("num_key_value_heads", data.get("num_attention_heads"))
    return _config_from(LLMConfig, data, file)


def _vit_config(path: Path) -> ViTConfig:
    file = path / VIT_CONFIG
    data = dict(_read_json(file))
    if data.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise WeightsError(f"{file}: hidden_act {data['hidden_act']!r} unsupported (SigLIP uses 'gelu_pytorch_tanh')")
    if data.get("rope"):
        raise WeightsError(f"{file}: rope: true (a 2D-rope ViT) is not BAGEL-7B-MoT's SigLIP; set it to false")
    if int(data.get("num_hidden_layers", 2)) < 2:
        raise WeightsError(f"{file}: num_hidden_layers must be >= 2 (BAGEL drops the last layer)")
    data["num_hidden_layers"] = int(data.get("num_hidden_layers", 2)) - 1  # the penultimate layer's features
    return _config_from(ViTConfig, data, file)


def _ae_config(path: Path, header: dict[str, tuple[int, ...]], spec: dict | None) -> FluxAEConfig:
    """FLUX autoencoder sizes read from `ae.safetensors`' shapes; scale/shift from `spec` or FLUX's."""
    file = path / AE_FILE
    try:
        ch, in_channels = header["encoder.conv_in.weight"][:2]
        z_channels = header["decoder.conv_in.weight"][1]
        out_ch = header["decoder.conv_out.weight"][0]
        levels = sorted({int(k.split(".")[2]) for k in header if k.startswith("encoder.down.")})
        blocks = {int(k.split(".")[4]) for k in header if k.startswith("encoder.down.0.block.")}
        ch_mult = [header[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in levels]
    except (KeyError, IndexError, ValueError):
        raise WeightsError(
            f"{file}: not a FLUX autoencoder in its original key naming (expected encoder.conv_in.weight, "
            "encoder.down.N.block.M.conv1.weight, decoder.conv_in.weight, decoder.conv_out.weight, ...); "
            f"use the ae.safetensors of {HUB_ID} (the FLUX.1 autoencoder)"
        ) from None
    base = FluxAEConfig()
    spec = dict(spec or {})
    return FluxAEConfig(
        in_channels=in_channels, out_ch=out_ch, ch=ch, ch_mult=ch_mult, num_res_blocks=len(blocks),
        z_channels=z_channels, scale_factor=float(spec.get("scale_factor", base.scale_factor)),
        shift_factor=float(spec.get("shift_factor", base.shift_factor)),
        norm_groups=int(spec.get("norm_groups", base.norm_groups)),
    )


def _side(rows: int, key: str, file: Path) -> int:
    side = math.isqrt(rows)
    if side * side != rows:
        raise WeightsError(f"{file}: {key} has {rows} rows, not a square grid; the file is not a BAGEL checkpoint")
    return side


def read_official_arch(path: str | Path, settings: dict | None = None) -> BagelArch:
    """The architecture of an official folder (json configs + weight shapes). `settings`: a card's
    `architecture` mapping, whose non-size keys (timestep_shift, gradient_checkpointing, vit_resize, vae_posterior,
    vae scale/shift) apply; sizes always come from the folder."""
    path = Path(path)
    settings = dict(settings or {})
    extra = _read_json(path / EXTRA_FILE) if (path / EXTRA_FILE).is_file() else {}
    llm, vit = _llm_config(path), _vit_config(path)
    ema = path / EMA_FILE
    header = _header(ema)
    visual_und = any(k.startswith("vit_model.") for k in header)
    visual_gen = "vae2llm.weight" in header
    arch = BagelArch(llm=llm, vit=vit, visual_gen=visual_gen, visual_und=visual_und)
    # sizes no json carries: from the weights, else cmrp_bagel.json, else the official model's values
    arch.max_latent_size = int(extra.get("max_latent_size", 64))
    arch.vit_max_num_patch_per_side = int(extra.get("vit_max_num_patch_per_side", 70))
    if "latent_pos_embed.pos_embed" in header:
        arch.max_latent_size = _side(header["latent_pos_embed.pos_embed"][0], "latent_pos_embed.pos_embed", ema)
    if "vit_pos_embed.pos_embed" in header:
        arch.vit_max_num_patch_per_side = _side(header["vit_pos_embed.pos_embed"][0], "vit_pos_embed.pos_embed", ema)
    for key in ("timestep_shift", "gradient_checkpointing", "vit_resize", "vae_posterior", "gen_image_size"):
        if key in settings:
            setattr(arch, key, settings[key])
        elif key in extra:
            setattr(arch, key, extra[key])
    if visual_gen:
        vae_spec = {**dict(extra.get("vae") or {}), **dict(settings.get("vae") or {})}
        if vae_spec.get("kind", "flux") == "pixel":
            arch.vae = {"kind": "pixel", "downsample": int(vae_spec.get("downsample", 2))}
        else:
            ae = _ae_config(path, _header(path / AE_FILE), vae_spec)
            arch.vae = ae.to_spec()
        if arch.vae["kind"] == "flux":
            z = int(arch.vae["z_channels"])
        else:
            z = 3 * arch.vae["downsample"] ** 2
        patch_dim = header["vae2llm.weight"][1]
        p = math.isqrt(max(1, patch_dim // z))
        if p * p * z != patch_dim:
            raise WeightsError(
                f"{ema}: vae2llm.weight takes {patch_dim} inputs, not p*p*{z} for the autoencoder's {z} latent "
                f"channels; {AE_FILE} and {EMA_FILE} do not belong together"
            )
        arch.latent_patch_size = p
        if arch.gen_image_size is None:  # the official inferencer's default: the largest the position table holds
            down = ae.downsample if arch.vae["kind"] == "flux" else int(arch.vae["downsample"])
            arch.gen_image_size = arch.max_latent_size * p * down
    return arch


# -- loading ---------------------------------------------------------------------------------------
def _problems(expected: dict[str, tuple], found: dict[str, tuple], optional: tuple[str, ...] = ()) -> list[str]:
    missing = sorted(k for k in set(expected) - set(found) if k not in optional)
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{k}: file {list(found[k])} vs model {list(expected[k])}"
        for k in sorted(set(expected) & set(found)) if tuple(found[k]) != tuple(expected[k])
    ]
    lines = []
    for title, items in (("missing keys", missing), ("shape mismatches", mismatched)):
        if items:
            shown = items[:_SHOWN] + ([f"... ({len(items)} in all)"] if len(items) > _SHOWN else [])
            lines.append(f"  {title}: " + ", ".join(shown))
    if unexpected:
        described = []
        for k in unexpected[:_SHOWN]:
            close = difflib.get_close_matches(k, missing, n=1, cutoff=0.8)
            described.append(f"{k} (renamed {close[0]}?)" if close else k)
        if len(unexpected) > _SHOWN:
            described.append(f"... ({len(unexpected)} in all)")
        lines.append("  unexpected keys: " + ", ".join(described))
    return lines


def _read_tensors(file: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(file), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            # a fresh, aligned allocation: tensors viewed from the file's buffer can be misaligned, which
            # makes some CPU kernels (convolutions) round differently from a model built in memory
            out[k] = t.to(dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
    return out


def _materialize(model: Bagel) -> None:
    """Recompute the fixed buffers/tables a meta-device build left empty (rope frequencies, sin-cos)."""
    llm = model.arch.llm
    for module in model.modules():
        if isinstance(module, RotaryEmbedding) and module.inv_freq.is_meta:
            module.inv_freq = RotaryEmbedding(llm.head_dim, llm.rope_theta).inv_freq
        if isinstance(module, PositionEmbedding) and module.pos_embed.is_meta:
            rows, hidden = module.pos_embed.shape
            fresh = PositionEmbedding(math.isqrt(rows), hidden)
            module.pos_embed = torch.nn.Parameter(fresh.pos_embed.to(module.pos_embed.dtype), requires_grad=False)


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    module.load_state_dict(state, strict=False, assign=True)


def load_official(path: str | Path, *, settings: dict | None = None, dtype: torch.dtype = torch.float32):
    """(Bagel, TextTokenizer) from an official folder; raises one WeightsError listing every mismatch."""
    path = Path(path)
    arch = read_official_arch(path, settings)
    with torch.device("meta"):
        model = Bagel(arch)
    ema = path / EMA_FILE
    problems = []
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = dict(_header(ema))
    if len(found.get(_PATCH_EMBED, ())) == 4:  # a SigLIP conv kernel: BAGEL stores it as a Linear
        d, c, p, q = found[_PATCH_EMBED]
        found[_PATCH_EMBED] = (d, p * q * c)
    optional = _FIXED_TABLES + (("language_model.lm_head.weight",) if arch.llm.tie_word_embeddings else ())
    lines = _problems(expected, found, optional=optional)
    if lines:
        problems.append(f"{ema} does not match {LLM_CONFIG} / {VIT_CONFIG}:")
        problems += lines
    ae_file = path / AE_FILE
    flux = isinstance(model.vae, FluxAutoencoder) if arch.visual_gen else False
    if flux:
        ae_expected = {k: tuple(v.shape) for k, v in model.vae.state_dict().items()}
        ae_lines = _problems(ae_expected, _header(ae_file))
        if ae_lines:
            problems.append(f"{ae_file} does not match the FLUX autoencoder (original FLUX key naming):")
            problems += ae_lines
    if problems:
        raise WeightsError("\n".join(problems + [_fix_hint(path)]))
    state = _read_tensors(ema, dtype)
    if state[_PATCH_EMBED].dim() == 4:
        state[_PATCH_EMBED] = conv_to_linear_weight(state[_PATCH_EMBED])
    _assign(model, state)
    if arch.llm.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    if flux:
        _assign(model.vae, _read_tensors(ae_file, dtype))
    _materialize(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if flux:
        left += [f"vae.{n}" for n, t in model.vae.named_parameters() if t.is_meta]
    if left:  # cannot happen after the checks above; guards against silent garbage
        raise WeightsError(f"{path}: weights left unset after loading: {', '.join(left[:_SHOWN])}")
    model = model.to(dtype)
    tokenizer = TextTokenizer.load(path)
    if tokenizer.vocab_size > arch.llm.vocab_size:
        raise WeightsError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but {LLM_CONFIG} says vocab_size="
            f"{arch.llm.vocab_size}; use the tokenizer files that came with the checkpoint"
        )
    return model, tokenizer


# -- writing ---------------------------------------------------------------------------------------
def _llm_json(cfg: LLMConfig) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "use_sliding_window": False, **asdict(cfg),
    }


def _vit_json(cfg: ViTConfig) -> dict:
    data = asdict(cfg)
    data["num_hidden_layers"] = cfg.num_hidden_layers + 1  # the file names the full SigLIP depth
    return {"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "rope": False, **data}


def save_official(model: Bagel, tokenizer: Any, path: str | Path) -> Path:
    """Write `model` in the official layout (json configs, ema.safetensors, ae.safetensors for a FLUX
    autoencoder, tokenizer files, cmrp_bagel.json) so `load_official` / `from_pretrained` read it back."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arch = model.arch
    write_json(path / LLM_CONFIG, _llm_json(arch.llm), ensure_ascii=True)
    write_json(path / VIT_CONFIG, _vit_json(arch.vit), ensure_ascii=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if arch.llm.tie_word_embeddings:
        state.pop("language_model.lm_head.weight", None)
    save_file(state, str(path / EMA_FILE))
    if arch.visual_gen and isinstance(model.vae, FluxAutoencoder):
        save_file({k: v.detach().contiguous() for k, v in model.vae.state_dict().items()}, str(path / AE_FILE))
    extra = {
        "timestep_shift": arch.timestep_shift, "max_latent_size": arch.max_latent_size,
        "vit_max_num_patch_per_side": arch.vit_max_num_patch_per_side, "vae": dict(arch.vae),
        "vit_resize": arch.vit_resize, "vae_posterior": arch.vae_posterior, "gen_image_size": arch.gen_image_size or arch.vit.image_size,  # the side it generates, explicitly
    }
    write_json(path / EXTRA_FILE, extra, ensure_ascii=True)
    write_tokenizer_files(tokenizer, path)
    return path


_BAGEL_MARKERS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]


def _splits_like_qwen2(data: dict) -> bool:
    """Whether a tokenizer.json splits text as the official Qwen2Tokenizer does (NFC, Qwen2's pattern, bytes)."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    split = [p for p in steps if p.get("type") == "Split"]
    byte_level = [p for p in steps if p.get("type") == "ByteLevel"]
    return (len(steps) == 2 and len(split) == 1 and len(byte_level) == 1
            and split[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT
            and split[0].get("behavior") == "Isolated" and not byte_level[0].get("use_regex", True)
            and (data.get("normalizer") or {}).get("type") == "NFC")


def write_tokenizer_files(tokenizer: Any, path: Path) -> None:
    """`tokenizer.json` plus the files the official code reads with `Qwen2Tokenizer.from_pretrained`:
    `vocab.json`, `merges.txt` and `tokenizer_config.json` (every added token with its id; BAGEL's four
    markers listed as special tokens, so the official `add_special_tokens` adds nothing and finds our ids)."""
    tokenizer.save(path)
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not _splits_like_qwen2(data):
        raise WeightsError(
            f"{path}: the official BAGEL code reads the tokenizer from vocab.json + merges.txt with Qwen2's "
            "byte-level BPE rules, and this tokenizer is not one (a BPE with NFC and Qwen2's pre-tokenization), "
            "so the official code would see other token ids. Use the checkpoint's Qwen2 tokenizer, or build the "
            "backbone with `tokenizer: train-bpe` (trained with Qwen2's pre-tokenization)."
        )
    write_json(path / "vocab.json", model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")
    added = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in data.get("added_tokens", [])
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added,
        "additional_special_tokens": _BAGEL_MARKERS, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "clean_up_tokenization_spaces": False,
        "split_special_tokens": False, "model_max_length": 32768,
    }
    write_json(path / "tokenizer_config.json", config)


# -- sizes -----------------------------------------------------------------------------------------
def parameter_counts(model: Bagel) -> dict[str, int]:
    """Parameter counts of a BAGEL model (works on the meta device).

    total: every parameter of the model (language model with both experts, ViT, connector, generation
    heads, the fixed sin-cos tables; not the autoencoder, a separate file); active_text: the weights a
    text token goes through (the language model without its `*_moe_gen` copies; the paper's "7B
    active"); moe_gen: the generation expert's copies; gen_only: the other generation-only modules
    (time embedder, vae2llm, llm2vae, latent table); vit: the understanding encoder; vae: the autoencoder."""
    gen_only = ("time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")
    counts = {"total": 0, "active_text": 0, "moe_gen": 0, "gen_only": 0, "vit": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        counts["total"] += n
        if "_moe_gen" in name:
            counts["moe_gen"] += n
        elif name.startswith("language_model."):
            counts["active_text"] += n
        elif name.startswith(gen_only):
            counts["gen_only"] += n
        elif name.startswith("vit_model."):
            counts["vit"] += n
    counts["vae"] = sum(p.numel() for p in model.vae.parameters()) if model.arch.visual_gen else 0
    return counts
