"""Issue 20, item 7 (config half): a rejected override or any config error never shows the value of a
secret-named key (api_key, token, password, ...) on stdout or stderr, and nothing is written for it."""

from __future__ import annotations

import pytest

from tests.faults._helpers import TINY, main

SECRET = "sk-live-4f9a1c77e2b0d3"


@pytest.fixture(autouse=True)
def forget_secrets(monkeypatch):
    """Each test starts as a fresh process would: no secret value remembered from an earlier test."""
    from cmrp.config import params

    monkeypatch.setattr(params, "_REMEMBERED", set())


@pytest.mark.parametrize("override", [
    f"rewards.api_key={SECRET}",  # an unknown key
    f"data.tasks.token={SECRET}",  # a known dict of numbers: a wrong type
    f"rewards.terms.sandbox_clip.kwargs.api_key={SECRET}",  # an unknown reward kwarg
    f"grpo.optimizer={{api_key: {SECRET}}}",  # a secret inside a YAML value
    f"grpo.optimizer={{password: [{SECRET}",  # ... that does not even parse
    f"data.tasks={{hf_token: {SECRET}}}",
])
def test_a_rejected_override_hides_the_secret(tmp_path, capsys, override):
    out = tmp_path / "run"
    for command in ("validate", "fit"):
        rc, stdout, stderr = main(capsys, command, "quickstart", *TINY[1:], override, f"output_dir={out}")
        assert rc == 2 and "error:" in stderr
        assert SECRET not in stdout + stderr, stderr
        assert "Traceback" not in stderr
    assert not out.exists()


@pytest.mark.parametrize(("tasks", "needle"), [
    (f"{{chat: 1, password: {SECRET}}}", "r.yaml:3: key 'data.tasks.password' must be a number"),  # a wrong type
    (f"{{chat: 1, api_key: '{SECRET}${{nowhere}}'}}", "data.tasks.api_key"),  # a bad interpolation
])
def test_a_config_file_error_hides_the_secret(tmp_path, capsys, tasks, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"backbone: bagel-tiny\ndata:\n  tasks: {tasks}\n")
    rc, stdout, stderr = main(capsys, "validate", str(recipe))
    assert rc == 2 and needle in stderr
    assert SECRET not in stdout + stderr
