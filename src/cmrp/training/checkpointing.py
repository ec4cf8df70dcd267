"""Resume checkpoints: everything needed to continue a run exactly, written so a crash never leaves a
checkpoint that looks valid.

Layout: `<output_dir>/resume/<NN>-<stage>-<step>/` with
- `weights.safetensors` — every weight the run trains (the whole model in `full` mode, the adapter otherwise);
- `state.pt` — optimiser, scheduler, RNG states (torch, CUDA, numpy, python) and stage state (GRPO EMA /
  reference weights), plain tensors and containers only, read back with `torch.load(weights_only=True)`;
- `manifest.json` — written last: stage, step, data position, MLflow run id, results of finished stages,
  the recipe's fingerprint, and the size of every file. A directory is a checkpoint only when its manifest
  parses and every listed file has its recorded size.
A checkpoint is assembled in a hidden temporary directory beside the others, each file fsynced, then
renamed into place (atomic on one file system); leftovers of a crash mid-write are removed on the next save.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmrp.errors import CmrpError, ConfigError
from cmrp.jsonio import write_json

__all__ = [
    "FORMAT",
    "NonFiniteError",
    "NonFiniteGuard",
    "ResumePoint",
    "capture_rng",
    "find_resume_point",
    "grads_finite",
    "load_weights",
    "recipe_fingerprint",
    "restore_rng",
    "write_checkpoint",
]

FORMAT = 1
WEIGHTS = "weights.safetensors"
STATE = "state.pt"
MANIFEST = "manifest.json"


class NonFiniteError(CmrpError):
    """Too many optimisation steps in a row had a NaN/inf loss or gradient."""


# -- RNG -------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """The state of every random generator a training step may draw from, as plain tensors/lists."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- non-finite steps --------------------------------------------------------------------------------
def grads_finite(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    total = torch.stack([g.detach().float().abs().sum() for g in grads]).sum()
    return bool(torch.isfinite(total))


class NonFiniteGuard:
    """Counts skipped steps; raises `NonFiniteError` after `limit` in a row (0: never)."""

    def __init__(self, limit: int, where: str):
        self.limit = int(limit)
        self.where = where
        self.in_row = 0
        self.total = 0

    def step(self, finite: bool, step: int) -> bool:
        """Record one step; True when it may go ahead."""
        if finite:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        print(f"cmrp: {self.where} step {step}: non-finite loss or gradients, update skipped "
              f"({self.in_row} in a row, {self.total} in all)", flush=True)
        if self.limit and self.in_row >= self.limit:
            raise NonFiniteError(
                f"{self.where}: {self.in_row} steps in a row (up to step {step}) had a NaN/inf loss or gradients "
                f"(nonfinite_stop_after: {self.limit}). Lower the learning rate ({self.where}.optimizer.lr), check "
                "the data, or raise nonfinite_stop_after; `cmrp fit --resume` continues from the last checkpoint."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_row, self.total = int(state["in_row"]), int(state["total"])


# -- fingerprint -------------------------------------------------------------------------------------
_NOT_FINGERPRINTED = ("resume", "output_dir", "checkpoint", "tracking", "nonfinite_stop_after")


def recipe_fingerprint(resolved: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A hash of everything that decides the numbers of a run (not where it writes or how it logs), and the
    flattened values it was computed from (to name what changed)."""
    from cmrp.config import flatten

    flat = flatten({k: v for k, v in resolved.items() if k not in _NOT_FINGERPRINTED})
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]
    return digest, flat


# -- writing -----------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _order(manifest: dict[str, Any]) -> tuple[int, int]:
    return int(manifest["stage_index"]), int(manifest["batches"])


def write_checkpoint(root: Path, weights: dict[str, torch.Tensor], state: dict[str, Any], manifest: dict[str, Any],
                     keep: int) -> Path:
    """Write one checkpoint atomically under `root`; keep the newest `keep` valid ones."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # a crash mid-write left this; it was never valid
        shutil.rmtree(stale, ignore_errors=True)
    position = "done" if manifest["done"] else f"{int(manifest['batches']):08d}"
    name = f"{int(manifest['stage_index']):02d}-{manifest['stage']}-{position}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
        save_file(tensors, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
        files = {f: (tmp / f).stat().st_size for f in (WEIGHTS, STATE)}
        write_json(tmp / MANIFEST, {**manifest, "format": FORMAT, "files": files}, indent=1, ensure_ascii=True)
        for f in (WEIGHTS, STATE, MANIFEST):
            _fsync(tmp / f)
        _fsync(tmp)
        final = root / name
        if final.exists():  # the same point written again after a resume: replace it
            old = root / f".tmp-old-{name}-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
        _fsync(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    valid = sorted(_valid_points(root), key=lambda p: _order(p.manifest))
    for old_point in valid[:-keep] if keep > 0 else []:
        shutil.rmtree(old_point.path, ignore_errors=True)
    return final


# -- reading -----------------------------------------------------------------------------------------
@dataclass
class ResumePoint:
    path: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def stage_index(self) -> int:
        return int(self.manifest["stage_index"])

    @property
    def done(self) -> bool:
        return bool(self.manifest["done"])

    def state(self) -> dict[str, Any]:
        try:
            return torch.load(self.path / STATE, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged file is reported with its path
            raise CmrpError(f"{self.path / STATE}: cannot be read ({err}); delete {self.path} to resume from the "
                            "checkpoint before it") from None


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {WEIGHTS, STATE}:
        return None
    for name, size in files.items():
        try:
            if (path / name).stat().st_size != size:
                return None
        except OSError:
            return None
    required = ("stage", "stage_index", "batches", "done")
    return manifest if all(k in manifest for k in required) else None


def _valid_points(root: Path) -> list[ResumePoint]:
    points = []
    if not root.is_dir():
        return points
    for path in root.iterdir():
        if path.name.startswith(".") or not path.is_dir():
            continue
        manifest = _read_manifest(path)
        if manifest is not None:
            points.append(ResumePoint(path, manifest))
    return points


def find_resume_point(root: Path) -> ResumePoint | None:
    """The latest valid checkpoint under `root` (half-written or damaged ones are passed over)."""
    points = _valid_points(root)
    return max(points, key=lambda p: _order(p.manifest)) if points else None


def load_weights(model: torch.nn.Module, path: Path, names: list[str]) -> None:
    """Copy the checkpoint's weights into `model`; the names must be exactly the run's trained weights."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / WEIGHTS))
    missing, unexpected = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    if missing or unexpected:
        raise ConfigError(
            f"{path / WEIGHTS}: does not match this recipe's trained weights (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); resume with the recipe that wrote it, or start afresh with resume: never"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].data.copy_(tensors[name].to(params[name].device, params[name].dtype))


def check_fingerprint(point: ResumePoint, fingerprint: str, flat: dict[str, Any]) -> None:
    if point.manifest.get("fingerprint") == fingerprint:
        return
    before = point.manifest.get("recipe", {})
    changed = sorted(k for k in set(before) | set(flat) if before.get(k) != flat.get(k))
    shown = ", ".join(f"{k}: {before.get(k)!r} -> {flat.get(k)!r}" for k in changed[:6])
    raise ConfigError(
        f"resume: the checkpoint {point.path} was written by a different recipe ({shown or 'unknown keys'}). "
        "Resume with the same recipe and overrides, or use another output_dir (or resume: never) to start afresh."
    )


# -- the Lightning side --------------------------------------------------------------------------------
def _progress(trainer) -> dict[str, int]:
    """Called from `on_train_batch_start`: the previous batch is fully counted (and its metrics logged)."""
    loop = trainer.fit_loop.epoch_loop
    return {"global_step": int(trainer.global_step),
            "batches_that_stepped": int(loop._batches_that_stepped)}  # noqa: SLF001


def _set_progress(trainer, module, progress: dict[str, int]) -> None:
    loop = trainer.fit_loop.epoch_loop
    loop._batches_that_stepped = int(progress["batches_that_stepped"])  # noqa: SLF001
    if module.automatic_optimization:
        counter = loop.automatic_optimization.optim_progress.optimizer.step.total
    else:
        counter = loop.manual_optimization.optim_step_progress.total
    counter.ready = counter.completed = int(progress["global_step"])


def make_resume_callback(*, stage: str, stage_index: int, every: int, batches_per_step: int,
                         write: Callable[[dict[str, Any], dict[str, Any]], None],
                         resume_state: dict[str, Any] | None, start_batches: int,
                         module_state: Callable[[], dict[str, Any]] | None = None,
                         load_module_state: Callable[[dict[str, Any]], None] | None = None):
    """A Lightning callback that restores a checkpoint's optimiser/scheduler/progress/RNG at train start and
    writes one every `every` steps (the caller writes the end-of-stage one, after the stage's final touches).
    A checkpoint after batch n is written when batch n + 1 starts (fetched, not yet trained on): by then
    Lightning has logged batch n's metrics and counted it; a resumed run restores the RNG states at that
    same point, so draws made by a collate function stay in step too.
    `write(state, manifest_part)` does the saving (it knows the weights, run id and results)."""
    import lightning as L

    class ResumeCallback(L.Callback):
        def __init__(self):
            self.batches = start_batches  # batches trained on so far, in this stage
            self.saved = start_batches
            self.rng_pending = None

        def on_train_start(self, trainer, pl_module):
            if resume_state is None:
                return
            for opt, saved in zip(trainer.optimizers, resume_state["optimizers"], strict=True):
                opt.load_state_dict(saved)
            for config, saved in zip(trainer.lr_scheduler_configs, resume_state["schedulers"], strict=True):
                config.scheduler.load_state_dict(saved)
            _set_progress(trainer, pl_module, resume_state["progress"])
            if load_module_state is not None:
                load_module_state(resume_state.get("module", {}))
            self.rng_pending = resume_state["rng"]

        def _save(self, trainer, done: bool):
            state = {
                "optimizers": [opt.state_dict() for opt in trainer.optimizers],
                "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
                "progress": _progress(trainer),
                "module": module_state() if module_state is not None else {},
                "rng": capture_rng(),
            }
            write(state, {"stage": stage, "stage_index": stage_index, "batches": self.batches, "done": done,
                          "step": self.batches // batches_per_step})

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.rng_pending is not None:
                # as the interrupted run saved it: after this batch was fetched (a collate may draw), before its step
                restore_rng(self.rng_pending)
                self.rng_pending = None
            if not every or self.batches == self.saved or self.batches % batches_per_step:
                return
            if (self.batches // batches_per_step) % every == 0:
                self._save(trainer, done=False)
                self.saved = self.batches

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches += 1  # the last batch's checkpoint is the caller's end-of-stage one

    return ResumeCallback()



class Checkpointer:
    """One run's resume checkpoints: knows the weights to save, the run id and what finished stages
    returned; hands each stage its callback, its start position and its skipped-step guard."""

    def __init__(self, root: Path, model: torch.nn.Module, names: list[str], *, every: int, keep: int,
                 max_nonfinite: int, base_manifest: dict[str, Any], main: bool = True):
        self.root, self.model, self.names = root, model, names
        self.every, self.keep, self.max_nonfinite, self.main = every, keep, max_nonfinite, main
        self.base = dict(base_manifest)  # run_id, fingerprint, recipe, before, ...
        self.results: dict[str, Any] = {}  # stage -> what it returned (finished stages)

    def write(self, state: dict[str, Any], part: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        if not self.main:  # rank 0 writes; the other ranks hold the same weights
            return
        params = dict(self.model.named_parameters())
        manifest = {**self.base, **part, "results": self.results, "stage_extra": extra or {}}
        write_checkpoint(self.root, {n: params[n] for n in self.names}, state, manifest, self.keep)

    def write_done(self, stage: str, stage_index: int, result: dict[str, Any]) -> None:
        """The end of a stage: final weights (after e.g. GRPO's EMA swap), RNG, and its result."""
        self.results[stage] = result
        if self.every:
            self.write({"rng": capture_rng()}, {"stage": stage, "stage_index": stage_index, "batches": 2**31 - 1,
                                                 "step": -1, "done": True})

    def stage(self, stage: str, stage_index: int, point: ResumePoint | None) -> StageCheckpoints:
        here = point if point is not None and point.stage_index == stage_index and not point.done else None
        return StageCheckpoints(self, stage, stage_index, here)


class StageCheckpoints:
    """A stage's view: where its data starts, what it saved earlier (`extra`), its callback and guard."""

    def __init__(self, owner: Checkpointer, stage: str, stage_index: int, point: ResumePoint | None):
        self.owner, self.name, self.index = owner, stage, stage_index
        self.point = point
        self.state = point.state() if point is not None else None
        self.start_batches = int(point.manifest["batches"]) if point is not None else 0
        self.extra: dict[str, Any] = dict(point.manifest.get("stage_extra", {})) if point is not None else {}

    @property
    def resuming(self) -> bool:
        return self.point is not None

    def guard(self) -> NonFiniteGuard:
        return NonFiniteGuard(self.owner.max_nonfinite, self.name)

    def callback(self, *, batches_per_step: int = 1, module_state=None, load_module_state=None):
        return make_resume_callback(
            stage=self.name, stage_index=self.index, every=self.owner.every, batches_per_step=batches_per_step,
            write=lambda state, part: self.owner.write(state, part, self.extra), resume_state=self.state,
            start_batches=self.start_batches, module_state=module_state, load_module_state=load_module_state,
        )
