"""`cmrp sweep` without running cells: the sweep file, the plan (rows, overrides, dependencies, eval options,
fingerprints, status), the statistics of the table and the claims."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from cmrp.errors import ConfigError
from cmrp.sweeps.plan import RECORD, cell_status, make_plan
from cmrp.sweeps.spec import load_sweep, render_value
from cmrp.sweeps.table import markdown, stats, summarize

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "recipes" / "sandbox" / "sft.yaml"


def sweep_file(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"recipe: {SFT}\n" + text)
    return path


BASIC = """\
name: t
seeds: [0, 1]
overrides: {trainer.max_steps: 3}
axes:
  variant:
    a: {label: A}
    b: {sft.optimizer.lr: 0.001, evaluate: {steps: 3}}
    g: {init_from_cell: a, stages: [grpo], rewards: sandbox, rewards.terms.clip_similarity.weight: 0}
  lr: [{sft.ce_weight: 0.5}, {sft.ce_weight: 1.0}]
baseline: a,ce_weight=0.5
evaluate: {features: sandbox, baseline: none, samples: 2}
metrics: {identity: "eval:t2i.identity_fidelity", loss: {from: "fit:loss_last", better: lower}}
claims:
  - {name: c, row: "b,ce_weight=0.5", against: "a,ce_weight=0.5", holds: [identity >= -0.05, loss < 0]}
"""


@pytest.mark.parametrize("value", ["sft", ["grpo"], {"mode": "lora", "r": 32}, 0.003, 1e-5, 7, True, None, "a b",
                                   "x: y", "true", "1e-3", "", "[x]", [1, "a,b"], 'say "hi"', float("inf")])
def test_override_values_read_back_unchanged(value):
    from cmrp.config.yamlio import parse_value

    assert parse_value(render_value(value, "test"), "test") == value


def test_rows_are_the_product_of_the_axes_and_cells_carry_every_override(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, BASIC))
    plan = make_plan(sweep, tmp_path / "out", overrides=["data.batch_size=4"])
    assert list(plan.rows) == ["a,ce_weight=0.5", "a,ce_weight=1.0", "b,ce_weight=0.5", "b,ce_weight=1.0",
                               "g,ce_weight=0.5", "g,ce_weight=1.0"]
    assert plan.rows["a,ce_weight=0.5"] == "A · ce_weight=0.5"
    assert len(plan.cells) == 12 and {c.seed for c in plan.cells} == {0, 1}
    cell = next(c for c in plan.cells if c.name == "b,ce_weight=1.0/seed1")
    # the sweep's overrides, the row's, the command line's, then what the sweep sets itself
    args = cell.fit_args(plan.tracking_uri, plan.experiment)
    assert args[0] == str(SFT)
    assert args[1:5] == ["trainer.max_steps=3", "sft.optimizer.lr=0.001", "sft.ce_weight=1.0", "data.batch_size=4"]
    out = (tmp_path / "out").resolve()
    assert f"output_dir={out / 'b,ce_weight=1.0' / 'seed1'}" in args and "seed=1" in args
    assert f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}" in args and "tracking.experiment=t" in args
    assert cell.eval_args == (str(cell.dir), "--features", "sandbox", "--baseline", "none", "--samples", "2",
                              "--steps", "3")
    assert all(c.status == "new" for c in plan.cells)


def test_init_from_cell_is_the_same_seed_and_the_same_other_axes(tmp_path):
    plan = make_plan(load_sweep(sweep_file(tmp_path, BASIC)), tmp_path / "out")
    g = next(c for c in plan.cells if c.name == "g,ce_weight=1.0/seed1")
    assert g.depends.name == "a,ce_weight=1.0/seed1"
    assert f"init_from={g.depends.dir}" in g.fit_args(plan.tracking_uri, plan.experiment)
    assert "rewards.terms.clip_similarity.weight=0" in g.overrides
    waves = plan.waves(plan.cells)
    assert [len(w) for w in waves] == [8, 4] and all(c.row.startswith("g,") for c in waves[1])
    # asking for one row brings the row it starts from
    only = make_plan(load_sweep(sweep_file(tmp_path, BASIC)), tmp_path / "out", rows=["g,ce_weight=0.5"], seeds=[1])
    assert [c.name for c in only.cells] == ["a,ce_weight=0.5/seed1", "g,ce_weight=0.5/seed1"]


def test_the_fingerprint_is_the_one_cmrp_fit_computes(tmp_path):
    from omegaconf import OmegaConf

    from cmrp.config import Redactor, load_recipe
    from cmrp.training.checkpointing import recipe_fingerprint

    plan = make_plan(load_sweep(sweep_file(tmp_path, BASIC)), tmp_path / "out", seeds=[0])
    cell = plan.cells[0]
    cfg = load_recipe(cell.recipe, cell.fit_args(plan.tracking_uri, plan.experiment)[1:])
    resolved = Redactor.from_environ().mapping(OmegaConf.to_container(cfg, resolve=True))
    assert cell.recipe_fingerprint == recipe_fingerprint(resolved)[0]
    other = next(c for c in plan.cells if c.row == "b,ce_weight=0.5")
    assert other.recipe_fingerprint != cell.recipe_fingerprint


def _write_record(cell, **changes):
    record = {"recipe_fingerprint": cell.recipe_fingerprint,
              "source_fingerprint": cell.depends.fingerprint if cell.depends else None,
              "fingerprint": cell.fingerprint, "state": "done", **changes}
    cell.dir.mkdir(parents=True, exist_ok=True)
    (cell.dir / RECORD).write_text(json.dumps(record))


def test_status_done_resume_changed(tmp_path):
    path = sweep_file(tmp_path, BASIC)
    plan = make_plan(load_sweep(path), tmp_path / "out", seeds=[0])
    a = next(c for c in plan.cells if c.name == "a,ce_weight=0.5/seed0")
    g = next(c for c in plan.cells if c.name == "g,ce_weight=0.5/seed0")
    assert cell_status(a) == "new"
    _write_record(a, state="started")
    assert cell_status(a) == "resume"
    _write_record(a)
    assert cell_status(a) == "resume"  # done only with its eval.json
    (a.dir / "eval").mkdir()
    (a.dir / "eval" / "eval.json").write_text("{}")
    assert cell_status(a) == "done"
    _write_record(a, fingerprint="other-eval-options")
    assert cell_status(a) == "resume"  # same training, other eval options: evaluated again
    _write_record(a, recipe_fingerprint="0123456789abcdef")
    assert cell_status(a) == "changed"
    _write_record(a)
    (a.dir / "metrics.json").write_text(json.dumps({"mlflow": {"fingerprint": "fedcba9876543210"}}))
    assert cell_status(a) == "changed"  # a run of another recipe left in the folder
    (a.dir / "metrics.json").unlink()
    # a cell started from a cell that has changed since is changed too
    _write_record(g, source_fingerprint="not-the-current-one")
    assert cell_status(g) == "changed"
    plan = make_plan(load_sweep(path), tmp_path / "out", seeds=[0])
    statuses = {c.name: c.status for c in plan.cells}
    assert statuses["a,ce_weight=0.5/seed0"] == "done" and statuses["g,ce_weight=0.5/seed0"] == "changed"


@pytest.mark.parametrize(("text", "needles"), [
    ("seeds: [0]\nmetrics: {x: 'eval:t2i.clip_t'}\nbaslines: a\n", ["s.yaml:4", "'baslines'", "'baseline'"]),
    ("seeds: [0, 0]\nmetrics: {x: 'eval:t2i.clip_t'}\n", ["'seeds'", "distinct integers"]),
    ("seeds: [0]\nmetrics: {x: 'eval:t2i.clip_t'}\noverrides: {seed: 3}\n", ["'overrides.seed'", "seeds:"]),
    ("seeds: [0]\nmetrics: {x: 'eval:t2i.clip_t'}\noverrides: {tracking.experiment: e}\n", ["tracking", "sweep's `tracking:`"]),
    ("seeds: [0]\nmetrics: {x: 'eval:t2i.clip_t'}\naxes: {v: {a: {output_dir: x}}}\n", ["'axes.v.a.output_dir'"]),
    ("seeds: [0]\nmetrics: {x: 'eval:t2i.clip_t'}\naxes: {v: {a: {}, b: {init_from_cell: c}}}\n",
     ["'axes.v.b.init_from_cell'", "'c' is not a variant"]),
    ("seeds: [0]\nmetrics: {x: 't2i.clip_t'}\n", ["'metrics.x'", "eval:<task>.<metric>"]),
    ("seeds: [0]\n", ["'metrics'", "name the table's columns"]),
    ("seeds: [0]\nmetrics: {x: 'eval:t2i.clip_t'}\nclaims: [{name: c, row: r, holds: [y > 0]}]\n",
     ["claims", "'y' is not a column"]),
    ("seeds: [0]\nmetrics: {x: 'eval:t2i.clip_t'}\nclaims: [{name: c, row: r, holds: [x = 0]}]\n",
     ["column op value"]),
])
def test_sweep_file_errors_name_file_line_and_key(tmp_path, text, needles):
    with pytest.raises(ConfigError) as err:
        load_sweep(sweep_file(tmp_path, text))
    message = str(err.value)
    assert "s.yaml" in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(("text", "needles"), [
    ("evaluate: {sample: 2}\n", ["has no option 'sample'", "'samples'"]),
    ("evaluate: {features: clip}\n", ["'evaluate'", "invalid choice: 'clip'"]),
    ("evaluate: {out: x}\n", ["evaluate.out", "<cell>/eval"]),
    ("axes: {v: {a: {trainer.max_step: 2}}}\n", ["cell a/seed0", "trainer.max_step", "max_steps"]),
    ("baseline: nope\naxes: {v: {a: {}}}\n", ["'nope'", "is not a row"]),
])
def test_plan_errors_name_the_cell_or_option(tmp_path, text, needles):
    sweep = load_sweep(sweep_file(tmp_path, "seeds: [0]\nmetrics: {x: 'eval:t2i.clip_t'}\n" + text))
    with pytest.raises(ConfigError) as err:
        make_plan(sweep, tmp_path / "out")
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_shipped_sandbox_sweep_plans_every_row_on_three_seeds(tmp_path):
    from cmrp.sweeps.spec import find_sweep

    assert find_sweep("sandbox") == ROOT / "recipes" / "sweeps" / "sandbox.yaml"
    plan = make_plan(load_sweep("sandbox"), tmp_path / "out")
    assert list(plan.rows) == ["sft_only", "sft_grpo", "no_vqa", "no_clip", "no_diversity", "no_penalty", "lora",
                               "joint", "think"]
    assert len(plan.cells) == 27 and {c.seed for c in plan.cells} == {0, 1, 2}
    grpo_rows = {"sft_grpo", "no_vqa", "no_clip", "no_diversity", "no_penalty"}
    for cell in plan.cells:
        assert (cell.depends is not None) == (cell.row in grpo_rows)
        if cell.depends is not None:
            assert cell.depends.row == "sft_only" and cell.depends.seed == cell.seed
    terms = {c.row: o for c in plan.cells for o in c.overrides if o.startswith("rewards.terms.")}
    assert terms == {"no_vqa": "rewards.terms.vqa_consistency.weight=0",
                     "no_clip": "rewards.terms.clip_similarity.weight=0",
                     "no_diversity": "rewards.terms.lpips_diversity.weight=0",
                     "no_penalty": "rewards.terms.trainset_penalty.weight=0"}


# -- the table -------------------------------------------------------------------------------------------
def test_stats_mean_sample_std_and_t_interval():
    s = stats([0.5, 0.7, 0.9, math.nan])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.7)
    assert s["std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]))
    half = 4.303 * s["std"] / math.sqrt(3)  # Student t, 2 degrees of freedom
    assert (s["low"], s["high"]) == (pytest.approx(0.7 - half), pytest.approx(0.7 + half))
    assert stats([1.0])["std"] is None and stats([])["n"] == 0


def test_summary_deltas_are_paired_by_seed_and_claims_are_checked_per_seed(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, BASIC))
    rows = {"a,ce_weight=0.5": "A", "b,ce_weight=0.5": "b"}
    values = {("a,ce_weight=0.5", 0): (0.50, 2.0), ("a,ce_weight=0.5", 1): (0.60, 2.2), ("a,ce_weight=0.5", 2): (0.4, 1.0),
              ("b,ce_weight=0.5", 0): (0.52, 1.5), ("b,ce_weight=0.5", 1): (0.50, 2.4)}
    cells = [{"row": r, "seed": s, "values": {"identity": i, "loss": loss}} for (r, s), (i, loss) in values.items()]
    summary = summarize(sweep, rows, cells)
    a, b = summary["rows"]["a,ce_weight=0.5"], summary["rows"]["b,ce_weight=0.5"]
    assert a["stats"]["identity"]["n"] == 3 and "delta" not in a
    delta = b["delta"]["identity"]
    assert delta["n"] == 2 and delta["per_seed"] == {"0": pytest.approx(0.02), "1": pytest.approx(-0.10)}
    assert delta["mean"] == pytest.approx(-0.04) and delta["std"] == pytest.approx(statistics.stdev([0.02, -0.10]))
    [claim] = summary["claims"]
    assert [s["holds"] for s in claim["per_seed"]] == [True, False]  # seed 1: identity -0.10 < -0.05
    assert claim["holds_on_every_seed"] is False and claim["seeds_holding"] == 1
    assert summary["metrics"]["loss"]["better"] == "lower" and summary["metrics"]["identity"]["better"] == "higher"
    text = markdown(summary)
    assert "| A | 3 | 0.500 ± 0.100 [0.252, 0.748]" in text
    assert "claim holds on every seed: False (1/2 seeds)" in text and "| 1 | -0.100 | +0.200 | no |" in text


def test_a_claim_on_a_missing_number_is_not_measured(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, BASIC))
    cells = [{"row": r, "seed": 0, "values": {"identity": math.nan, "loss": 1.0}}
             for r in ("a,ce_weight=0.5", "b,ce_weight=0.5")]
    summary = summarize(sweep, {"a,ce_weight=0.5": "A", "b,ce_weight=0.5": "b"}, cells)
    assert summary["claims"][0]["holds_on_every_seed"] is None
    assert "claim not measured" in markdown(summary)


def test_a_claim_on_a_row_not_run_has_no_table(tmp_path):
    """A sweep run with --rows that leaves out a row a claim compares: the verdict alone, no broken table."""
    sweep = load_sweep(sweep_file(tmp_path, BASIC))
    cells = [{"row": "a,ce_weight=0.5", "seed": 0, "values": {"identity": 0.8, "loss": 1.0}}]
    summary = summarize(sweep, {"a,ce_weight=0.5": "A", "b,ce_weight=0.5": "b"}, cells)
    assert summary["claims"][0]["per_seed"] == []
    text = markdown(summary)
    assert "claim not measured" in text and "| seed |" not in text


def test_threads_per_process_fit_the_cores(monkeypatch):
    from cmrp.sweeps import launchers

    monkeypatch.setattr(launchers, "available_cores", lambda: 16)
    assert launchers.threads_per_process(1, {}) == 16
    assert launchers.threads_per_process(3, {}) == 5
    assert launchers.threads_per_process(32, {}) == 1
    assert launchers.threads_per_process(2, {"OMP_NUM_THREADS": "4"}) == 4  # the user's cap


def test_command_line_overrides_cannot_set_what_the_sweep_sets(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, BASIC))
    with pytest.raises(ConfigError, match="command-line override 'output_dir=x'.*every cell"):
        make_plan(sweep, tmp_path / "out", overrides=["output_dir=x"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        make_plan(sweep, tmp_path / "out", overrides=["trainer.max_steps"])
