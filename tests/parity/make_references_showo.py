"""Regenerate tests/fixtures/parity/showo/ by running the official Show-o code (showlab/Show-o) on a tiny
random checkpoint that the official classes build and save.

Usage, from the repository root, with the official code's own requirements (transformers 4.41.1,
diffusers 0.30.1, huggingface-hub 0.23.2, tokenizers 0.19.1, einops, jaxtyping, typeguard — e.g. in a
venv that sees this environment's torch):

    python tests/parity/make_references_showo.py /path/to/Show-o [--out tests/fixtures/parity/showo]
    python tests/parity/make_references_showo.py /path/to/Show-o --check-cmrp-save DIR

(`SHOWO_REPO` may name the checkout instead of the first argument; `SHOWO_COMMIT` records the commit
of a checkout that is not a git work tree.) The second form loads a folder
written by cmrp's `ShowoAdapter.save_pretrained` into the official `Showo` and MAGVIT-v2 classes with
`load_state_dict(strict=True)` and through `Showo.from_pretrained`, and fails on any missing or
unexpected key.

The official code runs only as a reference; nothing of it is copied. Shims (none changes its maths):
- `torchvision` is an empty stand-in module: `training/utils.py` imports it for `image_transform`, which
  this script does not call (it feeds tensors).
- MAGVIT-v2 at tiny size: the official `MAGVITv2` takes no sizes, so its `encoder` / `decoder` /
  `quantize` are replaced by the official `VQGANEncoder` / `VQGANDecoder` / `LFQuantizer` built at tiny
  sizes, and the sizes are written into vq/config.json (`register_to_config`; the official loader
  ignores keys it does not know) so that cmrp can rebuild the same module.
- the official 4-D masks (int64 filled with iinfo.min) are cast to float32 before the forward, as
  `training/train.py` does (`attention_mask.to(mask_dtype)`).
- `models.modeling_showo.mask_by_random_topk` is wrapped to record each MaskGIT step's mask length and
  choice temperature; the wrapper then calls the original.
- weights: after the official constructor, every parameter is redrawn from a seeded generator at a
  larger scale than Phi's 0.02 (so that logits vary and a wrong mask or guidance shows), and the
  language-model head's bias is lowered by 1 on the non-text ids (so greedy understanding answers in
  text ids, as a trained model does). Both are properties of the random checkpoint, not code changes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CORPUS = [
    "You are Rex, a lighthouse keeper. Stay in character.",
    "USER: hello there ASSISTANT: hi, the sea is calm tonight.",
    "USER: what is in the picture? ASSISTANT: a red boat on the sea.",
    "draw the lighthouse at dawn, a red fox on the rocks, waves and gulls.",
] * 4
LLM = {  # microsoft/phi-1_5's config.json flags at tiny sizes (qk_layernorm: false, as there)
    "model_type": "phi", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 512, "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
    "layer_norm_eps": 1e-5, "hidden_act": "gelu_new", "qk_layernorm": False, "resid_pdrop": 0.0,
    "embd_pdrop": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": False, "initializer_range": 0.02,
}
VQ = {"ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": [1, 1, 1], "z_channels": 6, "resolution": 32}
NUM_VQ = 64  # 32 px / 4 = 8 x 8 tokens
PERSONA = "You are Rex, a lighthouse keeper."
QUESTION = "what is in the picture?"
ANSWER = "a red boat on the sea."
T2I_CAPTION = "a red fox at dawn"
SEED_SAMPLE, SEED_LOSS, STEPS, GUIDANCE = 7, 11, 12, 2.0


def _import_official(repo: Path):
    sys.path.insert(0, str(repo))
    import models  # noqa: F401 - the official package
    import models.modeling_showo as modeling_showo
    from llava.llava import conversation as conversation_lib
    from models import MAGVITv2, Showo
    from models.modeling_magvitv2 import LFQuantizer, VQGANDecoder, VQGANEncoder
    from models.sampling import cosine_schedule
    from training import prompting_utils

    if "torchvision" not in sys.modules:  # shim (after transformers has looked for the real one): see the docstring
        sys.modules["torchvision"] = types.SimpleNamespace(transforms=types.SimpleNamespace())
    from training.utils import mask_or_random_replace_tokens

    return types.SimpleNamespace(
        Showo=Showo, MAGVITv2=MAGVITv2, VQGANEncoder=VQGANEncoder, VQGANDecoder=VQGANDecoder,
        LFQuantizer=LFQuantizer, cosine_schedule=cosine_schedule, modeling_showo=modeling_showo,
        prompting=prompting_utils, mask_tokens=mask_or_random_replace_tokens,
        conversation=conversation_lib.conv_templates["phi1.5"])


def _tokenizer(llm_dir: Path):
    """A byte-level BPE with Phi's one special token, saved as llm/tokenizer.json (Show-o's tokens are
    added by the official UniversalPrompting, never saved)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    llm_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(llm_dir / "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=str(llm_dir / "tokenizer.json"), bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def _conv(off, system: str, *messages):
    conv = off.conversation.copy()
    conv.system = system
    conv.messages = []
    for role, text in messages:
        conv.append_message(role, text)
    return conv.get_prompt().strip()


def _mask(off, ids, sp, **kw) -> torch.Tensor:
    return off.prompting.create_attention_mask_predict_next(
        ids, pad_id=int(sp["<|pad|>"]), soi_id=int(sp["<|soi|>"]), eoi_id=int(sp["<|eoi|>"]), **kw).to(torch.float32)


def make(repo: Path, out: Path) -> None:
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    off = _import_official(repo)
    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(ckpt / "llm")
    llm_vocab = len(tokenizer)
    vocab = llm_vocab + 10 + 2 ** VQ["z_channels"] + 1
    (ckpt / "llm" / "config.json").write_text(json.dumps({**LLM, "vocab_size": vocab}, indent=2))

    torch.manual_seed(0)
    cwd = Path.cwd()
    os.chdir(ckpt)  # llm_model_path "llm" is relative, as in a downloaded checkpoint folder
    try:
        model = off.Showo(w_clip_vit=False, vocab_size=vocab, llm_vocab_size=llm_vocab, llm_model_path="llm",
                          codebook_size=2 ** VQ["z_channels"], num_vq_tokens=NUM_VQ, num_new_special_tokens=10,
                          load_from_showo=True)
        _randomise(model, 1)
        with torch.no_grad():
            model.showo.lm_head.bias[llm_vocab:] -= 1.0
        model.eval()
        model.save_pretrained(str(ckpt))
        again = off.Showo.from_pretrained(str(ckpt)).eval()
    finally:
        os.chdir(cwd)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))

    vq = off.MAGVITv2()
    sizes = {k: VQ[k] for k in ("ch", "ch_mult", "num_res_blocks", "z_channels", "resolution")}
    vq.encoder = off.VQGANEncoder(**sizes)
    vq.decoder = off.VQGANDecoder(**sizes)
    vq.quantize = off.LFQuantizer(codebook_dim=VQ["z_channels"])
    vq.register_to_config(ch=VQ["ch"], encoder_ch_mult=VQ["ch_mult"], encoder_num_res_blocks=VQ["num_res_blocks"],
                          decoder_ch_mult=VQ["ch_mult"], decoder_num_res_blocks=VQ["num_res_blocks"],
                          z_channels=VQ["z_channels"], norm_groups=32)
    vq.eval().save_pretrained(str(ckpt / "vq"))

    config = OmegaConf.create({
        "model": {"showo": {"num_vq_tokens": NUM_VQ, "num_new_special_tokens": 10, "llm_vocab_size": llm_vocab,
                            "codebook_size": 2 ** VQ["z_channels"]}},
        "training": {"min_masking_rate": 0.0, "noise_type": "mask", "predict_all_tokens": False},
        "dataset": {"preprocessing": {"max_seq_length": 0}},
    })
    conversation = {  # role-play turns in the official LLaVA "phi1.5" conversation (USER / ASSISTANT)
        "chat": _conv(off, PERSONA, ("USER", "hello there"), ("ASSISTANT", "hi, the sea is calm tonight.")),
        "mmu_prompt": _conv(off, PERSONA, ("USER", "\n" + QUESTION), ("ASSISTANT", None)),
        "mmu_answer": _conv(off, PERSONA, ("USER", "\n" + QUESTION), ("ASSISTANT", ANSWER)),
        "t2i_chain": _conv(off, PERSONA, ("USER", "draw the lighthouse"),
                           ("ASSISTANT", "here it is, at dawn.")).removesuffix("<|endoftext|>"),
    }
    assert _conv(off, "", ("USER", "\n" + QUESTION), ("ASSISTANT", None)) == "USER: \n" + QUESTION + " ASSISTANT:"
    t2i_texts = [conversation["t2i_chain"], T2I_CAPTION]
    lengths = [len(tokenizer(t)["input_ids"]) + 2 for t in t2i_texts]
    max_seq = max(lengths) + 3  # the official prompts are left-padded to max_seq_length + 1
    config.dataset.preprocessing.max_seq_length = max_seq
    uni = off.prompting.UniversalPrompting(tokenizer, max_text_len=max_seq, ignore_id=-100, cond_dropout_prob=0.0,
                                           special_tokens=("<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>",
                                                           "<|mmu|>", "<|t2v|>", "<|v2v|>", "<|lvg|>"))
    sp = uni.sptids_dict
    offset, mask_id = len(uni.text_tokenizer), model.config.mask_token_id
    assert offset == llm_vocab + 10 and mask_id == vocab - 1
    ref: dict[str, torch.Tensor] = {}

    # MAGVIT-v2: codes and decoded images
    g = torch.Generator().manual_seed(3)
    pixels = torch.nn.functional.interpolate(torch.rand(3, 3, 8, 8, generator=g), size=32, mode="bilinear")
    pixels = pixels.clamp(0, 1).contiguous()
    with torch.no_grad():
        codes = vq.get_code(pixels * 2 - 1)
        ref["pixels"], ref["vq_codes"] = pixels, codes
        ref["vq_decoded"] = torch.clamp((vq.decode_code(codes) + 1.0) / 2.0, min=0.0, max=1.0)

    with torch.no_grad():
        # text: a role-play chat turn, <|sot|> + the conversation (the LLaVA prompt as the official code tokenises it)
        ids = torch.tensor([[int(sp["<|sot|>"])] + tokenizer(conversation["chat"])["input_ids"]])
        ref["chat_ids"] = ids
        ref["chat_logits"] = model(ids, attention_mask=_mask(off, ids, sp))

        # understanding: <|mmu|> <|soi|> image <|eoi|> <|sot|> prompt, the official understanding mask
        def mmu_ids(text: str) -> torch.Tensor:
            head = [int(sp["<|mmu|>"]), int(sp["<|soi|>"]), *(codes[0] + offset).tolist(), int(sp["<|eoi|>"]),
                    int(sp["<|sot|>"])]
            return torch.tensor([head + tokenizer(text)["input_ids"]])

        ids = mmu_ids(conversation["mmu_answer"])
        ref["mmu_answer_ids"] = ids
        ref["mmu_answer_logits"] = model(ids, attention_mask=off.prompting.create_attention_mask_for_mmu(
            ids, eoi_id=int(sp["<|eoi|>"])).to(torch.float32))
        ids = mmu_ids(conversation["mmu_prompt"])
        ref["mmu_prompt_ids"] = ids
        mmu_mask = off.prompting.create_attention_mask_for_mmu(ids, eoi_id=int(sp["<|eoi|>"])).to(torch.float32)
        answer = model.mmu_generate(ids, attention_mask=mmu_mask, max_new_tokens=8, top_k=1,
                                    eot_token=int(sp["<|eot|>"]))
        full = torch.cat([ids, torch.stack(answer).view(1, -1)], dim=1)
        ref["mmu_generated"] = full[0, ids.shape[1]:]
        ref["mmu_generated_logits"] = model(full, attention_mask=off.prompting.create_attention_mask_for_mmu(
            full, eoi_id=int(sp["<|eoi|>"])).to(torch.float32))[0, ids.shape[1] - 1: -1]

        # image-token logits under the official t2i mask, conditional and unconditional rows (CFG)
        partial = torch.full((2, NUM_VQ), mask_id)
        partial[:, ::3] = codes[1:3, ::3] + offset
        cond, _ = uni((list(t2i_texts), partial), "t2i_gen")
        uncond, _ = uni(([""] * 2, partial), "t2i_gen")
        both = torch.cat([cond, uncond])
        logits = model(both, attention_mask=_mask(off, both, sp, rm_pad_in_image=True))
        logits = logits[:, -(NUM_VQ + 1):-1, offset:-1]
        ref["t2i_ids"], ref["t2i_uncond_ids"], ref["t2i_partial"] = cond, uncond, partial
        ref["t2i_cond_logits"], ref["t2i_uncond_logits"] = logits[:2], logits[2:]
        ref["t2i_guided_logits"] = (1 + GUIDANCE) * logits[:2] - GUIDANCE * logits[2:]

    # the full MaskGIT loop with CFG from one seed (the step's mask length and temperature recorded)
    record: list[tuple[int, float]] = []
    original = off.modeling_showo.mask_by_random_topk

    def recording(mask_len, probs, temperature=1.0, generator=None):
        record.append((int(mask_len.reshape(-1)[0]), float(temperature)))
        return original(mask_len, probs, temperature, generator=generator)

    off.modeling_showo.mask_by_random_topk = recording
    try:
        blank = torch.full((2, NUM_VQ), mask_id)
        cond, _ = uni((list(t2i_texts), blank), "t2i_gen")
        uncond, _ = uni(([""] * 2, blank), "t2i_gen")
        mask = _mask(off, torch.cat([cond, uncond]), sp, rm_pad_in_image=True)
        with torch.no_grad():
            sampled = model.t2i_generate(input_ids=cond.clone(), uncond_input_ids=uncond, attention_mask=mask,
                                         guidance_scale=GUIDANCE, temperature=1.0, timesteps=STEPS,
                                         noise_schedule=off.cosine_schedule, config=config,
                                         generator=torch.Generator().manual_seed(SEED_SAMPLE))
            ref["maskgit_tokens"] = sampled
            ref["maskgit_images"] = torch.clamp((vq.decode_code(sampled) + 1.0) / 2.0, min=0.0, max=1.0)
    finally:
        off.modeling_showo.mask_by_random_topk = original
    ref["maskgit_mask_len"] = torch.tensor([m for m, _ in record])
    ref["maskgit_choice_temperature"] = torch.tensor([t for _, t in record], dtype=torch.float64)

    # the t2i training loss: masks drawn by the official code from one seed, loss at the official positions
    torch.manual_seed(SEED_LOSS)
    with torch.no_grad():
        image_tokens = vq.get_code(pixels[1:3] * 2 - 1) + offset
        masked, labels, _, mask_prob = off.mask_tokens(image_tokens, mask_id, config,
                                                       mask_schedule=off.cosine_schedule, is_train=True)
        ids, _, labels = uni((list(t2i_texts), masked, labels), "t2i")
        _, loss_t2i, _, _ = model(input_ids=ids, attention_mask=_mask(off, ids, sp, rm_pad_in_image=True),
                                  labels=labels, batch_size_t2i=2, batch_size_lm=0, batch_size_mmu=0,
                                  max_seq_length=max_seq)
    ref["loss_ids"], ref["loss_labels"], ref["loss_t2i"] = ids, labels, loss_t2i.reshape(1)

    save_file({k: v.contiguous() for k, v in ref.items()}, str(out / "references.safetensors"))
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    commit = commit.strip() or os.environ.get("SHOWO_COMMIT", "")  # an exported (non-git) checkout: say which
    meta = {"official_repository": "showlab/Show-o", "official_commit": commit or None,
            "llm_vocab_size": llm_vocab, "max_seq_length": max_seq, "persona": PERSONA, "question": QUESTION,
            "answer": ANSWER, "t2i_caption": T2I_CAPTION, "conversation": conversation,
            "seed_sample": SEED_SAMPLE, "seed_loss": SEED_LOSS, "steps": STEPS, "guidance_scale": GUIDANCE,
            "vq": VQ, "num_vq_tokens": NUM_VQ}
    (out / "references.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out} ({len(ref)} reference tensors; official commit {meta['official_commit']})")


def check_cmrp_save(repo: Path, folder: Path) -> None:
    """A cmrp-saved Show-o folder loads strictly into the official classes."""
    from safetensors.torch import load_file

    off = _import_official(repo)
    folder = folder.resolve()
    config = json.loads((folder / "config.json").read_text())
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        model = off.Showo(**{k: config[k] for k in ("w_clip_vit", "vocab_size", "llm_vocab_size", "llm_model_path",
                                                  "codebook_size", "num_vq_tokens")}, load_from_showo=True)
        model.load_state_dict(load_file(str(folder / "pytorch_model.safetensors")), strict=True)
        loaded, info = off.Showo.from_pretrained(str(folder), low_cpu_mem_usage=False, output_loading_info=True)
    finally:
        os.chdir(cwd)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems
    vq_config = json.loads((folder / "vq" / "config.json").read_text())
    vq = off.MAGVITv2()
    sizes = {"ch": vq_config["ch"], "ch_mult": vq_config["encoder_ch_mult"],
             "num_res_blocks": vq_config["encoder_num_res_blocks"], "z_channels": vq_config["z_channels"]}
    vq.encoder = off.VQGANEncoder(**sizes)
    vq.decoder = off.VQGANDecoder(**{**sizes, "ch_mult": vq_config["decoder_ch_mult"],
                                     "num_res_blocks": vq_config["decoder_num_res_blocks"]})
    vq.quantize = off.LFQuantizer(codebook_dim=vq_config["z_channels"])
    vq.load_state_dict(load_file(str(folder / "vq" / "pytorch_model.safetensors")), strict=True)
    print(f"{folder}: loads strictly into the official Showo and MAGVITv2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", nargs="?", default=os.environ.get("SHOWO_REPO"), help="official Show-o checkout")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "parity" / "showo")
    parser.add_argument("--check-cmrp-save", type=Path, default=None, help="a folder saved by cmrp to load officially")
    args = parser.parse_args()
    if not args.repo:
        parser.error("give the official Show-o checkout (argument or SHOWO_REPO)")
    repo = Path(args.repo).resolve()
    if args.check_cmrp_save:
        check_cmrp_save(repo, args.check_cmrp_save)
    else:
        make(repo, args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
