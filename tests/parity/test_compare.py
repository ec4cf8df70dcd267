"""The comparison helper itself: it must fail on a real difference and pass on float noise."""

import pytest
import torch

from tests.parity._compare import assert_matches, errors


@pytest.fixture(autouse=True)
def _not_recorded(monkeypatch):
    """The helper's own toy checks stay out of the README's parity table."""
    monkeypatch.delenv("CMRP_PARITY_RECORD", raising=False)


def test_float_noise_passes_and_real_difference_fails():
    ref = torch.randn(4, 8)
    assert_matches("toy", "noise", ref + 1e-7, ref)
    with pytest.raises(AssertionError, match="relative"):
        assert_matches("toy", "different", ref * 1.01, ref)


def test_integers_must_match_exactly():
    ids = torch.arange(10)
    assert_matches("toy", "ids", ids.clone(), ids)
    changed = ids.clone()
    changed[3] = 0
    with pytest.raises(AssertionError, match="1 of 10 values differ"):
        assert_matches("toy", "ids", changed, ids)


def test_errors_are_norm_relative_and_shapes_checked():
    abs_err, rel_err = errors(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert (abs_err, rel_err) == (1.0, 1.0)
    with pytest.raises(AssertionError, match="shape"):
        errors(torch.zeros(2), torch.zeros(3))
