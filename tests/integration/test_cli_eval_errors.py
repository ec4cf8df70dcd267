"""`cmrp eval` refuses bad input with one clear message (exit 2, no traceback); no model is built."""

from __future__ import annotations

from tests.integration.test_cli_eval import run_cli


def test_eval_bad_inputs_fail_with_one_message(tmp_path):
    (tmp_path / "run" / "checkpoint" / "backbone").mkdir(parents=True)
    proc = run_cli("eval", str(tmp_path / "missing"), "--features", "pixel")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("eval", str(tmp_path), "--features", "pixel")
    assert proc.returncode == 2 and "no cmrp checkpoint" in proc.stderr
    proc = run_cli("eval", str(tmp_path / "run"), "--judge-url", "http://127.0.0.1:1/v1")
    assert proc.returncode == 2 and "--judge-model" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("eval", str(tmp_path / "run"), "--features", "pixel")
    assert proc.returncode == 2 and "recipe.yaml" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("eval", str(tmp_path / "run"), "--samples", "0")
    assert proc.returncode == 2 and "--samples must be at least 1" in proc.stderr
