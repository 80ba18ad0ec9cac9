"""torchrun / DistributedDataParallel: the rank context and the few collectives training needs
(NCCL on GPUs, gloo on CPU). Without torchrun everything is a no-op on one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
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
        t = self._wire(torch.tensor([sums[k] for k in keys] + [float(n)], dtype=torch.float64))
        tdist.all_reduce(t)
        t = t.cpu()
        return dict(zip(keys, t[:-1].tolist(), strict=True)), int(t[-1].item())

    def _wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` where the backend moves it: NCCL takes CUDA tensors only, gloo CPU ones."""
        import torch.distributed as tdist

        return tensor.cuda(self.local_rank) if tdist.get_backend() == "nccl" else tensor

    def shard(self, ids: list[str]) -> list[str]:
        """This rank's share of a list scored in parallel: items ``rank::world_size``."""
        return ids[self.rank :: self.world_size]

    def gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Every rank's rows of a :meth:`shard`-ed list (``(n_rank, k)`` int64), back in the
        unsharded order, on every rank."""
        if self.world_size <= 1:
            return rows
        import torch.distributed as tdist

        local = torch.as_tensor(rows, dtype=torch.int64).reshape(len(rows), -1)
        mine = self._wire(torch.tensor([len(local)]))
        counts = [torch.zeros_like(mine) for _ in range(self.world_size)]
        tdist.all_gather(counts, mine)
        sizes = [int(c.item()) for c in counts]
        padded = torch.zeros((max(sizes), local.shape[1]), dtype=torch.int64)
        padded[: len(local)] = local
        padded = self._wire(padded)
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        tdist.all_gather(parts, padded)
        out = np.zeros((sum(sizes), local.shape[1]), dtype=np.int64)
        for rank, (part, size) in enumerate(zip(parts, sizes, strict=True)):
            out[rank :: self.world_size] = part[:size].cpu().numpy()
        return out

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's BatchNorm statistics (DDP syncs them only before a training
        forward), so validation, checkpoint ranking and the final weights agree across ranks."""
        if self.world_size <= 1:
            return
        import torch.distributed as tdist

        for buf in model.buffers():
            tdist.broadcast(buf, 0)

    def wrap(
        self,
        model: nn.Module,
        device: torch.device,
        sync_bn: bool = False,
        unused_parameters: bool = False,
    ) -> nn.Module:
        """The model DistributedDataParallel trains (the model itself on one process); with
        ``sync_bn`` its BatchNorm layers become SyncBatchNorm first (CUDA only, as in torch).
        ``unused_parameters``: some step leaves parameters without a gradient (a classification
        head while ``loss.cls`` is 0), which DDP must then look for."""
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
        return DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=unused_parameters
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper."""
    return model.module if hasattr(model, "module") else model


def shutdown() -> None:
    """Leave the process group (end of a torchrun job)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
