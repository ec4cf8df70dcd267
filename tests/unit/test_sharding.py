"""The parts of cmrp.training.sharding and fit's distributed summary that run without a process group
(the sharded paths run in tests/integration/test_fsdp.py, 2 processes)."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from cmrp.training.fit import _distributed_summary
from cmrp.training.sharding import gathered, rank_digests, whole, whole_parameters


def test_rank_digests_follow_the_named_weights_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    names = ["0.weight", "0.bias"]
    first = rank_digests(model, names)
    assert len(first) == 1 and len(first[0]) == 64
    with torch.no_grad():
        model[1].weight.add_(1.0)  # not one of `names`
    assert rank_digests(model, names) == first
    with torch.no_grad():
        model[0].bias.add_(1e-6)
    assert rank_digests(model, names) != first


def test_unsharded_models_pass_through():
    model = torch.nn.Linear(2, 2)
    before = model.weight
    with whole_parameters(model), gathered(model):
        assert model.weight is before and not torch.is_grad_enabled()
    tree = {"a": [torch.ones(2), 3], "b": (torch.zeros(1),)}
    assert whole(tree)["a"][0] is tree["a"][0] and whole(tree)["b"][0] is tree["b"][0]


def test_distributed_summary_warns_when_ranks_disagree(capsys):
    cfg = OmegaConf.create({"trainer": {"num_nodes": 2, "strategy": "fsdp"}})
    agree = _distributed_summary(cfg, ["ab", "ab"], main=True)
    assert agree == {"world_size": 2, "num_nodes": 2, "strategy": "fsdp", "weights_sha256": ["ab", "ab"],
                     "ranks_agree": True}
    assert capsys.readouterr().out == ""
    assert not _distributed_summary(cfg, ["ab", "cd"], main=True)["ranks_agree"]
    assert "ranks ended with different weights" in capsys.readouterr().out
    _distributed_summary(cfg, ["ab", "cd"], main=False)
    assert capsys.readouterr().out == ""
