"""The backbone kit: one resolver of a card's `weights` for every adapter (never a download), one card
converter, one image loader."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cmrp.backbones.kit import plain, resolve_weights
from cmrp.errors import WeightsError


def _fake_cache(root, repo: str, files: dict[str, str]):
    """The Hugging Face cache layout `hf download` leaves: refs/main names a snapshot folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def test_a_local_folder_and_a_cached_hub_id_resolve(tmp_path, monkeypatch):
    import huggingface_hub.constants

    assert resolve_weights(str(tmp_path)) == tmp_path
    cache = tmp_path / "hub"
    snapshot = _fake_cache(cache, "owner/model", {"config.json": "{}"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_weights("owner/model") == snapshot


def test_a_shipped_base_resolves_and_an_unknown_one_names_the_shipped(tmp_path):
    assert (resolve_weights("sandbox://base") / "model.safetensors").is_file()
    with pytest.raises(WeightsError, match=r"card 'x', key 'weights': sandbox://nope is not a base shipped.*base"):
        resolve_weights("sandbox://nope", "card 'x', key 'weights'")


@pytest.mark.parametrize("adapter", ["bagel", "janus", "showo"])
def test_every_adapter_gives_the_same_advice_for_an_uncached_hub_id(adapter, tmp_path, monkeypatch):
    """Offline, an id not in the cache is one error with the command that fetches it, whatever the backbone."""
    import huggingface_hub.constants

    from cmrp.registry import BACKBONES

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError, match=r"owner/uncached is not in the local Hugging Face cache .*cmrp never "
                                           r"downloads weights itself\. Fetch them once with `hf download owner/uncached`"):
        BACKBONES.get(adapter).from_pretrained("owner/uncached")


def test_a_missing_path_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(WeightsError, match=r"weights: .*/no/such/folder does not exist; point it at a checkpoint"):
        resolve_weights(str(tmp_path / "no" / "such" / "folder"))
    file = tmp_path / "model.safetensors"
    file.write_text("x")
    with pytest.raises(WeightsError, match="is not a folder"):
        resolve_weights(str(file))


def test_plain_turns_card_sections_into_containers():
    section = OmegaConf.create({"llm": {"hidden_size": 8}, "sizes": [1, "${llm.hidden_size}"]})
    assert plain(section) == {"llm": {"hidden_size": 8}, "sizes": [1, 8]}
    assert plain({"a": 1}) == {"a": 1}
