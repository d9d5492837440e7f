"""Lightning strategies that the experiment overlays name (``experiments/strategies/*.yaml``)."""

from __future__ import annotations

from datetime import timedelta

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy


class FullyShardStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as pure sharded data parallelism (FSDP2): every process is a data-parallel rank.

    Lightning's ``"auto"`` sizes give ``data_parallel_size = num_nodes`` and ``tensor_parallel_size = devices``
    (tensor parallelism inside a node); a module that only applies ``fully_shard`` over the ``"data_parallel"``
    mesh dimension wants ``data_parallel_size = num_nodes * devices`` and ``tensor_parallel_size = 1`` instead.
    This class sets those sizes when the processes start, so one config serves any node and device count.
    The sharding itself is applied by the LightningModule's ``configure_model`` (see ``BiEncoderModule``).
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend, timeout=timeout,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()
