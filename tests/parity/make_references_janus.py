"""Regenerate tests/fixtures/parity/janus/ from transformers' Janus classes, the reference implementation of
Janus-Pro (`JanusForConditionalGeneration`, `JanusProcessor`, its `generate`).

Usage, from the repository root, in this project's environment (no cmrp import):

    python tests/parity/make_references_janus.py --chat-template FILE [--out tests/fixtures/parity/janus]

FILE is Janus-Pro's chat template as transformers ships it: the `chat_template.jinja` of
`deepseek-community/Janus-Pro-1B` (in the Hugging Face cache after `hf download`), or the `CHAT_TEMPLATE`
string of transformers' `src/transformers/models/janus/convert_janus_weights_to_hf.py` written to a file.
`JANUS_CHAT_TEMPLATE` may name it instead.

The reference is run, never copied. Shims (none changes its maths):
- a `LogitsProcessor` passed to `generate(generation_mode="image")` records the generation head's scores
  at every step (conditional and unconditional rows, before guidance) and returns them unchanged; the
  guided log-probs are then computed with transformers' own `ClassifierFreeGuidanceLogitsProcessor`,
  `TemperatureLogitsWarper` and `TopKLogitsWarper`. `generate` is called with `top_k=0` (DeepSeek's
  sampler: the full distribution; transformers' default would add top-k 50) and once with top-k 8.
- weights: after the constructor every language-model, vision and head parameter is redrawn from a
  seeded generator at a larger scale than the 0.02 init (so logits vary), a property of the random
  checkpoint; the VQ-VAE keeps its own random init.
- the tokenizer is a byte-level BPE trained here, with Janus-Pro's special token names (begin/end of
  sentence, pad, image placeholder, begin/end of image) and a post-processor that prepends <bos> as
  Janus-Pro's tokenizer does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE_TOKENS = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}
CORPUS = ["You are Rex, a lighthouse keeper.", "<|User|>: hello there", "<|Assistant|>: hi, the sea is calm.",
          "what colour is it? it is red", "draw me on the beach, a red fox at dawn", "and the boats?"] * 4
PERSONA = "You are Rex, a lighthouse keeper."
SEED, GUIDANCE = 5, 2.0


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD, *IMAGE_TOKENS.values()]
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   extra_special_tokens=dict(IMAGE_TOKENS), padding_side="left")


def _model(tokenizer):
    from transformers import JanusConfig, JanusForConditionalGeneration

    text = {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
              "projection_dim": 64, "num_image_tokens": 16}
    vq = {"embed_dim": 8, "num_embeddings": 64, "latent_channels": 32, "base_channels": 32,
          "channel_multiplier": [1, 1, 1, 1], "num_res_blocks": 1, "projection_dim": 64, "image_token_embed_dim": 64,
          "num_patches": 4}
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, tie_word_embeddings=False,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["image_token"]))
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".vqmodel." in name:
                continue
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.08 * noise)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = (tokenizer.pad_token_id, tokenizer.bos_token_id,
                                                            tokenizer.eos_token_id)
    gen.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["boi_token"])}
    return model


def _messages(*turns):
    """[(role, [parts])] -> chat messages; a part is a string or the image marker None."""
    return [{"role": role, "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]}
            for role, parts in turns]


class _Record:
    """A LogitsProcessor that keeps each step's raw scores and changes nothing."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.detach().clone())
        return scores


def make(template: str, out: Path) -> None:
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import JanusImageProcessor, JanusProcessor
    from transformers.generation.logits_process import (
        ClassifierFreeGuidanceLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    tokenizer = _tokenizer()
    model = _model(tokenizer)
    processor = JanusProcessor(JanusImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                                   image_std=[0.5] * 3),
                               tokenizer, chat_template=template, num_image_tokens=16)
    ckpt = out / "checkpoint"
    model.save_pretrained(str(ckpt))
    processor.save_pretrained(str(ckpt))
    system = PERSONA + "\n\n"  # DeepSeek's system prompt: plain text before the turns (the processor's default one too)

    def prompt(turns, generation: bool = True) -> str:
        return system + processor.apply_chat_template(_messages(*turns), add_generation_prompt=generation)

    ref: dict[str, torch.Tensor] = {}
    texts: dict[str, str] = {}
    g = torch.Generator().manual_seed(3)
    pixels = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=32, mode="bilinear")
    pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    images = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    ref["pixels"] = pixels.float() / 255

    with torch.no_grad():
        # a role-play chat turn: prompt ids, logits, KV-cached greedy answer and its logits
        texts["chat_prompt"] = prompt([("user", ["hello there"]), ("assistant", ["hi, the sea is calm."]),
                                       ("user", ["and the boats?"])])
        inputs = processor(text=texts["chat_prompt"], return_tensors="pt")
        ref["chat_prompt_ids"] = inputs["input_ids"]
        ref["chat_prompt_logits"] = model(**inputs).logits
        out_text = model.generate(**inputs, max_new_tokens=8, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        ref["chat_generated"] = out_text.sequences[0, inputs["input_ids"].shape[1]:]
        ref["chat_generated_logits"] = torch.stack(out_text.logits, 1)[0]

        # understanding: an image in the user turn, the ViT features in place of the placeholders
        texts["und_prompt"] = prompt([("user", [None, "what colour is it?"])])
        inputs = processor(text=texts["und_prompt"], images=images[:1], return_tensors="pt")
        ref["und_prompt_ids"], ref["und_pixel_values"] = inputs["input_ids"], inputs["pixel_values"]
        ref["und_prompt_logits"] = model(**inputs).logits
        out_text = model.generate(**inputs, max_new_tokens=8, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        ref["und_generated"] = out_text.sequences[0, inputs["input_ids"].shape[1]:]
        ref["und_generated_logits"] = torch.stack(out_text.logits, 1)[0]

        # the text training loss: the answer and its end of sentence are the labels
        texts["train_full"] = prompt([("user", ["hello there"]), ("assistant", ["hi, the sea is calm."])], False)
        full = torch.cat([processor(text=texts["train_full"], return_tensors="pt")["input_ids"],
                          torch.tensor([[tokenizer.eos_token_id]])], 1)
        plen = processor(text=prompt([("user", ["hello there"])]), return_tensors="pt")["input_ids"].shape[1]
        labels = full.clone()
        labels[:, :plen] = -100
        ref["train_ids"], ref["train_labels"] = full, labels
        ref["train_loss"] = model(input_ids=full, labels=labels).loss.reshape(1)

        # image generation with CFG from one seed (generate's own loop), the raw scores of every step recorded
        texts["t2i_prompt_0"] = prompt([("user", ["draw me on the beach"])])
        texts["t2i_prompt_1"] = processor.apply_chat_template(_messages(("user", ["a red fox at dawn"])),
                                                              add_generation_prompt=True)
        inputs = processor(text=[texts["t2i_prompt_0"], texts["t2i_prompt_1"]], generation_mode="image",
                           padding=True, return_tensors="pt")
        ref["t2i_ids"], ref["t2i_mask"] = inputs["input_ids"], inputs["attention_mask"]
        for name, temperature, top_k in (("t2i", 1.0, 0), ("t2i_topk", 0.9, 8)):
            # top_k=0: DeepSeek's sampler draws from the full distribution (generate's default would be top-k 50)
            record = _Record()
            torch.manual_seed(SEED)
            tokens = model.generate(**inputs, generation_mode="image", do_sample=True, guidance_scale=GUIDANCE,
                                    temperature=temperature, top_k=top_k, logits_processor=[record])
            cfg = ClassifierFreeGuidanceLogitsProcessor(GUIDANCE)
            warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
            scores = []
            for raw in record.scores:
                s = cfg(inputs["input_ids"], raw)
                for warp in warpers:
                    s = warp(inputs["input_ids"], s)
                scores.append(s)
            ref[f"{name}_tokens"] = tokens
            ref[f"{name}_token_logprobs"] = torch.log_softmax(torch.stack(scores, 1), -1).gather(-1, tokens[..., None])[..., 0]
            if name == "t2i":
                ref["t2i_raw_scores"] = torch.stack(record.scores, 1)  # [2B, N, C]: conditional rows, then unconditional
                ref["t2i_images"] = ((model.decode_image_tokens(tokens) + 1) / 2).clamp(0, 1)

        # the VQ-VAE round trip
        codes = model.model.vqmodel.encode(ref["pixels"] * 2 - 1).image_tokens.reshape(2, -1)
        ref["vq_codes"] = codes
        ref["vq_decoded"] = ((model.decode_image_tokens(codes) + 1) / 2).clamp(0, 1)

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ref.items()}, str(out / "references.safetensors"))
    import transformers

    meta = {"reference": "transformers JanusForConditionalGeneration / JanusProcessor",
            "transformers_version": transformers.__version__, "persona": PERSONA, "seed": SEED,
            "guidance_scale": GUIDANCE, "prompts": texts}
    (out / "references.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({len(ref)} reference tensors, transformers {transformers.__version__})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chat-template", type=Path, default=os.environ.get("JANUS_CHAT_TEMPLATE"))
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "parity" / "janus")
    args = parser.parse_args()
    if not args.chat_template:
        parser.error("give Janus-Pro's chat template (--chat-template FILE or JANUS_CHAT_TEMPLATE)")
    make(Path(args.chat_template).read_text(), args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
