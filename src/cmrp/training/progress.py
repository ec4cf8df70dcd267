"""What a training stage shows while it runs, and the Lightning noise it does not show.

On a terminal a stage gets Lightning's own TQDM bar, named after the stage, with the values that say how it
goes (`sft: 40%|████ | 160/400 [01:10<01:45, 2.27it/s, loss=1.03]`; GRPO: reward and loss). Otherwise (CI
logs, a file) plain lines every 15 s with the same numbers (`cmrp.progress`).
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from cmrp.progress import Progress, interactive

__all__ = ["STAGE_SHOWN", "progress_callbacks", "quiet_noise"]

# metric logged by the stage -> the short name shown beside its progress
STAGE_SHOWN = {
    "sft": {"train/loss": "loss"},
    "grpo": {"reward/total": "reward", "grpo/loss": "loss"},
}

_QUIETED: list[bool] = []
# an advertisement; the stage's end (which the bar shows); accelerators nobody asked for
_ALWAYS_DROPPED = ("💡 Tip:", "`Trainer.fit` stopped:", "TPU available:", "HPU available:", "IPU available:")
_ONCE = ("GPU available:",)  # every stage's Trainer says it again


class _LightningNoise(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage()).lstrip()
        if message.startswith(_ALWAYS_DROPPED):
            return False
        if message.startswith(_ONCE):
            if message in self.seen:
                return False
            self.seen.add(message)
        return True


def quiet_noise() -> None:
    """Silence, once per process, what Lightning prints that tells a cmrp user nothing: the litlogger tip, the
    "`max_steps`/`max_epochs` reached" line at the end of each stage, the TPU/HPU lines and the GPU line
    repeated by every stage's Trainer, torch's `LeafSpec` deprecation (raised inside Lightning), the eval-mode
    warning for GRPO's policy (kept in eval mode on purpose, see CharacterGRPOModule), and MLflow's notes on
    creating a local database's tables."""
    if _QUIETED:
        return
    _QUIETED.append(True)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_LightningNoise())
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _shown(stage: str, metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, short in STAGE_SHOWN.get(stage, {}).items():
        value = metrics.get(key)
        if value is not None:
            out[short] = float(value)
    return out


def _bar(stage: str):
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    class StageBar(TQDMProgressBar):
        def init_train_tqdm(self) -> Tqdm:
            return Tqdm(desc=stage, position=2 * self.process_position, disable=self.is_disabled, leave=True,
                        dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)

        def on_train_epoch_start(self, trainer, *args: Any) -> None:
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.set_description(stage)

        def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
            return {k: f"{v:.4g}" for k, v in _shown(stage, trainer.callback_metrics).items()}

    return StageBar()


def _lines(stage: str):
    import lightning as L

    class StageLines(L.Callback):
        def __init__(self):
            self.progress: Progress | None = None

        def on_train_start(self, trainer, pl_module) -> None:
            total = trainer.num_training_batches
            self.progress = Progress(int(total) if total != float("inf") else None, stage, bar=False)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.progress is not None:
                self.progress.update(1, **_shown(stage, trainer.callback_metrics))

        def on_train_end(self, trainer, pl_module) -> None:
            if self.progress is not None:
                self.progress.close()
                self.progress = None

        def on_exception(self, trainer, pl_module, exception) -> None:
            self.on_train_end(trainer, pl_module)

    return StageLines()


def progress_callbacks(stage: str, *, main: bool = True) -> tuple[list, bool]:
    """(callbacks, enable_progress_bar) for a stage's Trainer: the bar on a terminal, lines otherwise; the
    other ranks of a distributed run show nothing."""
    quiet_noise()
    if not main:
        return [], False
    if interactive():
        return [_bar(stage)], True
    return [_lines(stage)], False
