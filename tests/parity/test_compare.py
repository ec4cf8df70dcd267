"""The comparison helper itself: it must fail on a real difference and pass on float noise."""

import pytest
import torch

from tests.parity._compare import assert_matches, errors


@pytest.fixture(autouse=True)
def _not_recorded(monkeypatch):
    """The helper's own toy checks stay out of the parity table (docs/parity.md)."""
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


def test_table_script_finds_and_replaces_the_table_in_docs():
    """`python tests/parity/table.py --write` rewrites exactly the parity table of docs/parity.md."""
    from pathlib import Path

    from tests.parity.table import DOC, HEADER, replace_table

    doc = (Path(__file__).resolve().parents[2] / DOC).read_text(encoding="utf-8")
    lines = doc.split("\n")
    start = lines.index(HEADER)
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    assert end - start > 50  # the header, the rule and one row per check
    assert replace_table(doc, "\n".join(lines[start:end])) == doc
    new = replace_table(doc, f"{HEADER}\n| --- | --- | --- | --- |\n| toy | check | 1.00e-07 | 2.00e-07 |")
    assert new.count("\n") == doc.count("\n") - (end - start - 3)
    assert "| toy | check |" in new and "BAGEL | VAE decode" not in new
    assert new.split(HEADER)[0] == doc.split(HEADER)[0] and new.endswith(doc[doc.index("\n\nDeliberate departures"):])
