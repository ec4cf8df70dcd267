"""Issue 20, item 2 for the final checkpoint: `cmrp eval`, `cmrp chat` and `init_from` load
<output_dir>/checkpoint through `load_checkpoint` and the chat loaders; a damaged weights file there is one
clear error naming the folder, not safetensors' or torch's traceback."""

from __future__ import annotations

import pytest

from cmrp.errors import WeightsError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from cmrp.backbones.bagel import BagelAdapter
    from cmrp.config import load_backbone_card

    ckpt = tmp_path_factory.mktemp("final") / "checkpoint"
    BagelAdapter.build(load_backbone_card("bagel-tiny"), corpus=["hello there", "a tiny corpus"]).save_pretrained(
        ckpt / "backbone")
    return ckpt


def _damage_header(file):
    data = bytearray(file.read_bytes())
    data[12:40] = b"\xff" * 28
    file.write_bytes(bytes(data))


def test_eval_and_init_from_loading_names_the_damaged_folder(saved, tmp_path):
    import shutil

    from cmrp.evaluation.runner import load_checkpoint

    ckpt = shutil.copytree(saved, tmp_path / "checkpoint")
    assert load_checkpoint(ckpt).model is not None  # intact: loads
    _damage_header(ckpt / "backbone" / "model.safetensors")
    with pytest.raises(WeightsError) as err:
        load_checkpoint(ckpt)
    message = str(err.value)
    assert message.startswith(f"{ckpt / 'backbone'}: a weights file there is damaged") and "SafetensorError" in message
    assert "\n" not in message


def test_chat_loading_names_the_damaged_folder(saved, tmp_path):
    import shutil

    from cmrp.chat.artefact import _load_backbone_folder

    folder = shutil.copytree(saved / "backbone", tmp_path / "backbone")
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])  # cut short
    with pytest.raises(WeightsError, match="a weights file there is damaged"):
        _load_backbone_folder(folder)
