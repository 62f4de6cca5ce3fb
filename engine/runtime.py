"""Where a run executes: device choice, mixed precision, seeding, and torchrun's process group."""
import contextlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist


class DeviceError(ValueError):
    """The config asks for hardware this machine does not have."""


def resolve_device(name, local_rank=0):
    """`auto` picks CUDA when present; under torchrun each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("device is 'cuda' but no CUDA GPU is visible; set device: cpu or auto")
        if name == "cuda":
            name = f"cuda:{local_rank}"
        torch.cuda.set_device(name)
    elif name != "cpu":
        raise DeviceError(f"device must be auto, cpu or cuda, got '{name}'")
    return torch.device(name)


def amp_context(device, use_amp, dtype="float16"):
    """CUDA autocast when asked; on the CPU a no-op (bf16 autocast is slower than fp32 on AVX2 CPUs)."""
    if use_amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_distributed(device_name):
    """Start the process group when launched by torchrun (RANK/WORLD_SIZE set); else a plain single process.

    Returns (rank, world_size, device). NCCL on CUDA, gloo on the CPU.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, resolve_device(device_name)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name, local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()
