"""Fully sharded training (`trainer.strategy: fsdp`): PyTorch's FSDP2 (`fully_shard`) under Lightning's
ModelParallelStrategy, one unit per module class the adapter names (`fsdp_wrap_modules()`) plus the root.

Why FSDP2: Lightning's FSDPStrategy (FSDP1) refuses a CPU accelerator ("The strategy `fsdp` requires a GPU
accelerator"), and FSDP1 itself does too ("FSDP needs a non-CPU accelerator device"); FSDP2 runs on CPU
processes with gloo as on GPUs with NCCL, so the path the tests run is the path a cluster runs.

At rest (optimiser step, between calls) every weight, gradient and optimiser state is a slice (`DTensor`)
on each rank. A backbone is not called through `forward` but through its own methods (`losses`,
`sample_images`, `rollout_logprob`, ...), so FSDP's hooks alone gather only the wrapped units' weights.
Training code therefore enters the model through one of two doors:
- `call(model, fn)`: `fn()` run as the root module's forward (FSDP's own registered-forward-method
  mechanism): the root's weights gathered for it, the units gathered one at a time by their hooks, the
  gradients reduce-scattered in backward. For loss and log-prob computations that are backpropagated.
- `gathered(model)`: every weight whole on every rank for a block without backward (sampling, rewards
  that ask the policy, evaluation): the collectives run once on entry and once on exit, none inside, so
  the block may call the model any number of times and in any order.
Both are plain pass-throughs for a model that is not sharded.

Checkpoints are written gathered (`whole`): rank 0 writes the same files, in the same layout, as a
single-process run, so `cmrp eval`, `chat` and `--resume` read them unchanged; on resume each rank takes
its own slice of the whole tensors it read (`load_into`, `load_optimizer_state`).
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

__all__ = ["ShardedStrategy", "call", "gathered", "grad_norm", "grads_finite", "is_sharded", "load_into",
           "load_optimizer_state", "optimizer_state", "rank_digests", "shard", "whole", "whole_parameters"]

T = TypeVar("T")
_ENTRY = "_cmrp_sharded_call"
_local = threading.local()  # depth of nested entries (an inner call runs inside the outer one's gathering)


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as plain FSDP: one data-parallel dimension over every process of
    every node (no tensor parallelism); `wrap_modules`: the module classes that become one unit each."""

    def __init__(self, wrap_modules: Iterable[type[torch.nn.Module]] = (), **kwargs: Any):
        super().__init__(**kwargs)
        self.wrap_modules = tuple(wrap_modules)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(module: Any) -> bool:
    """From a LightningModule's `configure_model`: shard `module.model` when the trainer runs a
    ShardedStrategy (once: a later stage's trainer finds it sharded already). True when it is sharded."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    strategy = module.trainer.strategy
    model = module.model
    if not isinstance(strategy, ShardedStrategy):
        return False
    if is_sharded(model):
        return True
    mesh = strategy.device_mesh["data_parallel"]
    units = [m for m in model.modules() if strategy.wrap_modules and isinstance(m, strategy.wrap_modules)]
    for unit in reversed(units):  # innermost first, should a wrapped class contain another
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # a rank whose batch leaves a weight unused (no image: the ViT) still joins its unit's gradient
    # reduce-scatter, with zeros (DDP's find_unused_parameters)
    model.set_reduce_scatter_unused_params(True)
    setattr(model, _ENTRY, types.MethodType(lambda self, fn: fn(), model))
    register_fsdp_forward_method(model, _ENTRY)
    return True


def _depth() -> int:
    return getattr(_local, "depth", 0)


@contextlib.contextmanager
def _entered():
    _local.depth = _depth() + 1
    try:
        yield
    finally:
        _local.depth -= 1


def _root_sharded(model: torch.nn.Module) -> bool:
    """Whether the root's own weights (those outside every unit) are slices right now."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    def own(module: torch.nn.Module):
        yield from module.parameters(recurse=False)
        for child in module.children():
            if not isinstance(child, FSDPModule):
                yield from own(child)

    first = next(own(model), None)
    return first is None or isinstance(first, DTensor)


def call(model: torch.nn.Module, fn: Callable[[], T]) -> T:
    """`fn()` (which calls the backbone) run as the sharded model's forward: the root's weights gathered for
    it; with gradients enabled, its output must be backpropagated (that reshards the root and reduces the
    gradients) before the next optimiser step. Without gradients the root is resharded on return."""
    if not is_sharded(model) or _depth():
        return fn()
    was_sharded = _root_sharded(model)
    with _entered():
        entry = cast(Callable[[Callable[[], T]], T], getattr(model, _ENTRY))  # installed by `shard` on the root
        out = entry(fn)
    if was_sharded and not torch.is_grad_enabled():
        cast("FSDPModule", model).reshard()  # is_sharded: fully_shard made the root an FSDPModule
    return out


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Every weight whole on every rank for the block, which runs without gradients and without any
    collective op of FSDP's (so rewards may call the policy, evaluation may call it many times); all ranks
    enter and leave together."""
    from torch.distributed.fsdp import FSDPModule

    if not is_sharded(model) or _depth():
        with torch.no_grad():
            yield
        return
    with torch.no_grad():
        call(model, lambda: None)  # the first entry makes the model FSDP's root (not one of its units)
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
        inner = [u for u in units if u is not model]
        for unit in inner:
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            with _entered():
                yield
        finally:
            for unit in inner:
                unit.set_reshard_after_forward(True, recurse=False)
            for unit in units:
                unit.reshard()


# -- whole tensors for checkpoints ---------------------------------------------------------------------
def whole(tree: Any) -> Any:
    """`tree` (dicts, lists, tuples of tensors and values) with every slice replaced by the whole tensor.
    A collective: every rank calls it with the same structure."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        return tree.full_tensor()
    if isinstance(tree, dict):
        return {k: whole(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(whole(v) for v in tree)
    return tree


def _local_slice(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (whole, on every rank) as a slice placed like `like` (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor) and not isinstance(value, DTensor):
        return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)
    return value.to(like.device, like.dtype)


def load_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor read from a checkpoint into `target`, which may be a slice."""
    with torch.no_grad():
        target.copy_(_local_slice(value, target))


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's state dict with whole tensors (the layout of an unsharded run). Collective."""
    return whole(optimizer.state_dict())


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole-tensor optimiser state; each rank keeps the slices of its own parameters."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            own = optimizer.state.get(param, {})
            for key, value in own.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0:
                    own[key] = _local_slice(value, param)


# -- gradients -----------------------------------------------------------------------------------------
def _sum_over_ranks(value: torch.Tensor, sliced: bool) -> torch.Tensor:
    if sliced and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
    return value


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all of `params`' gradients, whole: slices' squared sums are added over ranks."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    sliced = any(isinstance(g, DTensor) for g in grads)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    squares = torch.stack([g.detach().float().pow(2).sum() for g in local]).sum()
    return _sum_over_ranks(squares, sliced).sqrt()


def grads_finite(params: Iterable[torch.Tensor]) -> bool:
    """No NaN/inf in any gradient; under sharding every rank sees every slice's verdict (so all skip alike)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    sliced = any(isinstance(g, DTensor) for g in grads)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    total = torch.stack([g.detach().float().abs().sum() for g in local]).sum()
    return bool(torch.isfinite(_sum_over_ranks(total, sliced)))


@contextlib.contextmanager
def whole_parameters(model: torch.nn.Module):
    """Every parameter registered on its module as a plain whole tensor for the block, for code that reads
    `state_dict()`: saving a checkpoint in the adapter's own layout (safetensors / PEFT), as one process
    would. A collective on entry (every rank enters); no forward inside, where FSDP's hooks would put their
    own tensors back."""
    from torch.distributed.tensor import DTensor

    if not is_sharded(model):
        yield
        return
    swapped: list[tuple[torch.nn.Module, str, Any]] = []
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):  # noqa: SLF001 - FSDP swaps them the same way
                if isinstance(param, DTensor):
                    module._parameters[name] = torch.nn.Parameter(param.full_tensor(),  # noqa: SLF001
                                                                  requires_grad=param.requires_grad)
                    swapped.append((module, name, param))
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param  # noqa: SLF001


def rank_digests(model: torch.nn.Module, names: list[str]) -> list[str]:
    """The sha256 of the weights `names` (whole) as every rank holds them, rank by rank: after a data- or
    fully-sharded-parallel run they must all be equal. A collective; [one digest] without a process group."""
    import hashlib

    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name, tensor in whole({n: params[n].detach() for n in sorted(names)}).items():
        digest.update(name.encode())
        digest.update(tensor.float().cpu().contiguous().numpy().tobytes())
    own = digest.hexdigest()
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [own]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, own)
    return every
