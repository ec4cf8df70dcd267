"""Chain vs joint decoding on a trained character: time per response and cross-modal CLIP-T.

    python benchmarks/decoding.py RUN_DIR [--turns 16] [--steps 20] [--features pixel|pretrained] [--out FILE]

RUN_DIR is a `cmrp fit` output (e.g. runs/quickstart). For each held-out user turn whose character turn
shows an image, a fresh chat session answers with text and an image:
- chain: the image is conditioned on the query and the reply text, p(T|Q)·p(I|Q,T);
- joint: the image is conditioned on the query alone, p(T|Q)·p(I|Q).
Reported per strategy: seconds per response (text + image) and the mean cosine between the image and
the reply text under the chosen features (`pixel`: weight-free colour-word proxy; `pretrained`: CLIP).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_rollout import emit  # noqa: E402


def held_out_queries(character, limit: int) -> list[str]:
    """User messages answered, in the held-out split, by a character turn that shows an image."""
    queries = []
    for scene in character.test.scenes:
        for before, turn in zip(scene.turns, scene.turns[1:], strict=False):
            if before.role == "user" and turn.role == "character" and turn.image_id:
                queries.append(before.text)
    return queries[:limit]


def run(run_dir: Path, *, turns: int, steps: int, features: str) -> dict:
    from cmrp.chat.artefact import _run_parts, load_chat_source  # noqa: PLC2701 - a run's character
    from cmrp.chat.session import ChatSession
    from cmrp.evaluation.features import load_feature_set

    backbone, info = load_chat_source(run_dir)
    _, _, character = _run_parts(run_dir)
    if character is None:
        raise SystemExit(f"{run_dir}: the run's character data is not available")
    queries = held_out_queries(character, turns)
    if not queries:
        raise SystemExit(f"{run_dir}: no held-out turn shows an image")
    feats = load_feature_set(features)
    result: dict = {"run": str(run_dir), "character": info.name, "turns": len(queries), "steps": steps,
                    "features": features}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("chain", "joint"):
            session = ChatSession(backbone, info, decoding=name, image_steps=steps, seed=0, out_dir=Path(tmp) / name)
            times, texts, images = [], [], []
            session.reply(queries[0], image=True)  # warm-up, untimed: the first call pays one-off costs
            for query in queries:
                session.reset()
                t = time.perf_counter()
                reply = session.reply(query, image=True)
                times.append(time.perf_counter() - t)
                texts.append(reply.text)
                images.append(_load(reply.image_path))
            stacked = torch.stack(images)
            cos = torch.nn.functional.cosine_similarity(
                feats.clip.encode_image(stacked).float(), feats.clip.encode_text(texts).float(), dim=-1)
            result[name] = {"seconds_per_response": statistics.mean(times),
                            "cross_modal_clip_t": float(cos.mean())}
    result["joint_vs_chain_time"] = result["joint"]["seconds_per_response"] / result["chain"]["seconds_per_response"]
    return result


def _load(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="chain vs joint decoding: time per response and CLIP-T")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--features", default="pixel", choices=["pixel", "pretrained"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.run_dir, turns=args.turns, steps=args.steps, features=args.features)
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
