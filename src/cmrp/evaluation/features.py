"""Feature extractors for evaluation: pretrained (CLIP, DINOv2, LPIPS, Inception) or weight-free proxies.

`pretrained` loads, from local caches only: OpenAI CLIP ViT-L/14 through transformers (CLIP-T is then
torchmetrics' CLIPScore / 100, and CLIP-I uses the same embeddings), DINOv2 through transformers (our
feature model, `cmrp.rewards.trainset`), LPIPS-alex through torchmetrics, and, when its weights are on the
machine, torch-fidelity's InceptionV3 for FID / KID (torchmetrics). Every missing required model is listed
in one error; missing Inception weights only skip FID / KID (the report says how to enable them).

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
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch

from cmrp.errors import WeightsError
from cmrp.rewards import diversity  # lpips_backbone_missing looked up per call: tests stand in for it
from cmrp.rewards.clip import load_hf_clip
from cmrp.rewards.diversity import pixel_distance
from cmrp.rewards.pretrained import (
    MissingModel,
    missing_hf_model,
    missing_models_error,
    torch_checkpoints_dir,
    torch_fetch_hint,
    torch_file_missing,
)
from cmrp.rewards.trainset import dinov2_repo, load_dinov2, pixel_features
from cmrp.sandbox.features import sandbox_clip, sandbox_image_features

__all__ = ["FEATURE_CHOICES", "FEATURE_SETS", "INCEPTION_URL", "ColourWordClip", "FeatureSet", "InceptionFeatures",
           "LpipsMetric", "inception_missing", "load_feature_set", "load_inception", "load_lpips_metric"]

FEATURE_SETS = ("pixel", "sandbox", "pretrained")
FEATURE_CHOICES = ("auto", *FEATURE_SETS)  # auto: sandbox for a sandbox character, else pretrained
# torch-fidelity's InceptionV3 weights, the network FID is defined with (torchmetrics loads it through torch-fidelity)
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"

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


class LpipsMetric:
    """torchmetrics' LPIPS as a distance `(a, b) -> [N]` on images in [0,1] (per pair, no reduction)."""

    def __init__(self, metric: Any):
        self.metric = metric

    def to(self, device: str | torch.device) -> LpipsMetric:
        self.metric.to(device)
        return self

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.metric.reset()
        device = next(self.metric.parameters()).device
        self.metric.update(a.float().clamp(0, 1).to(device), b.float().clamp(0, 1).to(device))
        return self.metric.compute().flatten().float().cpu()


def load_lpips_metric(net: str = "alex") -> LpipsMetric:
    """torchmetrics' `LearnedPerceptualImagePatchSimilarity`; its linear heads ship with torchmetrics, the
    backbone comes from the torch hub cache (checked first, so nothing is downloaded)."""
    missing = diversity.lpips_backbone_missing(net)
    if missing is not None:
        raise WeightsError(f"LPIPS {net!r}: {missing.fix}")
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    net_type = cast(Literal["vgg", "alex", "squeeze"], net)  # a TORCHVISION_WEIGHTS key: checked just above
    return LpipsMetric(LearnedPerceptualImagePatchSimilarity(net_type=net_type, reduction="none", normalize=True))


class InceptionFeatures(torch.nn.Module):
    """torch-fidelity's InceptionV3 (pool features, 2048-d) on float images in [0,1]: quantised to uint8 the
    way torchmetrics' FID does with `normalize=True`, so FID and KID can share one loaded network."""

    num_features = 2048

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.float().clamp(0, 1) * 255).byte())


def inception_missing() -> Any:
    """A `MissingModel` when torch-fidelity or the Inception weights are not here, else None."""
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is None:
        return MissingModel("FID/KID", "torch-fidelity's InceptionV3", "`pip install torch-fidelity`")
    if torch_file_missing(INCEPTION_URL) is not None:
        return MissingModel("FID/KID", f"InceptionV3 weights ({INCEPTION_URL.rsplit('/', 1)[-1]})",
                            torch_fetch_hint(INCEPTION_URL))
    return None


def load_inception() -> InceptionFeatures:
    """The FID InceptionV3 from the torch hub cache (never downloaded); WeightsError when it is not there."""
    missing = inception_missing()
    if missing is not None:
        raise WeightsError(f"{missing.model}: {missing.fix}")
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = torch_checkpoints_dir() / INCEPTION_URL.rsplit("/", 1)[-1]
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(path))
    except Exception as err:  # a truncated or foreign file
        raise WeightsError(f"{path}: cannot load the InceptionV3 weights ({type(err).__name__}: {err}); download "
                           f"{INCEPTION_URL} again") from None
    return InceptionFeatures(net)


@dataclass
class FeatureSet:
    """The feature nets the metrics need, and the name the report shows. `inception` (FID/KID) is optional:
    None when its weights are absent, with the reason in `notes`."""

    name: str
    clip: Any  # encode_image(images) -> [B, D], encode_text(list[str]) -> [B, D]
    dino: Callable[[torch.Tensor], torch.Tensor]
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    inception: Any = None  # images [N,3,H,W] in [0,1] -> [N, 2048]
    notes: list[str] = field(default_factory=list)


def load_feature_set(name: str, *, clip_model: str = "openai/clip-vit-large-patch14", dino_model: str = "dinov2-small",
                     lpips_net: str = "alex", device: str | torch.device = "cpu") -> FeatureSet:
    """`pixel`: weight-free proxies. `sandbox`: the shipped sandbox CLIP and probe features. `pretrained`:
    CLIP, DINOv2, LPIPS (and Inception for FID/KID when present) from local caches; every missing required
    model is listed in one WeightsError with its fix, before anything loads."""
    if name == "pixel":
        return FeatureSet("pixel", ColourWordClip(), pixel_features, pixel_distance)
    if name == "sandbox":
        return FeatureSet("sandbox", sandbox_clip(), sandbox_image_features(), pixel_distance)
    if name != "pretrained":
        raise WeightsError(f"--features {name!r}: choose one of {', '.join(FEATURE_SETS)}")

    who = "cmrp eval --features pretrained"
    missing = missing_hf_model("CLIP-T / CLIP-I", clip_model, "CLIPModel", processor=True)
    missing += missing_hf_model("DINO", dinov2_repo(dino_model), "Dinov2Model")
    lpips_missing = diversity.lpips_backbone_missing(lpips_net)
    if lpips_missing is not None:
        missing.append(MissingModel("diversity (LPIPS)", lpips_missing.model, lpips_missing.fix))
    if missing:
        raise missing_models_error(missing, who, "Or run with `--features sandbox` (the small shipped models; sandbox "
                                   "characters only) or `--features pixel` (weight-free proxies).")
    clip = load_hf_clip(clip_model, local_files_only=True).to(device)
    dino = load_dinov2(dino_model, local_files_only=True).to(device)
    distance = load_lpips_metric(lpips_net).to(device)
    inception, notes = None, []
    absent = inception_missing()
    if absent is None:
        inception = load_inception().to(device)
    else:
        notes.append(f"FID/KID not computed: {absent.model} is not on this machine; {absent.fix}")
    return FeatureSet("pretrained", clip, dino, distance, inception, notes)
