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

    from cmrp.backbones.loading import load_checkpoint

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


def test_same_size_damage_is_caught_by_the_folder_manifest(saved, tmp_path):
    """Bytes flipped in the middle of the weights keep the file's size and a valid header: only the sha256
    recorded when the checkpoint was finished tells."""
    import shutil

    from cmrp.backbones.loading import load_checkpoint
    from cmrp.checkpoint import FOLDER_MANIFEST, folder_damage, write_folder_manifest
    from tests.faults._helpers import flip_bytes

    ckpt = shutil.copytree(saved, tmp_path / "checkpoint")
    write_folder_manifest(ckpt, ("backbone", "adapter", "recipe.yaml"))
    assert folder_damage(ckpt) is None and load_checkpoint(ckpt).model is not None
    weights = ckpt / "backbone" / "model.safetensors"
    size = weights.stat().st_size
    flip_bytes(weights)
    assert weights.stat().st_size == size
    with pytest.raises(WeightsError, match=rf"{weights}: its content does not match the sha256 in {FOLDER_MANIFEST}"):
        load_checkpoint(ckpt)
    (ckpt / FOLDER_MANIFEST).unlink()  # a checkpoint written before the manifest existed still loads
    assert folder_damage(ckpt) is None


@pytest.mark.slow  # a real fit and eval: ~1 CPU-minute
def test_fit_records_its_checkpoint_and_eval_refuses_a_changed_one(tmp_path):
    import json

    from tests.faults._helpers import TINY, assert_one_line_error, flip_bytes, run_cli

    out = tmp_path / "run"
    fit = run_cli("fit", *TINY, f"output_dir={out}", "trainer.max_steps=2")
    assert fit.returncode == 0, fit.stderr[-3000:]
    files = json.loads((out / "checkpoint" / "files.json").read_text())["files"]
    assert "recipe.yaml" in files and "backbone/model.safetensors" in files
    flip_bytes(out / "checkpoint" / "backbone" / "model.safetensors")
    ev = run_cli("eval", str(out), "--max-items", "2")
    assert_one_line_error(ev.returncode, ev.stderr, "eval", "does not match the sha256", "re-run `cmrp fit`")
