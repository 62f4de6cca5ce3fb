"""What per-step reporting costs: training pairs/s of the same short loop with no reporter, and with TensorBoard
reporting every N optimizer steps (engine/reporting.py). Prints numbers; never passes or fails.

    python -m bench.logging_cost                          # CPU, resnet18, batch 16, 32 px: ~7 min, busy 2 cores
    python -m bench.logging_cost --every 1,10 --blocks 6 --steps 20 --device cuda --image-model resnet50 \
        --image-size 224 --batch-size 128

Each timed block is `--steps` optimizer steps of the training step train_one_epoch runs (forward, backward,
clipping, AdamW, schedule) on random uint8 batches already on the device; a reported block also builds the
step's scalars (engine.reporting.step_scalars) and writes them to TensorBoard event files in a temporary folder
on every due step. Blocks of each variant alternate (bench.workspace.alternate), so a burst of load on a shared
machine slows them alike; the median block is reported. On a busy machine the blocks spread more than the
reporting costs, so the cost of one report is also timed alone and compared with the median step.
"""
import argparse
import statistics
import sys
import tempfile


def parse_args(argv):
    p = argparse.ArgumentParser(description="Training pairs/s with and without per-step TensorBoard reporting.")
    p.add_argument("--every", default="10,1", help="report every N optimizer steps, comma-separated variants")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per timed block")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks per variant (after one untimed round)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--image-model", default="resnet18")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


# --help or a mistyped option is answered before torch and transformers load (seconds, hundreds of MB): the command
# line is checked here, and the heavy imports below run only once it parses.
if __name__ == "__main__":
    parse_args(sys.argv[1:])

import torch

from bench.cases import random_batches
from bench.workspace import Workspace, alternate, build
from dataset import normalize
from engine.errors import run_entry
from engine.optim import build_optimizer
from engine.reporting import Reporter, step_scalars
from engine.runtime import resolve_device
from engine.step import plain_step
from loss import ContrastiveLoss


def run(argv):
    args = parse_args(argv)
    device = resolve_device(args.device)
    every = [int(n) for n in args.every.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp, images=64, captions_per_image=1, text_model=None, text_size=(64, 2))
        model, tokenizer, max_length, cfg = build(ws, args.image_model, device)
        batches = random_batches(ws, tokenizer, max_length, args, device, steps=args.steps)
        loss_fn = ContrastiveLoss(0, 1)
        optimizer, scheduler, scaler = build_optimizer(model, cfg, 10**6, device)
        state = {"step": 0}

        def block(reporter):
            model.train()
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                out = plain_step(model, loss_fn, {**batch, "images": normalize(batch["images"])},
                                 torch.autocast(device.type, enabled=False), scaler)
                out["loss"].item()  # train_one_epoch reads the loss every step
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad-clip"])
                optimizer.step()
                scheduler.step()
                state["step"] += 1
                if reporter is not None and reporter.due(state["step"]):
                    reporter.step(state["step"], step_scalars(out, optimizer, model, loss_fn, grad_norm=norm,
                                                              pairs_per_s=0.0, data_wait_share=0.0,
                                                              skipped_images=0, device=device))

        reporters = {f"every {n}": Reporter(["tensorboard"], f"{tmp}/tb-{n}", every=n) for n in every}
        call = one_report_seconds(model, loss_fn, optimizer, batches[0], scaler, device, f"{tmp}/tb-calls")
        fns = {"off": lambda: block(None), **{name: (lambda r=r: block(r)) for name, r in reporters.items()}}
        times = alternate(fns, args.blocks, device, warmup=1)
        for reporter in reporters.values():
            reporter.close()
    pairs = args.steps * args.batch_size
    base = statistics.median(pairs / t for t in times["off"])
    print(f"{args.image_model}, batch {args.batch_size}, {args.image_size} px, {device.type}: {args.blocks} blocks "
          f"of {args.steps} steps per variant, median pairs/s (min-max)")
    for name, seconds in times.items():
        speeds = [pairs / t for t in seconds]
        median = statistics.median(speeds)
        print(f"  reporting {name:<9} {median:8.1f} pairs/s ({min(speeds):.1f}-{max(speeds):.1f})  "
              f"{median / base:.3f}x off")
    step = statistics.median(times["off"]) / args.steps
    print(f"  one report (scalars + TensorBoard write): {call * 1e3:.2f} ms, {call / step:.2%} of a "
          f"{step * 1e3:.0f} ms step")
    return times


def one_report_seconds(model, loss_fn, optimizer, batch, scaler, device, folder, calls=200):
    """Median seconds of one reported step's own work, timed alone: far less noisy than the difference of two
    training speeds on a shared machine."""
    import time
    out = plain_step(model, loss_fn, {**batch, "images": normalize(batch["images"])},
                     torch.autocast(device.type, enabled=False), scaler)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    reporter, seconds = Reporter(["tensorboard"], folder, every=1), []
    for step in range(1, calls + 1):
        start = time.perf_counter()
        reporter.step(step, step_scalars(out, optimizer, model, loss_fn, grad_norm=norm, pairs_per_s=0.0,
                                         data_wait_share=0.0, skipped_images=0, device=device))
        seconds.append(time.perf_counter() - start)
    reporter.close()
    return statistics.median(seconds)


def main(argv=None):
    return run_entry(run, argv)


if __name__ == "__main__":
    main()
