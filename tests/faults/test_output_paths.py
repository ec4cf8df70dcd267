"""Issue 20, item 5: an output_dir that is a file, lies under a file, sits on a read-only mount or on a disk too
small for the run's checkpoints fails with one line before any work; a disk that fills up during the run ends
it with one line, the last valid checkpoint intact and the MLflow run marked FAILED.

Read-only and small file systems are made in a private mount namespace (`unshare`), so nothing outside the
test is touched; those tests are skipped where namespaces are not available."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.faults._helpers import CMRP, TINY, assert_one_line_error, in_namespace, main, needs_mounts


def test_output_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    for command in ("validate", "fit"):
        rc, _, err = main(capsys, command, *TINY, f"output_dir={target}")
        assert_one_line_error(rc, err, command, f"output_dir {target} is a file")
        rc, _, err = main(capsys, command, *TINY, f"output_dir={target}/run")
        assert_one_line_error(rc, err, command, f"{target} is a file")
    assert target.read_text() == "not a directory"


def test_an_output_dir_name_too_long_for_the_file_system(tmp_path, capsys):
    rc, _, err = main(capsys, "validate", *TINY, f"output_dir={tmp_path}/{'x' * 300}")
    assert_one_line_error(rc, err, "validate", "longer than the 255 bytes")


def _fit_line(out: Path, *extra: str) -> str:
    return " ".join(shlex.quote(a) for a in [CMRP, "fit", *TINY, *extra, f"output_dir={out}"])


@needs_mounts
def test_output_dir_on_a_read_only_mount(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    script = (f"mount --bind {mount} {mount} && mount -o remount,bind,ro {mount} && "
              f"{_fit_line(mount / 'run')}")
    proc = in_namespace(script)
    assert_one_line_error(proc.returncode, proc.stderr, "fit", "read-only file system")
    assert not any(mount.iterdir())


@needs_mounts
def test_a_disk_too_small_for_the_checkpoints_fails_before_training(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    proc = in_namespace(f"mount -t tmpfs -o size=4m tmpfs {mount} && {_fit_line(mount / 'run', 'trainer.max_steps=4')}"
                        f"; rc=$?; ls {mount}/run > {tmp_path}/listing; exit $rc")
    line = assert_one_line_error(proc.returncode, proc.stderr, "fit", f"output_dir {mount / 'run'}: ", "free, but this "
                                 "run writes about", "checkpoint.keep")
    assert "MB" in line
    assert (tmp_path / "listing").read_text().split() == ["character"]  # no model, checkpoint or tracking yet


@pytest.mark.slow  # a real run until its disk fills: ~1 min on a loaded 2-core machine
@needs_mounts
def test_a_disk_that_fills_during_the_run(tmp_path):
    """The run starts with room; after its first resume checkpoint another process fills the disk; the next
    checkpoint write fails. Tracking goes to a database on another disk, so the FAILED status can be read."""
    from mlflow.tracking import MlflowClient

    mount, keep = tmp_path / "disk", tmp_path / "kept"
    mount.mkdir()
    db = tmp_path / "mlflow.db"
    out = mount / "run"
    fit = _fit_line(out, "trainer.max_steps=40", "checkpoint.every_n_steps=2", "checkpoint.keep=2",
                    f"tracking.tracking_uri=sqlite:///{db}")
    script = f"""
mount -t tmpfs -o size=400m tmpfs {mount}
( while [ ! -d {out}/resume/00-sft-00000002 ]; do sleep 0.05; done
  dd if=/dev/zero of={mount}/filler bs=1M 2>/dev/null; true ) &
{fit}
rc=$?
wait
cp -a {out}/resume {keep}
exit $rc
"""
    proc = in_namespace(script)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("cmrp fit: error: cannot write ") and "No space left on device" in error, error
    assert "the last valid checkpoint" in error and "is intact" in error
    from cmrp.training.checkpointing import find_resume_point

    point = find_resume_point(keep)  # verified: sha256 of every file
    assert point is not None and point.manifest["stage"] == "sft" and not point.done
    assert not [p for p in keep.iterdir() if p.name.startswith(".")]  # no half-written checkpoint left
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("cmrp").experiment_id])
    assert run.info.status == "FAILED"
