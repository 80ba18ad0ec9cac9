"""torchrun / DistributedDataParallel: the rank context and the few collectives training needs
(NCCL on GPUs, gloo on CPU). Without torchrun everything is a no-op on one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from pneumoseg.layers import to_sync_batch_norm


@dataclass
class Dist:
    """The process's place in a torchrun job (world_size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone writes files, logs and tracks."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        """Join the process group torchrun set up (``WORLD_SIZE`` > 1), else a lone process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as tdist

        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(tdist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as tdist

            tdist.barrier()

    def sum(self, sums: dict[str, float], n: int) -> tuple[dict[str, float], int]:
        """Add up per-rank loss sums and item counts, so every rank reports the whole epoch."""
        if self.world_size <= 1:
            return sums, n
        import torch.distributed as tdist

        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys] + [float(n)], dtype=torch.float64)
        tdist.all_reduce(t)
        return dict(zip(keys, t[:-1].tolist(), strict=True)), int(t[-1].item())

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's BatchNorm statistics (DDP syncs them only before a training
        forward), so validation, checkpoint ranking and the final weights agree across ranks."""
        if self.world_size <= 1:
            return
        import torch.distributed as tdist

        for buf in model.buffers():
            tdist.broadcast(buf, 0)

    def wrap(self, model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
        """The model DistributedDataParallel trains (the model itself on one process); with
        ``sync_bn`` its BatchNorm layers become SyncBatchNorm first (CUDA only, as in torch)."""
        if self.world_size <= 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if sync_bn:
            if device.type != "cuda":
                raise ValueError(
                    "params.yaml: train.model.sync_bn: torch's SyncBatchNorm runs on CUDA ranks "
                    "only; set it false for CPU ranks"
                )
            model = to_sync_batch_norm(model)

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper."""
    return model.module if hasattr(model, "module") else model


def shutdown() -> None:
    """Leave the process group (end of a torchrun job)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
