"""MLflow tracking: an embedded sqlite database by default, any tracking URI otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmrp.errors import CmrpError

__all__ = ["default_tracking_uri", "make_logger"]


def default_tracking_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def _check_reachable(uri: str) -> None:
    """Fail early, with the fix, when an http(s) tracking server cannot be reached."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)  # noqa: S310 - user-configured URI
    except (urllib.error.URLError, OSError) as err:
        raise CmrpError(
            f"tracking.tracking_uri {uri!r} is unreachable ({getattr(err, 'reason', err)}). Start the server, fix the "
            "URI, or set tracking.tracking_uri: null to use the embedded database in the output directory."
        ) from None


def make_logger(tracking: Any, output_dir: str | Path, run_name: str):
    """A Lightning MLFlowLogger; artifacts live beside the database in the output directory."""
    from lightning.pytorch.loggers import MLFlowLogger

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.tracking_uri or default_tracking_uri(output_dir)
    _check_reachable(uri)
    artifact_location = None
    if not uri.startswith(("http://", "https://", "databricks")):
        artifact_location = (output_dir / "mlartifacts").as_uri()
    return MLFlowLogger(
        experiment_name=tracking.experiment,
        run_name=tracking.run_name or run_name,
        tracking_uri=uri,
        artifact_location=artifact_location,
    )
