"""Feature extractors for evaluation: pretrained (open_clip CLIP, DINOv2, LPIPS) or weight-free proxies.

`pixel` exists so `cmrp eval` runs on a CPU without downloaded weights (the sandbox, CI): DINO becomes
16x16 mean-centred pixels, LPIPS mean absolute pixel difference (both from `cmrp.rewards`), and CLIP
a colour-word encoder — an image is its share of pixels per basic colour, a text the colour words it
names — so CLIP-T still asks "does the image show the colours the text says?". Proxy numbers are only
comparable with other proxy numbers; the report says which set was used.

`sandbox` uses the small models the project trains on sandbox renders and ships in the package
(`cmrp.sandbox.features`): CLIP is the sandbox CLIP-style dual encoder, DINO the attribute probe's
image features, LPIPS stays the pixel distance. Meaningful for sandbox characters only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cmrp.errors import WeightsError

__all__ = ["FEATURE_CHOICES", "FEATURE_SETS", "ColourWordClip", "FeatureSet", "load_feature_set"]

FEATURE_SETS = ("pixel", "sandbox", "pretrained")
FEATURE_CHOICES = ("auto", *FEATURE_SETS)  # auto: sandbox for a sandbox character, else pretrained

# basic colour terms with a typical sRGB value each (0-255)
_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 220, 40), "green": (40, 170, 60),
    "teal": (20, 170, 170), "blue": (40, 80, 225), "purple": (140, 60, 200), "pink": (250, 130, 190),
    "brown": (130, 80, 40), "grey": (128, 128, 128), "black": (25, 25, 25), "white": (250, 250, 250),
}
_SYNONYMS = {"gray": "grey", "violet": "purple", "cyan": "teal", "turquoise": "teal"}


class ColourWordClip:
    """A CLIP stand-in with no weights: `encode_image` gives each image's share of pixels per palette
    colour, `encode_text` the share of each colour among the colour words of a text; both are centred
    on their mean over the palette, so an image shows a colour "more than average" where the cosine
    counts it. Identical images give cosine 1; an evenly mixed (noise) image or a text that names no
    colour gives a zero vector, hence cosine 0 with anything."""

    def __init__(self, temperature: float = 0.02):
        self.names = list(_PALETTE)
        self.colours = torch.tensor([_PALETTE[n] for n in self.names], dtype=torch.float32) / 255.0
        self.temperature = temperature

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pixels = torch.nn.functional.interpolate(images.float(), size=(32, 32), mode="area")
        pixels = pixels.flatten(2).transpose(1, 2)  # [B, P, 3]
        dist = ((pixels[:, :, None, :] - self.colours.to(pixels)[None, None]) ** 2).sum(-1)  # [B, P, K]
        shares = torch.softmax(-dist / self.temperature, dim=-1).mean(dim=1)
        return shares - shares.mean(dim=1, keepdim=True)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        import re

        out = torch.zeros(len(texts), len(self.names))
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                word = _SYNONYMS.get(word, word)
                if word in _PALETTE:
                    out[i, self.names.index(word)] += 1.0
        shares = out / out.sum(dim=1, keepdim=True).clamp(min=1.0)
        return torch.where(out.sum(dim=1, keepdim=True) > 0, shares - shares.mean(dim=1, keepdim=True), shares)


@dataclass
class FeatureSet:
    """The three feature nets the metrics need, and the name the report shows."""

    name: str
    clip: Any  # encode_image(images) -> [B, D], encode_text(list[str]) -> [B, D]
    dino: Callable[[torch.Tensor], torch.Tensor]
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def load_feature_set(name: str, *, clip_model: str = "ViT-B-32", clip_pretrained: str = "openai",
                     dino_model: str = "dinov2-small", lpips_net: str = "alex",
                     device: str | torch.device = "cpu") -> FeatureSet:
    """`pixel`: weight-free proxies. `sandbox`: the shipped sandbox CLIP and probe features. `pretrained`: open_clip CLIP, DINOv2 and LPIPS from local caches;
    a missing weight raises WeightsError naming it, how to provide it, and `--features pixel`."""
    from cmrp.rewards.diversity import pixel_distance
    from cmrp.rewards.trainset import pixel_features

    if name == "pixel":
        return FeatureSet("pixel", ColourWordClip(), pixel_features, pixel_distance)
    if name == "sandbox":
        from cmrp.sandbox.features import sandbox_clip, sandbox_image_features

        return FeatureSet("sandbox", sandbox_clip(), sandbox_image_features(), pixel_distance)
    if name != "pretrained":
        raise WeightsError(f"--features {name!r}: choose one of {', '.join(FEATURE_SETS)}")
    from cmrp.rewards.clip import load_open_clip
    from cmrp.rewards.diversity import load_lpips
    from cmrp.rewards.trainset import load_dinov2

    loaded, missing = {}, []
    for what, load in (("clip", lambda: load_open_clip(clip_model, clip_pretrained)),
                       ("dino", lambda: load_dinov2(dino_model)), ("lpips", lambda: load_lpips(lpips_net))):
        try:
            loaded[what] = load().to(device)
        except WeightsError as err:  # every missing weight is named in one message, not one per attempt
            missing.append(f"({len(missing) + 1}) {err}")
    if missing:
        raise WeightsError(f"cmrp eval --features pretrained: {len(missing)} of 3 feature models have no local "
                           f"weights: {' '.join(missing)} Or run with `--features sandbox` (sandbox characters) or "
                           "`--features pixel` (weight-free proxies) to evaluate without them.")
    return FeatureSet("pretrained", loaded["clip"], loaded["dino"], loaded["lpips"])
