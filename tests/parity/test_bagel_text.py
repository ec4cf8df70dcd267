"""BAGEL golden tests, part 2: the prompt of a role-play turn, text logits and KV-cached greedy decoding,
understanding with images (ViT packing of two images of different sizes)."""

from __future__ import annotations

import torch

from cmrp.data.character import Character, CharacterSplit, Profile, Scene, Turn
from cmrp.data.tasks import Example, build_examples
from tests.parity._compare import assert_matches
from tests.parity.test_bagel_checkpoint import MODEL, official_adapter, reference, segment


def _roleplay_context() -> Example:
    """The context of the character's third reply (persona, two user/character turns, the query), built by
    cmrp's data layer from a character whose turns are the reference's texts."""
    _, meta = reference()
    persona, *turns = (item["text"] for item in meta["text"]["roleplay"]["inputs"])
    roles = ["user", "character"] * 3
    scene = Scene("s1", [Turn(r, t) for r, t in zip(roles, [*turns, "At dawn the rocks glow."], strict=True)])
    character = Character("Mira", Profile("A lighthouse keeper who paints storms."), CharacterSplit(scenes=[scene]))
    chat = build_examples(character, ["chat"])["chat"][-1]  # ..., user query, character reply (trained)
    context = Example("chat", chat.segments[:-1])
    assert [s.text for s in context.segments] == [persona, *turns]
    return context


def _decode(name: str, context: Example) -> None:
    tensors, meta = reference()
    adapter = official_adapter()
    logits: list[torch.Tensor] = []
    with torch.no_grad():
        ids = adapter._generate_ids(adapter._encode_prefix([context]), meta["text"][name]["max_new_tokens"],  # noqa: SLF001
                                    temperature=0.0, seed=0, logits_out=logits)
    official = tensors[f"text/{name}/generated"]
    assert official[0] == adapter.tokenizer.bos_id  # decoding starts from a bare bos
    assert_matches(MODEL, "KV-cached greedy decoding: token ids", torch.tensor(ids[0]), official[1:])
    steps = torch.cat(logits)
    assert_matches(MODEL, "text logits at each decoding step", steps, tensors[f"text/{name}/logits"][: len(steps)])


def test_roleplay_turn_prompt_is_the_official_one():
    """Persona and turns are plain `[bos] text [eos]` segments, no role headers; rope positions advance per token."""
    tensors, _ = reference()
    batch = official_adapter().collate([_roleplay_context()])
    assert_matches(MODEL, "role-play prompt: context token ids", batch.input_ids[0], tensors["text/roleplay/segment_ids"])
    assert_matches(MODEL, "role-play prompt: rope positions", batch.position_ids[0],
                   tensors["text/roleplay/segment_positions"])


def test_roleplay_turn_greedy_decoding_and_logits():
    _decode("roleplay", _roleplay_context())


def test_understanding_two_images_of_different_sizes():
    """Two understood images (32x32 and 16x32: ViT tokens packed per image) and a question, then decoding."""
    tensors, meta = reference()
    inputs = meta["text"]["understanding"]["inputs"]
    context = Example("vqa", [segment(item) for item in inputs])
    batch = official_adapter().collate([context])
    assert batch.is_vit.sum() == 16 + 8 and batch.vae_pixels is None  # text output: ViT tokens only
    text_ids = batch.input_ids[0][-len(tensors["text/understanding/segment_ids"]):]
    assert_matches(MODEL, "understanding prompt: question token ids", text_ids, tensors["text/understanding/segment_ids"])
    _decode("understanding", context)
