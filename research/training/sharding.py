"""Sharded and offloaded training plumbing for the LightningModules: FSDP2 ``fully_shard`` of transformer towers,
suspending gradient synchronisation, gathering full weights for saving, and DeepSpeed optimizer-offload detection."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy, ParallelStrategy, Strategy
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def data_parallel_mesh(mesh: DeviceMesh, owner: str) -> DeviceMesh:
    """The data-parallel dimension of a ``ModelParallelStrategy`` mesh; ``owner`` (a class name) shards over data
    parallelism only, so a tensor-parallel dimension larger than 1 is refused."""
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() != 1:
        raise ValueError(f"{owner} shards over data parallelism only: use tensor_parallel_size=1 "
                         "(research.training.strategies.FullyShardStrategy)")
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def fully_shard_towers(towers: Iterable[nn.Module], mesh: DeviceMesh) -> None:
    """FSDP2 ``fully_shard`` each transformer block of each tower (the backbone's ``_no_split_modules``), then the
    tower itself, over ``mesh``. Towers sharded already are left as they are (``configure_model`` runs again on a
    second fit or test)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for tower in towers:
        if isinstance(tower, FSDPModule):
            continue
        blocks = set(getattr(tower, "_no_split_modules", None) or ())
        for module in list(tower.modules()):
            if module is not tower and type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(tower, mesh=mesh)


@contextmanager
def no_gradient_sync(model: nn.Module, strategy: Strategy) -> Iterator[None]:
    """No gradient synchronisation inside the block, e.g. for all but the last of several backward passes whose
    gradients add up to one step's.

    fully_shard (``ModelParallelStrategy``): each sharded submodule's ``set_requires_gradient_sync(False)``. DDP and
    other parallel strategies: ``strategy.block_backward_sync()``, i.e. ``DistributedDataParallel.no_sync`` (Lightning's
    manual optimisation prepares the reducer in ``manual_backward`` only outside it). One device: nothing to do.
    """
    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.fsdp import FSDPModule

        sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for module in sharded:
            module.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for module in sharded:
                module.set_requires_gradient_sync(True, recurse=False)
    elif isinstance(strategy, ParallelStrategy):
        with strategy.block_backward_sync():
            yield
    else:
        yield


def full_state_dicts(modules: dict[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    """Each (fully_shard-ed) module's full state dict, by name, on CPU and on rank 0 only. A collective: every rank
    must call it, which is why it runs at the end of fit rather than when rank 0 alone saves the model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {name: get_model_state_dict(module, options=options) for name, module in modules.items()}


def offloads_optimizer(strategy: Strategy | None) -> bool:
    """True under a DeepSpeed strategy whose config offloads the optimizer (ZeRO-Offload), which refuses torch
    optimizers and needs DeepSpeed's own."""
    if not isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy.config, dict):
        return False
    offload = strategy.config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)
