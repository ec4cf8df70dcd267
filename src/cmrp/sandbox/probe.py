"""The attribute probe: an evaluation oracle that reads a sandbox image's attributes back.

Every sandbox image has exact ground truth, so a small CNN trained on renders of random attribute
combinations (one classification head per attribute of `renderer.ATTRIBUTE_VALUES`) scores generated
images independently of the reward models:

- `identity_fidelity(images, identity)`: per image, the fraction of the character's identity attributes
  (body shape and colour, eyes, accessory and its colour) the probe reads as the character's; averaged.
- `prompt_faithfulness(images, prompt_attrs)`: per image, the fraction of the attributes the prompt asks
  for (identity and expression / pose / scene) that the probe reads back; averaged.

`chance_identity_fidelity` / `chance_prompt_faithfulness` give what an image of uniformly random
attributes scores. An accessory colour counts only where the character has an accessory, and is read
correctly only when the probe also sees an accessory. The probe's penultimate layer, centred on its mean
over random renders and L2-normalised, is the sandbox's DINO stand-in (`image_features`).

Shipped weights: `cmrp/sandbox/assets/probe.safetensors` + `probe.json` (the manifest: architecture,
vocabulary, seed, training settings, held-out accuracy per attribute, commit). Retrain with
`cmrp sandbox train-probe --out DIR`.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmrp.errors import WeightsError
from cmrp.sandbox.nets import (
    IMAGE_SIZE,
    ConvTrunk,
    augment,
    git_commit,
    load_asset,
    random_attrs,
    render_batch,
    save_asset,
    to_input,
    train_on_renders,
)
from cmrp.sandbox.renderer import ATTRIBUTE_VALUES, IDENTITY_ATTRIBUTES

__all__ = [
    "AttributeProbe",
    "attribute_matches",
    "chance_identity_fidelity",
    "chance_prompt_faithfulness",
    "evaluate_probe",
    "identity_fidelity",
    "image_features",
    "load_probe",
    "prompt_faithfulness",
    "read_attributes",
    "train_probe",
]

NAME = "probe"


class AttributeProbe(nn.Module):
    """ConvTrunk -> ReLU features -> one linear head per attribute. `feature_mean` centres the features
    for `image_features` (set after training from random renders)."""

    def __init__(self, vocab: Mapping[str, Sequence[str]] | None = None, channels: Sequence[int] = (16, 32, 64, 64),
                 dim: int = 128, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.vocab = {k: list(v) for k, v in (vocab or ATTRIBUTE_VALUES).items()}
        self.channels, self.dim, self.image_size = tuple(channels), dim, image_size
        self.trunk = ConvTrunk(self.channels, dim)
        self.heads = nn.ModuleDict({key: nn.Linear(dim, len(values)) for key, values in self.vocab.items()})
        self.register_buffer("feature_mean", torch.zeros(dim))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.trunk(to_input(images, self.image_size)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)
        return {key: head(h) for key, head in self.heads.items()}

    def architecture(self) -> dict[str, Any]:
        return {"kind": "AttributeProbe", "trunk": "ConvTrunk", "channels": list(self.channels), "dim": self.dim,
                "image_size": self.image_size, "heads": {k: len(v) for k, v in self.vocab.items()}}


# -- training --------------------------------------------------------------------------------------------
def _targets(attrs: list[dict[str, str]], vocab: Mapping[str, list[str]]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([values.index(a[key]) for a in attrs]) for key, values in vocab.items()}


def _loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    total = logits["body_shape"].new_zeros(())
    has_accessory = targets["accessory"] != ATTRIBUTE_VALUES["accessory"].index("none")
    for key, out in logits.items():
        if key == "accessory_color":  # no colour to see without an accessory
            if has_accessory.any():
                total = total + nn.functional.cross_entropy(out[has_accessory], targets[key][has_accessory])
        else:
            total = total + nn.functional.cross_entropy(out, targets[key])
    return total


@torch.no_grad()
def evaluate_probe(probe: AttributeProbe, n: int = 2000, seed: int = 12345, perturbed: bool = False,
                   batch_size: int = 250) -> dict[str, float]:
    """Per-attribute accuracy on `n` fresh renders (seeded; `perturbed`: with the training perturbations).
    `accessory_color` is scored on images that have an accessory."""
    probe.eval()
    rng, gen = random.Random(f"cmrp-probe-eval:{seed}"), torch.Generator().manual_seed(seed)
    correct: dict[str, int] = dict.fromkeys(probe.vocab, 0)
    counted: dict[str, int] = dict.fromkeys(probe.vocab, 0)
    for start in range(0, n, batch_size):
        attrs = [random_attrs(rng) for _ in range(min(batch_size, n - start))]
        images = render_batch(attrs, probe.image_size)
        if perturbed:
            images = augment(images, gen)
        readings = read_attributes(images, probe)
        for truth, read in zip(attrs, readings, strict=True):
            for key in probe.vocab:
                if key == "accessory_color" and truth["accessory"] == "none":
                    continue
                counted[key] += 1
                correct[key] += int(read[key] == truth[key])
    return {key: correct[key] / max(1, counted[key]) for key in probe.vocab}


def train_probe(out_dir: Path | str | None = None, *, seed: int = 0, steps: int = 2000, batch_size: int = 128,
                lr: float = 3e-3, pool_size: int = 40000, eval_n: int = 2000, time_budget_s: float | None = None,
                log: Callable[[str], None] | None = print) -> tuple[AttributeProbe, dict[str, Any]]:
    """Train a probe on renders of random attribute combinations drawn from `seed` (a pool of `pool_size`
    renders sampled with replacement); half of each batch perturbed (blur, noise, brightness). AdamW with
    a one-cycle schedule. Held-out accuracy is measured on fresh renders from a separate RNG stream. With
    `out_dir`, writes probe.safetensors + probe.json."""
    torch.manual_seed(seed)
    rng, gen = random.Random(f"cmrp-probe-train:{seed}"), torch.Generator().manual_seed(seed)
    probe = AttributeProbe()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    t0 = time.perf_counter()
    losses, done = train_on_renders(probe, lambda attrs, images: _loss(probe(images), _targets(attrs, probe.vocab)),
                                    opt, sched, rng, gen, steps=steps, batch_size=batch_size,
                                    pool_size=pool_size, label="probe", time_budget_s=time_budget_s, log=log)
    pool_size = max(1, min(pool_size, steps * batch_size))  # what train_on_renders rendered
    with torch.no_grad():  # centre for image_features: mean over fresh random renders
        mean_rng = random.Random(f"cmrp-probe-mean:{seed}")
        probe.feature_mean.copy_(probe.features(render_batch([random_attrs(mean_rng) for _ in range(512)])).mean(0))
    clean = evaluate_probe(probe, eval_n, seed=seed + 1) if eval_n else {}
    noisy = evaluate_probe(probe, eval_n, seed=seed + 2, perturbed=True) if eval_n else {}
    manifest = {
        "name": "cmrp sandbox attribute probe",
        "architecture": probe.architecture(),
        "vocab": probe.vocab,
        "identity_attributes": list(IDENTITY_ATTRIBUTES),
        "seed": seed,
        "training": {"steps": done, "batch_size": batch_size, "lr": lr, "pool_size": pool_size, "optimizer": "AdamW(wd=1e-4), one-cycle",
                     "data": "a pool of uniform random attribute combinations rendered at 32 px (sampled with replacement); half of each batch "
                     "perturbed (blur, Gaussian noise, brightness/contrast)",
                     "first_loss": losses[0] if losses else None, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
                     "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__},
        "heldout": {"n": eval_n, "accuracy_clean": clean, "accuracy_perturbed": noisy},
        "features": {"what": "ReLU penultimate layer minus feature_mean (512 random renders), L2-normalised",
                     "dim": probe.dim},
        "git_commit": git_commit(),
    }
    if out_dir is not None:
        save_asset(probe, manifest, Path(out_dir), NAME)
    return probe, manifest


# -- loading and reading ---------------------------------------------------------------------------------
def _build(state: dict[str, torch.Tensor], manifest: dict[str, Any], where: str) -> AttributeProbe:
    try:
        arch = manifest["architecture"]
        probe = AttributeProbe(manifest["vocab"], arch["channels"], arch["dim"], arch["image_size"])
        probe.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as err:
        raise WeightsError(f"{where}: the probe weights do not match their manifest ({type(err).__name__}: "
                           f"{str(err)[:200]}); retrain with `cmrp sandbox train-probe --out DIR`") from None
    return probe.eval().requires_grad_(False)


@functools.lru_cache(maxsize=4)
def _cached(path: str | None) -> AttributeProbe:
    state, manifest = load_asset(path, NAME)
    probe = _build(state, manifest, path or "the shipped probe")
    probe.manifest = manifest  # type: ignore[attr-defined]
    return probe


def load_probe(path: Path | str | None = None) -> AttributeProbe:
    """The probe in `path` (a folder with probe.safetensors + probe.json), or the shipped one; cached."""
    return _cached(str(Path(path).expanduser().resolve()) if path is not None else None)


@torch.no_grad()
def read_attributes(images: torch.Tensor, probe: AttributeProbe | None = None,
                    batch_size: int = 256) -> list[dict[str, str | None]]:
    """What the probe reads in each image of [B, 3, H, W] in [0, 1]: attribute -> value; `accessory_color`
    is None where it reads no accessory."""
    probe = probe or load_probe()
    out: list[dict[str, str | None]] = []
    for start in range(0, images.shape[0], batch_size):
        logits = probe(images[start:start + batch_size].cpu())
        picks = {key: value.argmax(dim=1).tolist() for key, value in logits.items()}
        for i in range(len(picks["body_shape"])):
            reading: dict[str, str | None] = {key: probe.vocab[key][picks[key][i]] for key in probe.vocab}
            if reading.get("accessory") == "none":
                reading["accessory_color"] = None
            out.append(reading)
    return out


def _applicable(attrs: Mapping[str, Any]) -> list[str]:
    keys = [k for k in ATTRIBUTE_VALUES if attrs.get(k) is not None]
    if attrs.get("accessory") == "none" and "accessory_color" in keys:
        keys.remove("accessory_color")
    return keys


def attribute_matches(reading: Mapping[str, Any], attrs: Mapping[str, Any]) -> dict[str, bool]:
    """attribute -> whether `reading` agrees with `attrs`, over the attributes `attrs` specifies (an
    accessory colour only when an accessory is specified)."""
    bad = {k: v for k, v in attrs.items() if k in ATTRIBUTE_VALUES and v is not None and v not in ATTRIBUTE_VALUES[k]}
    if bad:
        raise ValueError(f"unknown attribute values {bad}; allowed: {ATTRIBUTE_VALUES}")
    return {key: reading.get(key) == attrs[key] for key in _applicable(attrs)}


def _score(images: torch.Tensor, per_image: list[Mapping[str, Any]], probe: AttributeProbe | None) -> float:
    if images.shape[0] == 0:
        return math.nan
    fractions = []
    for reading, attrs in zip(read_attributes(images, probe), per_image, strict=True):
        matches = attribute_matches(reading, attrs)
        if matches:
            fractions.append(sum(matches.values()) / len(matches))
    return sum(fractions) / len(fractions) if fractions else math.nan


def identity_fidelity(images: torch.Tensor, identity_attrs: Mapping[str, Any],
                      probe: AttributeProbe | None = None) -> float:
    """Mean over images of the fraction of the character's identity attributes the probe reads back."""
    identity = {k: identity_attrs[k] for k in IDENTITY_ATTRIBUTES if identity_attrs.get(k) is not None}
    if not identity:
        raise ValueError(f"identity_attrs names none of {IDENTITY_ATTRIBUTES}: {dict(identity_attrs)}")
    return _score(images, [identity] * images.shape[0], probe)


def prompt_faithfulness(images: torch.Tensor, prompt_attrs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                        probe: AttributeProbe | None = None) -> float:
    """Mean over images of the fraction of the attributes its prompt specifies that the probe reads back.
    `prompt_attrs`: one mapping for every image, or one per image."""
    per_image = [prompt_attrs] * images.shape[0] if isinstance(prompt_attrs, Mapping) else list(prompt_attrs)
    if len(per_image) != images.shape[0]:
        raise ValueError(f"{len(per_image)} attribute sets for {images.shape[0]} images")
    return _score(images, per_image, probe)


def _chance(attrs: Mapping[str, Any]) -> float:
    keys = _applicable(attrs)
    if not keys:
        return math.nan
    values = ATTRIBUTE_VALUES
    p_accessory = 1 - 1 / len(values["accessory"])
    return sum((p_accessory if k == "accessory_color" else 1.0) / len(values[k]) for k in keys) / len(keys)


def chance_identity_fidelity(identity_attrs: Mapping[str, Any]) -> float:
    """What an image of uniformly random attributes scores on `identity_fidelity` for this identity."""
    return _chance({k: identity_attrs.get(k) for k in IDENTITY_ATTRIBUTES})


def chance_prompt_faithfulness(prompt_attrs: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> float:
    """What images of uniformly random attributes score on `prompt_faithfulness` for these prompts."""
    items = [prompt_attrs] if isinstance(prompt_attrs, Mapping) else list(prompt_attrs)
    chances = [c for c in (_chance(a) for a in items) if not math.isnan(c)]
    return sum(chances) / len(chances) if chances else math.nan


@torch.no_grad()
def image_features(images: torch.Tensor, probe: AttributeProbe | None = None) -> torch.Tensor:
    """The sandbox DINO stand-in: centred, L2-normalised penultimate probe features [B, dim]."""
    probe = probe or load_probe()
    device = images.device
    feats = probe.features(images.cpu()) - probe.feature_mean
    return nn.functional.normalize(feats, dim=1).to(device)
