"""Ground-truth oracle numbers for sandbox characters: identity fidelity and prompt faithfulness.

A sandbox character's profile carries its identity attributes (`profile.fields["identity"]`), and its
images carry their full attributes; image prompts are sandbox captions, so what a prompt asks for is
known (the target image's attributes, or the caption read back with `read_description`). The sandbox's
attribute probe (`cmrp.sandbox.probe`) reads generated images, independently of the reward models:

- `identity_fidelity`: per image, the share of the character's identity attributes the probe sees;
- `prompt_faithfulness`: per image, the share of the attributes its prompt asks for that the probe sees;
- `text_image_agreement`: per image drawn with a reply, the share of the picture attributes the reply states
  (scene, pose, expression, accessory: `sandbox.templates.read_reply`) that the probe sees — whether the
  picture shows what the text says, the quantity chain decoding is meant to raise.

For any other character these functions return nothing, so the report simply has no such rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from cmrp.data.character import Character, ImageRef
from cmrp.sandbox.features import models_dir
from cmrp.sandbox.probe import (
    chance_identity_fidelity,
    chance_prompt_faithfulness,
    identity_fidelity,
    load_probe,
    prompt_faithfulness,
)
from cmrp.sandbox.renderer import ATTRIBUTE_VALUES, IDENTITY_ATTRIBUTES
from cmrp.sandbox.templates import read_description, read_reply

__all__ = ["chance_levels", "image_oracle_numbers", "prompt_attributes", "reply_agreement", "sandbox_identity"]


def sandbox_identity(character: Character) -> dict[str, str] | None:
    """The identity attributes of a sandbox character (profile field `identity`), or None for any other."""
    identity = character.profile.fields.get("identity")
    if not isinstance(identity, dict):
        return None
    if any(identity.get(k) not in ATTRIBUTE_VALUES[k] for k in IDENTITY_ATTRIBUTES):
        return None
    return {k: identity[k] for k in IDENTITY_ATTRIBUTES}


def prompt_attributes(prompt: str, image: ImageRef | None = None) -> dict[str, str]:
    """What an image prompt asks for: the target image's ground-truth attributes when it has them, else the
    attributes of the sandbox caption in the prompt text ({} when it holds none)."""
    if image is not None and image.attributes and all(
            image.attributes.get(k) in v for k, v in ATTRIBUTE_VALUES.items()):
        return {k: str(image.attributes[k]) for k in ATTRIBUTE_VALUES}
    return read_description(prompt or "")


def _probe():
    return load_probe(models_dir())


def image_oracle_numbers(character: Character, images: torch.Tensor,
                         prompt_attrs: Sequence[dict[str, str]]) -> dict[str, float]:
    """`identity_fidelity` and `prompt_faithfulness` of `images` [N,3,H,W] (one attribute set per image;
    an empty set leaves that image out of prompt faithfulness); {} for a non-sandbox character."""
    identity = sandbox_identity(character)
    if identity is None or images.shape[0] == 0:
        return {}
    probe = _probe()
    out = {"identity_fidelity": identity_fidelity(images, identity, probe)}
    keep = [i for i, attrs in enumerate(prompt_attrs) if attrs]
    out["prompt_faithfulness"] = (prompt_faithfulness(images[keep], [prompt_attrs[i] for i in keep], probe)
                                  if keep else math.nan)
    return out


def reply_agreement(character: Character, images: torch.Tensor, replies: Sequence[str]) -> dict[str, float]:
    """Text-image agreement of images [N,3,H,W] drawn with `replies` (one each), for a sandbox character:
    `text_image_agreement` (mean over replies that state any picture attribute, see the module docstring),
    its chance level (images of uniformly random attributes), and `reply_states_picture` (the share of replies
    that state any). {} for a non-sandbox character or no images."""
    if sandbox_identity(character) is None or images.shape[0] == 0:
        return {}
    if images.shape[0] != len(replies):
        raise ValueError(f"{len(replies)} replies for {images.shape[0]} images")
    stated = [read_reply(text) for text in replies]
    keep = [i for i, attrs in enumerate(stated) if attrs]
    out = {"reply_states_picture": len(keep) / len(stated), "agreement_items": float(len(keep))}
    if keep:
        claims = [stated[i] for i in keep]
        out["text_image_agreement"] = prompt_faithfulness(images[keep], claims, _probe())
        out["text_image_agreement_chance"] = chance_prompt_faithfulness(claims)
    else:
        out["text_image_agreement"] = out["text_image_agreement_chance"] = math.nan
    return out


def chance_levels(character: Character, prompt_attrs: Sequence[dict[str, str]]) -> dict[str, Any] | None:
    """What images of uniformly random attributes would score, and how well the probe reads clean renders
    (its held-out accuracy), for the report; None for a non-sandbox character."""
    identity = sandbox_identity(character)
    if identity is None:
        return None
    probe = _probe()
    manifest = getattr(probe, "manifest", {})
    attrs = [a for a in prompt_attrs if a]
    return {
        "identity": identity,
        "chance_identity_fidelity": chance_identity_fidelity(identity),
        "chance_prompt_faithfulness": chance_prompt_faithfulness(attrs) if attrs else None,
        "probe_heldout_accuracy": manifest.get("heldout", {}).get("accuracy_clean"),
        "probe_commit": manifest.get("git_commit"),
    }
