"""Shared pieces of the sandbox's small trained models (attribute probe, CLIP-style encoders).

Training data is drawn on the fly: uniformly random attribute combinations from a seeded RNG, rendered
by `renderer.render` at the sandbox image size (32 px; 4x supersampled, LANCZOS-downsampled, exactly as
the characters' images), optionally perturbed so the models also read blurry or noisy generated images.
Weights are stored as safetensors (float16) beside a JSON manifest that says how they were made.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmrp.errors import WeightsError
from cmrp.jsonio import write_json
from cmrp.resources import git_commit  # re-exported: the manifests record it
from cmrp.sandbox.renderer import ATTRIBUTE_VALUES, render

__all__ = [
    "ASSETS",
    "ConvTrunk",
    "augment",
    "git_commit",
    "load_asset",
    "random_attrs",
    "render_batch",
    "render_pool",
    "save_asset",
    "to_input",
]

ASSETS = Path(__file__).resolve().parent / "assets"
IMAGE_SIZE = 32


def random_attrs(rng: random.Random) -> dict[str, str]:
    """One uniformly random combination of every attribute (the accessory colour may equal the body's)."""
    return {key: rng.choice(values) for key, values in ATTRIBUTE_VALUES.items()}


def render_batch(attrs: list[dict[str, str]], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Renders as a float tensor [B, 3, size, size] in [0, 1]."""
    import numpy as np

    arrays = np.stack([np.asarray(render(a, size), dtype=np.uint8) for a in attrs])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0


def render_pool(rng: random.Random, n: int, size: int = IMAGE_SIZE,
                chunk: int = 500) -> tuple[list[dict[str, str]], torch.Tensor]:
    """`n` random combinations and their renders as uint8 [n, 3, size, size] (rendered once, then sampled
    from in every training step: drawing dominates a step's time on a CPU)."""
    attrs = [random_attrs(rng) for _ in range(n)]
    images = torch.cat([(render_batch(attrs[i:i + chunk], size) * 255).round().to(torch.uint8)
                        for i in range(0, n, chunk)])
    return attrs, images


def to_input(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Any [B, 3, H, W] batch in [0, 1] as the models' input: float, `size` px (area / bilinear resize)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    images = images.float().clamp(0, 1)
    if images.shape[-2:] != (size, size):
        mode = "area" if images.shape[-1] > size else "bilinear"
        kwargs = {} if mode == "area" else {"align_corners": False}
        images = nn.functional.interpolate(images, size=(size, size), mode=mode, **kwargs)
    return images


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild perturbations a generated image shows: blur (down-up sampling), Gaussian noise, brightness
    and contrast jitter, each applied to a random half of the batch. Geometry is left alone (pose is a
    position attribute)."""
    b = images.shape[0]

    def pick(p: float) -> torch.Tensor:
        return (torch.rand(b, 1, 1, 1, generator=generator) < p).float()

    size = images.shape[-1]
    blurred = nn.functional.interpolate(
        nn.functional.interpolate(images, scale_factor=0.5, mode="area"), size=(size, size), mode="bilinear",
        align_corners=False)
    images = torch.lerp(images, blurred, pick(0.3))
    noise = torch.randn(images.shape, generator=generator) * torch.rand(b, 1, 1, 1, generator=generator) * 0.08
    images = images + noise * pick(0.5)
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.3
    shift = (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.15
    jitter = pick(0.5)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = images + jitter * ((images - mean) * (gain - 1) + shift)
    return images.clamp(0, 1)


class ConvTrunk(nn.Module):
    """32 px image -> `dim` features: four conv blocks (3x3 conv, batch norm, ReLU, 2x2 max pool after the
    first three) down to 4x4, adaptive average pool to 2x2 (keeps where things are: pose), linear."""

    def __init__(self, channels: tuple[int, ...] = (24, 48, 64, 64), dim: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        prev = 3
        for i, ch in enumerate(channels):
            layers += [nn.Conv2d(prev, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            prev = ch
        layers.append(nn.AdaptiveAvgPool2d(2))
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(prev * 4, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - 0.5) / 0.25
        return self.fc(self.conv(x).flatten(1))



def train_on_renders(model: nn.Module, loss_fn: Callable[[list[dict[str, str]], torch.Tensor], torch.Tensor],
                     opt: torch.optim.Optimizer, sched: Any, rng: random.Random, gen: torch.Generator, *,
                     steps: int, batch_size: int, pool_size: int, label: str,
                     time_budget_s: float | None = None, log: Callable[[str], None] | None = None) -> tuple[list[float], int]:
    """The training loop both sandbox models share: render a pool of random creatures once, then per step a
    batch from it (half of it augmented) and `loss_fn(attrs, images)`. Returns the losses and the steps done."""
    t0, losses, done = time.perf_counter(), [], 0
    pool_size = max(1, min(pool_size, steps * batch_size))  # never more renders than training would draw
    pool_attrs, pool = render_pool(rng, pool_size, model.image_size)
    if log:
        log(f"rendered {pool_size} training images in {time.perf_counter() - t0:.0f}s")
    model.train()
    for step in range(steps):
        picks = torch.randint(len(pool_attrs), (batch_size,), generator=gen).tolist()
        images = pool[picks].float() / 255.0
        half = batch_size // 2
        images = torch.cat([images[:half], augment(images[half:], gen)])
        loss = loss_fn([pool_attrs[i] for i in picks], images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        done = step + 1
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"{label} step {step:5d}/{steps}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}  "
                f"{time.perf_counter() - t0:.0f}s")
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            break
    model.eval()
    return losses, done

def save_asset(model: nn.Module, manifest: dict[str, Any], out_dir: Path, name: str,
               extra: dict[str, torch.Tensor] | None = None) -> tuple[Path, Path]:
    """`out_dir/<name>.safetensors` (float16 weights, float buffers kept in float32) and `<name>.json`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in {**model.state_dict(), **(extra or {})}.items():
        value = value.detach().cpu().contiguous()
        if value.is_floating_point() and "running" not in key and not key.startswith("feature_"):
            value = value.half()
        tensors[key] = value
    weights, meta = out_dir / f"{name}.safetensors", out_dir / f"{name}.json"
    tmp = weights.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "cmrp": name})
    tmp.chmod(0o644)
    tmp.replace(weights)
    write_json(meta, manifest, ensure_ascii=True)
    return weights, meta


def load_asset(path: Path | str | None, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(float32 state dict, manifest) of `<dir>/<name>.safetensors` + `.json`; `path` None: the shipped
    assets; a directory: that folder (e.g. a `cmrp sandbox train-probe --out DIR`)."""
    from safetensors.torch import load_file

    folder = ASSETS if path is None else Path(path).expanduser()
    weights, meta = folder / f"{name}.safetensors", folder / f"{name}.json"
    how = (f"train them with `cmrp sandbox train-{'probe' if name == 'probe' else 'features'} --out {folder}`"
           if path is not None else "reinstall cmrp (the wheel ships them under cmrp/sandbox/assets)")
    if not weights.is_file() or not meta.is_file():
        raise WeightsError(f"sandbox {name} model: {weights.name} and {meta.name} expected in {folder}; {how}")
    try:
        manifest = json.loads(meta.read_text())
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    except (OSError, ValueError) as err:
        raise WeightsError(f"sandbox {name} model: cannot read {weights} / {meta} ({err}); {how}") from None
    return state, manifest
