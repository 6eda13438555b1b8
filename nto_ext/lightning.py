"""PyTorch Lightning's FSDP2 strategy with NTO's checkpoints (issue 22).

Lightning's `ModelParallelStrategy` (FSDP2) saves and loads optimizers through torch's
`get_optimizer_state_dict` / `set_optimizer_state_dict`, which assume a state that exists
for every param at all times; NTO's state exists for the active set only and moves. This
strategy saves NTO's state into the same distributed checkpoint (one folder, every rank
writes its shards) in NTO's own layout (`distributed.dcp_optimizer_state`) and loads it
back with `distributed.load_optimizer_state`, so `trainer.fit(..., ckpt_path=...)`
resumes bit-identically. Other optimizers keep Lightning's path.

    trainer = pl.Trainer(strategy=NTOModelParallelStrategy(), ...)

DDP needs nothing of this: Lightning's DDP checkpoints carry `NTO.state_dict()` as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytorch_lightning.strategies import ModelParallelStrategy

from .distributed import dcp_optimizer_state, load_optimizer_state
from .optimizer import NTO

__all__ = ["NTOModelParallelStrategy"]


def _nto(optimizer: Any) -> NTO | None:
    """The NTO behind Lightning's LightningOptimizer wrapper, or None."""
    inner = getattr(optimizer, "_optimizer", optimizer)
    return inner if isinstance(inner, NTO) else None


class NTOModelParallelStrategy(ModelParallelStrategy):
    """`ModelParallelStrategy` whose checkpoints hold NTO's state (see the module doc).

    Only distributed checkpoints (`save_distributed_checkpoint=True`, the default): a
    single-file checkpoint would gather every rank's moments on rank 0 through torch's
    full-state-dict path, which cannot hold NTO's state.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self._save_distributed_checkpoint:  # by keyword or by position
            raise ValueError(
                "NTOModelParallelStrategy(save_distributed_checkpoint=False): NTO's state is "
                "saved only as a distributed checkpoint (a folder, one shard per rank); "
                "allowed: save_distributed_checkpoint=True (the default). To get one file, "
                "convert the folder after training (torch.distributed.checkpoint."
                "format_utils.dcp_to_torch_save)")

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if _nto(optimizer) is None:
            return super().optimizer_state(optimizer)
        return dcp_optimizer_state(self.model, _nto(optimizer))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None,
                        ) -> dict[str, Any]:
        from lightning_fabric.strategies.model_parallel import (
            _is_sharded_checkpoint,
            _load_checkpoint,
        )

        path = Path(self.broadcast(checkpoint_path))
        ntos = {f"optimizer_{i}": _nto(o) for i, o in enumerate(self.optimizers)}
        if any(ntos.values()) and not _is_sharded_checkpoint(path):
            raise ValueError(
                f"NTOModelParallelStrategy cannot resume NTO from {str(path)!r}: not a "
                "distributed checkpoint folder (as this strategy saves); allowed: a folder "
                "written by NTOModelParallelStrategy")
        # the model and any other optimizer through Lightning; NTO's state by its own reader
        state = {"state_dict": self.model,
                 **{k: o for k, o in zip(ntos, self.optimizers) if ntos[k] is None}}
        assert self.lightning_module is not None
        meta = _load_checkpoint(path=path, state=state, strict=self.lightning_module.strict_loading,
                                optimizer_states_from_list=True, weights_only=weights_only)
        for key, opt in ntos.items():
            if opt is not None:
                load_optimizer_state(self.model, opt, str(path), key=key)
        return meta
