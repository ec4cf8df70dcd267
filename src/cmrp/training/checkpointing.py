"""Resume checkpoints: everything needed to continue a run exactly, written so a crash never leaves a
checkpoint that looks valid.

Layout: `<output_dir>/resume/<NN>-<stage>-<step>/` with
- `weights.safetensors` — every weight the run trains (the whole model in `full` mode, the adapter otherwise);
- `state.pt` — optimiser, scheduler, RNG states (torch, CUDA, numpy, python) and stage state (GRPO EMA /
  reference weights), plain tensors and containers only, read back with `torch.load(weights_only=True)`;
- `manifest.json` — written last: stage, step, data position, MLflow run id, results of finished stages,
  the recipe's fingerprint, the size and sha256 of every file, and a sha256 of the manifest itself.
A checkpoint is assembled in a hidden temporary directory beside the others, each file fsynced, then
renamed into place (atomic on one file system); leftovers of a crash mid-write are removed on the next save.

Before a run resumes from a checkpoint, its manifest and every file are verified against their sha256: a
checkpoint damaged in place (same size, changed bytes) is skipped with a warning naming the file, and the
one before it is used. Sizes alone decide which old checkpoints to prune (cheap, on every save).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmrp.checkpoint import file_sha256
from cmrp.config import flatten
from cmrp.errors import CmrpError, ConfigError
from cmrp.jsonio import dumps, to_strict, write_json
from cmrp.training.storage import write_error

__all__ = [
    "FORMAT",
    "NonFiniteError",
    "NonFiniteGuard",
    "ResumePoint",
    "capture_rng",
    "check_fingerprint",
    "find_resume_point",
    "load_weights",
    "recipe_fingerprint",
    "restore_rng",
    "write_checkpoint",
]

FORMAT = 2  # 2: sha256 of every file and of the manifest
WEIGHTS = "weights.safetensors"
STATE = "state.pt"
MANIFEST = "manifest.json"


class NonFiniteError(CmrpError):
    """Too many optimisation steps in a row had a NaN/inf loss or gradient."""


# -- RNG -------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """The state of every random generator a training step may draw from, as plain tensors/lists."""
    import numpy as np

    legacy = np.random.get_state()  # legacy=True: the (kind, keys, pos, has_gauss, cached) tuple
    assert isinstance(legacy, tuple)
    kind, keys, pos, has_gauss, cached = legacy
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


def _world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def capture_rng_all() -> dict[str, Any]:
    """Every rank's RNG states (a collective in a distributed run): `rng` is rank 0's, `rng_ranks` every rank's
    — ranks draw different amounts (their batches differ), so each must get its own back."""
    own = capture_rng()
    rank, world = _world()
    if world == 1:
        return {"rng": own}
    states: list[Any] = [None] * world
    torch.distributed.all_gather_object(states, own)
    return {"rng": states[0], "rng_ranks": states}


def rank_rng(state: dict[str, Any]) -> dict[str, Any]:
    """This rank's RNG states out of a checkpoint's state (rank 0's when it holds only those)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    ranks = state.get("rng_ranks")
    rank = _world()[0] if _world()[1] > 1 else getattr(rank_zero_only, "rank", 0)
    return ranks[rank] if ranks and rank < len(ranks) else state["rng"]


# -- non-finite steps --------------------------------------------------------------------------------
class NonFiniteGuard:
    """Counts skipped updates; raises `NonFiniteError` after `limit` in a row (0: never), and at the end of a
    stage in which every update was skipped (`finish`): such a run changed no weight and must not look done.
    `unit` names what `step` numbers: SFT's optimiser steps, GRPO's iterations (several updates each)."""

    def __init__(self, limit: int, where: str, unit: str = "step"):
        self.limit = int(limit)
        self.where = where
        self.unit = unit
        self.in_row = 0
        self.total = 0
        self.seen = 0

    def step(self, finite: bool, step: int) -> bool:
        """Record one update at `step` (1-based); True when it may go ahead."""
        self.seen += 1
        if finite:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        print(f"cmrp: {self.where} {self.unit} {step}: non-finite loss or gradients, update skipped "
              f"({self.in_row} in a row, {self.total} in all)", flush=True)
        if self.limit and self.in_row >= self.limit:
            raise NonFiniteError(
                f"{self.where}: {self.in_row} steps in a row (up to {self.unit} {step}) had a NaN/inf loss or "
                f"gradients (nonfinite_stop_after: {self.limit}). Lower the learning rate ({self.where}.optimizer.lr), "
                "check the data, or raise nonfinite_stop_after; `cmrp fit --resume` continues from the last checkpoint."
            )
        return False

    def finish(self) -> None:
        """The end of a stage: raise when every update of it was skipped (nothing was trained)."""
        if self.seen and self.total == self.seen:
            raise NonFiniteError(
                f"{self.where}: every one of its {self.seen} updates had a NaN/inf loss or gradients and was skipped, "
                f"so no weight changed. Lower the learning rate ({self.where}.optimizer.lr) or check the data."
            )

    def state_dict(self) -> dict[str, int]:
        return {"in_row": self.in_row, "total": self.total, "seen": self.seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_row, self.total, self.seen = int(state["in_row"]), int(state["total"]), int(state.get("seen", 0))


# -- fingerprint -------------------------------------------------------------------------------------
_NOT_FINGERPRINTED = ("resume", "output_dir", "checkpoint", "tracking", "nonfinite_stop_after")


def recipe_fingerprint(resolved: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A hash of everything that decides the numbers of a run (not where it writes or how it logs), and the
    flattened values it was computed from (to name what changed)."""
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


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(dumps(body, sort_keys=True).encode()).hexdigest()


def write_checkpoint(root: Path, weights: dict[str, torch.Tensor], state: dict[str, Any], manifest: dict[str, Any],
                     keep: int) -> Path:
    """Write one checkpoint atomically under `root`; keep the newest `keep` valid ones. A failed write (a full
    disk) leaves no partial checkpoint and raises a CmrpError naming the latest valid one, which is intact."""
    from safetensors.torch import save_file

    position = "done" if manifest["done"] else f"{int(manifest['batches']):08d}"
    name = f"{int(manifest['stage_index']):02d}-{manifest['stage']}-{position}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    final = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # a crash mid-write left this; it was never valid
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
        save_file(tensors, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
        files = {f: {"size": (tmp / f).stat().st_size, "sha256": file_sha256(tmp / f)} for f in (WEIGHTS, STATE)}
        body = to_strict({**manifest, "format": FORMAT, "files": files})  # digest what is written (NaN -> null)
        write_json(tmp / MANIFEST, {**body, "digest": _manifest_digest(body)}, indent=1, ensure_ascii=True)
        for f in (WEIGHTS, STATE, MANIFEST):
            _fsync(tmp / f)
        _fsync(tmp)
        if final.exists():  # the same point written again after a resume: replace it
            old = root / f".tmp-old-{name}-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
        _fsync(root)
    except Exception as err:  # noqa: BLE001 - safetensors and torch report a full disk in their own types
        mapped = write_error(err, final)
        if mapped is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # before naming the survivor: frees the space it took
        latest = find_resume_point(root, verify=False)
        kept = f"the last valid checkpoint {latest.path} is intact" if latest else "no earlier checkpoint exists"
        raise type(mapped)(f"{mapped}; {kept}. Free space, then continue with `cmrp fit --resume`") from None
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
        import warnings

        try:
            with warnings.catch_warnings():  # a foreign pickle makes torch warn as well as fail: one message
                warnings.simplefilter("ignore")
                return torch.load(self.path / STATE, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch's message advises unsafe loading: not repeated here
            raise CmrpError(f"{self.path / STATE}: not a state file cmrp can read ({type(err).__name__}); delete "
                            f"{self.path} to resume from the checkpoint before it") from None


def _warn(message: str) -> None:
    print(f"cmrp: resume: {message}", file=sys.stderr, flush=True)


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The manifest of a checkpoint directory whose files have their recorded sizes, or None and why not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path}: no {MANIFEST} (a checkpoint whose writing never finished)"
    except (OSError, ValueError) as err:
        return None, f"{path / MANIFEST}: unreadable ({type(err).__name__})"
    if not isinstance(manifest, dict) or manifest.get("digest") != _manifest_digest(manifest):
        return None, f"{path / MANIFEST}: its content does not match its sha256 (the file was changed or damaged)"
    if manifest.get("format") != FORMAT:
        return None, f"{path / MANIFEST}: format {manifest.get('format')!r}, this cmrp reads format {FORMAT}"
    files = manifest.get("files")
    required = ("stage", "stage_index", "batches", "done")
    if not isinstance(files, dict) or set(files) != {WEIGHTS, STATE} or not all(k in manifest for k in required):
        return None, f"{path / MANIFEST}: incomplete (not written by this cmrp)"
    for name, entry in files.items():
        try:
            size = (path / name).stat().st_size
        except OSError:
            return None, f"{path / name}: missing"
        if not isinstance(entry, dict) or size != entry.get("size"):
            return None, f"{path / name}: {size} bytes, the manifest says {entry.get('size') if isinstance(entry, dict) else '?'} (cut short)"
    return manifest, ""


def _verify_files(point: ResumePoint) -> str | None:
    """Why a checkpoint's files do not match the sha256 in its manifest, or None when they all do."""
    for name, entry in point.manifest["files"].items():
        try:
            if file_sha256(point.path / name) != entry.get("sha256"):
                return f"{point.path / name}: its content does not match the sha256 in {MANIFEST} (damaged)"
        except OSError as err:
            return f"{point.path / name}: unreadable ({err.strerror or type(err).__name__})"
    return None


def _candidates(root: Path, warn: bool) -> tuple[list[ResumePoint], int]:
    """Checkpoint directories whose manifest and file sizes are right, and how many others there were."""
    points: list[ResumePoint] = []
    rejected = 0
    if not root.is_dir():
        return points, rejected
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        manifest, reason = _read_manifest(path)
        if manifest is not None:
            points.append(ResumePoint(path, manifest))
        else:
            rejected += 1
            if warn:
                _warn(f"skipping {reason}")
    return points, rejected


def _valid_points(root: Path) -> list[ResumePoint]:
    return _candidates(root, warn=False)[0]


def find_resume_point(root: Path, *, verify: bool = True) -> ResumePoint | None:
    """The latest checkpoint under `root` that passes verification (half-written, cut short or damaged ones
    are passed over, each with a warning on stderr). None when `root` holds no checkpoint at all; a CmrpError
    when it holds some but none passes (starting afresh would silently drop them)."""
    points, rejected = _candidates(root, warn=verify)
    for point in sorted(points, key=lambda p: _order(p.manifest), reverse=True):
        problem = _verify_files(point) if verify else None
        if problem is None:
            return point
        _warn(f"skipping {problem}")
        rejected += 1
    if verify and rejected:
        raise CmrpError(f"{root}: none of its {rejected} checkpoint(s) passed verification (see the warnings above); "
                        "restore them, or delete the folder (or set resume: never) to start afresh")
    return None


def load_weights(model: torch.nn.Module, path: Path, names: list[str]) -> None:
    """Copy the checkpoint's weights into `model`; the names must be exactly the run's trained weights."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / WEIGHTS))
    except Exception as err:  # noqa: BLE001 - safetensors' own error type; a damaged header or data
        raise CmrpError(f"{path / WEIGHTS}: not a weights file cmrp can read ({type(err).__name__}); delete {path} "
                        "to resume from the checkpoint before it") from None
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
            from cmrp.training.sharding import load_optimizer_state

            if resume_state is None:
                return
            for opt, saved in zip(trainer.optimizers, resume_state["optimizers"], strict=True):
                load_optimizer_state(opt, saved)  # each rank keeps its slices when the model is sharded
            for config, saved in zip(trainer.lr_scheduler_configs, resume_state["schedulers"], strict=True):
                config.scheduler.load_state_dict(saved)
            _set_progress(trainer, pl_module, resume_state["progress"])
            if load_module_state is not None:
                load_module_state(resume_state.get("module", {}))
            self.rng_pending = rank_rng(resume_state)

        def _save(self, trainer, done: bool):
            """On every rank: slices are gathered into whole tensors (collectives), rank 0 writes."""
            from cmrp.training.sharding import optimizer_state, whole

            state = {
                "optimizers": [optimizer_state(opt) for opt in trainer.optimizers],
                "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
                "progress": _progress(trainer),
                "module": whole(module_state()) if module_state is not None else {},
                **capture_rng_all(),
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
        """Called on every rank: a sharded model's weights are gathered (collectives), then rank 0 writes."""
        from cmrp.training.sharding import whole

        params = dict(self.model.named_parameters())
        weights = whole({n: params[n] for n in self.names})
        if not self.main:  # rank 0 writes; the other ranks hold the same weights
            return
        manifest = {**self.base, **part, "results": self.results, "stage_extra": extra or {}}
        write_checkpoint(self.root, weights, state, manifest, self.keep)

    def write_done(self, stage: str, stage_index: int, result: dict[str, Any]) -> None:
        """The end of a stage: final weights (after e.g. GRPO's EMA swap), RNG, and its result."""
        self.results[stage] = result
        if self.every:
            self.write(capture_rng_all(), {"stage": stage, "stage_index": stage_index, "batches": 2**31 - 1,
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
        return NonFiniteGuard(self.owner.max_nonfinite, self.name, "iteration" if self.name == "grpo" else "step")

    def callback(self, *, batches_per_step: int = 1, module_state=None, load_module_state=None):
        return make_resume_callback(
            stage=self.name, stage_index=self.index, every=self.owner.every, batches_per_step=batches_per_step,
            write=lambda state, part: self.owner.write(state, part, self.extra), resume_state=self.state,
            start_batches=self.start_batches, module_state=module_state, load_module_state=load_module_state,
        )
