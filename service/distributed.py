"""Data-parallel training under ``torchrun`` (torch.distributed): what the fine-tuning
recipe needs, and no more.

    torchrun --standalone --nproc-per-node 2 -m service.cli finetune --model pruned/ \\
        --dataset distilled.jsonl --out recovered/

``torchrun`` starts one process per GPU and sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; :func:`setup` joins the process group (nccl on GPUs, gloo on CPU). Without
``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op, so the single-process
recipe is unchanged.

Why not wrap the model in ``DistributedDataParallel``: the recipe computes its loss
through the base model's decoder and output embedding (``FinetuneRecipe.response_loss``),
not through the wrapped module's ``forward``, which is where DDP hooks in; and ranks may
get a different number of micro-batches in a step (a share of a short last batch), which
DDP's per-backward reduction cannot handle. Instead each rank accumulates its share of a
step's micro-batches and :func:`sum_gradients` all-reduces the (LoRA-sized) gradients
once per step with ``torch.distributed.all_reduce``: one reduction per step, the same
collective DDP would issue.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            # One GPU per process: load_model's "cuda" then means this rank's GPU.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_(tensors) -> None:
    """Make every rank's tensors equal to rank 0's (start from identical weights)."""
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def sum_gradients(params: list[torch.Tensor], loss: float) -> float:
    """Sum the gradients (and the loss) of every rank's share of the step, in place.

    Each rank's loss is its share of the step's summed token loss divided by the whole
    step's target count, so the sum over ranks is exactly the single-process step loss
    and gradient. One flat buffer: one all-reduce per step."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    loss_t = torch.tensor([loss], dtype=torch.float32, device=grads[0].device)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss_t])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n
    return float(flat[offset])


def sum_scalars(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the ranks (the loss parts a step logs)."""
    t = torch.tensor(values, dtype=torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def agree(stop: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (rank 0 reads the job's cancel flag and deadline)."""
    flag = torch.tensor([1 if stop else 0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
