"""A multi-turn role-play session with one character: text replies, and images on request.

The history is kept as model-agnostic `Segment`s (system prompt, user turns, character turns), the same
shape the training examples and the evaluation use. An image turn follows the decoding strategy:
`chain` draws the image from the history plus the reply just written (p(I|Q,T)), `joint` from the
history alone (p(I|Q)), `think` writes the character's thinking after the reply and draws the image
with both in the same context (the backbone's `think_and_sample`; the thinking is kept in the turn).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmrp.backbones.protocol import Backbone, SupportsThink, require
from cmrp.data.tasks import Example, Segment
from cmrp.jsonio import write_json
from cmrp.sampling.decoding import get_strategy
from cmrp.sampling.spec import SamplerSpec

__all__ = ["CharacterInfo", "ChatSession", "Reply", "parse_user_line"]

_IMAGE_NAME = re.compile(r"^image-(\d+)\.png$")


@dataclass
class CharacterInfo:
    """What a session needs to know of its character besides the model."""

    name: str
    profile: str = ""
    decoding: str = "chain"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply:
    text: str
    image_path: Path | None = None


def parse_user_line(line: str) -> tuple[str, bool]:
    """`/image MESSAGE` asks for an image with the reply; anything else is a plain message."""
    stripped = line.strip()
    if stripped == "/image" or stripped.startswith("/image "):
        return stripped[len("/image"):].strip(), True
    return stripped, False


class ChatSession:
    """History + replies of one character.

    `sampling`: the sampling settings images are drawn with (guidance `cfg_*`, `timestep_shift`; see
    `cmrp.sampling.spec`); default: the character's (`character.extra["sampling"]`, the run's recipe)."""

    def __init__(self, backbone: Backbone, character: CharacterInfo, decoding: str = "chain", image_steps: int = 20,
                 seed: int = 0, *, out_dir: str | Path = "chat", max_new_tokens: int = 48,
                 temperature: float = 0.0, max_history_turns: int = 8,
                 sampling: dict[str, Any] | None = None):
        self.backbone = backbone
        self.character = character
        self.strategy = get_strategy(decoding)
        self.thinker = (require(backbone, SupportsThink, feature=f"decoding {decoding!r}", otherwise="--decoding chain")
                        if self.strategy.think else None)
        settings = sampling if sampling is not None else (character.extra or {}).get("sampling") or {}
        self.image_spec = SamplerSpec.from_settings(settings, steps=image_steps,
                                                    where=f"character {character.name!r}: card key 'sampling'")
        self.image_steps = image_steps
        self.seed = seed
        self.out_dir = Path(out_dir)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.max_history_turns = max_history_turns
        self.reset()

    # -- state -------------------------------------------------------------------------------------
    @property
    def system(self) -> Segment:
        return Segment("text", "system", f"You are {self.character.name}. Stay in character.")

    def reset(self) -> None:
        """Forget the conversation (the image counter keeps going, so no file is overwritten)."""
        self.turns: list[dict[str, Any]] = []

    def context(self) -> list[Segment]:
        """System prompt + the last `max_history_turns` turns (user and character), as text segments."""
        recent = self.turns[-self.max_history_turns:] if self.max_history_turns > 0 else []
        return [self.system, *(Segment("text", t["role"], t["text"]) for t in recent)]

    # -- a turn ------------------------------------------------------------------------------------
    def reply(self, message: str, *, image: bool = False) -> Reply:
        import torch

        turn = len(self.turns)
        self.turns.append({"role": "user", "text": message})
        history = self.context()
        with torch.no_grad():
            text = self.backbone.generate_text([Example("chat", history)], max_new_tokens=self.max_new_tokens,
                                               temperature=self.temperature, seed=self.seed + turn)[0]
        path = thinking = None
        if image:
            context = [*history, Segment("text", "character", text)] if self.strategy.image_sees_reply else history
            with torch.no_grad():
                if self.thinker is not None:
                    thoughts, rollout = self.thinker.think_and_sample(
                        [Example("t2i", context)], self.image_spec, n=1, seed=self.seed + turn,
                        max_think_tokens=self.max_new_tokens, temperature=self.temperature,
                        text_seed=self.seed + turn)
                    thinking = thoughts[0]
                else:
                    rollout = self.backbone.sample_images([Example("t2i", context)], self.image_spec, n=1,
                                                          seed=self.seed + turn)
            path = self._save_image(rollout.images[0])
        self.turns.append({"role": "character", "text": text, "image": str(path) if path else None,
                           **({"thinking": thinking} if thinking is not None else {})})
        return Reply(text, path)

    def _save_image(self, pixels: Any) -> Path:
        import numpy as np
        from PIL import Image

        self.out_dir.mkdir(parents=True, exist_ok=True)
        used = [int(m.group(1)) for p in self.out_dir.iterdir() if (m := _IMAGE_NAME.match(p.name))]
        path = self.out_dir / f"image-{max(used, default=0) + 1:04d}.png"
        array = (pixels.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round()
        tmp = path.with_suffix(".png.tmp")
        Image.fromarray(array.astype(np.uint8)).save(tmp, format="PNG")
        tmp.replace(path)
        return path

    # -- transcript ----------------------------------------------------------------------------------
    def transcript(self) -> dict[str, Any]:
        return {"character": self.character.name, "decoding": self.strategy.name, "seed": self.seed,
                "image_steps": self.image_steps, "turns": [dict(t) for t in self.turns]}

    def save(self, path: str | Path) -> Path:
        """The conversation as JSON (roles, texts, image paths)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, self.transcript())
        return path
