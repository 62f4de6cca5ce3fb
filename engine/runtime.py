"""Where a run executes: device choice, mixed precision, seeding and RNG state, and torchrun's process group."""
import contextlib
import datetime
import os
import random
import subprocess

import numpy as np
import torch
import torch.distributed as dist

from engine.errors import PeerError, UserError, user_errors


class DeviceError(UserError, ValueError):
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


def rng_state():
    """Every random stream a run draws from (Python, NumPy, torch CPU and CUDA), to save or to replay.

    Only tuples, numbers and tensors, so that a checkpoint holding it loads with torch.load(weights_only=True):
    NumPy's key array travels as an int64 tensor."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    numpy = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's GPU only: under torchrun every rank sees all the node's GPUs, and a resume may see fewer
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restore what `rng_state` saved. The generator states must be CPU byte tensors, wherever a checkpoint's
    tensors were loaded to."""
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]  # keys: a tensor, or (checkpoints before 2026-12) a NumPy array
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # checkpoints before 2026-11-28 held every visible GPU's state
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda.cpu())  # onto the current device, set by resolve_device


def init_distributed(device_name, timeout_s=1800):
    """Start the process group when launched by torchrun (RANK/WORLD_SIZE set); else a plain single process.

    Returns (rank, world_size, device). NCCL on CUDA, gloo on the CPU. A collective that waits longer than
    `timeout_s` for another process (one that died, or hangs) fails instead of waiting forever.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, resolve_device(device_name)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name, local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world_size, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast_flag(flag, world_size):
    """Rank 0's boolean, on every process (e.g. an early-stop decision that only rank 0 can take)."""
    if world_size == 1:
        return bool(flag)
    box = [bool(flag)]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(flags, world_size, device):
    """Each flag true on any process, on every process: one small all-reduce (e.g. "a stop signal came")."""
    if world_size == 1:
        return [bool(f) for f in flags]
    box = torch.tensor([int(bool(f)) for f in flags], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return [bool(v) for v in box.tolist()]


@contextlib.contextmanager
def together(world_size):
    """Run the body on every process, then agree: when it raised a user error on any process, every process
    raises, rank 0 with the first failing rank's message and the others a quiet PeerError (engine.errors), so
    no process waits at a later collective for one that has left. With one process, a plain block."""
    if world_size == 1:
        yield
        return
    message = None
    try:
        yield
    except user_errors() as e:
        message = str(e)
        failed = e
    else:
        failed = None
    messages = [None] * world_size
    dist.all_gather_object(messages, message)
    first = next((r for r, m in enumerate(messages) if m is not None), None)
    if first is None:
        return
    if dist.get_rank() != 0:
        raise PeerError(messages[first]) from None
    if failed is not None:
        raise failed
    raise PeerError(f"rank {first}: {messages[first]}")  # rank 0 prints another rank's reason


def gather_objects(value, world_size):
    """[value of rank 0, rank 1, ...] on every process (small picklable values)."""
    if world_size == 1:
        return [value]
    out = [None] * world_size
    dist.all_gather_object(out, value)
    return out


def gather_rng_states(world_size):
    """Every process's RNG state, so a resumed multi-process run continues each stream where it stopped."""
    return gather_objects(rng_state(), world_size)


def run_process(argv, timeout, **popen_kwargs):
    """`subprocess.run(argv, capture_output=True, text=True, timeout=...)` for a command that may start torchrun.

    torchrun starts its workers in sessions of their own, so killing the launcher at a timeout would leave them
    running. Here the launcher is first asked to stop (SIGTERM, which it passes on to its workers), and killed
    only if it has not stopped 30 s later.
    """
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                out, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
    return subprocess.CompletedProcess(argv, p.returncode, out, err)

