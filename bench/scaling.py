"""Peak memory and speed of one training step: plain, gradient-cached (micro-batches), gradient checkpointing.

    python -m bench.scaling                                    # CPU-sized model, batch 256 vs micro 32
    python -m bench.scaling --device cuda --image-model resnet50 --text-layers 12 --text-hidden 768 \
        --image-size 224 --batch 192 --micro 48 --amp           # the reference towers on a GPU

Each configuration runs in its own process. After a warm-up step (which allocates the optimizer state) the
peak is reset and one more step is measured: on CUDA with torch.cuda.max_memory_allocated, on the CPU as the
rise of the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs) over what it held
before the step, with glibc told to hand large blocks back to the OS as soon as they are freed.
Weights are random: memory and speed do not depend on them.
"""
import argparse
import json
import os
import subprocess
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--image-model", default="resnet18", help="torchvision ResNet (random weights)")
    p.add_argument("--image-size", type=int, default=128, help="input side in pixels")
    p.add_argument("--text-layers", type=int, default=4, help="layers of the random RoBERTa")
    p.add_argument("--text-hidden", type=int, default=256, help="hidden width of the random RoBERTa")
    p.add_argument("--tokens", type=int, default=24, help="caption length in tokens")
    p.add_argument("--batch", type=int, default=256, help="the large contrastive batch")
    p.add_argument("--micro", type=int, default=32, help="micro-batch for gradient caching")
    p.add_argument("--amp", action="store_true", help="CUDA fp16 autocast")
    p.add_argument("--plain-large", action="store_true", help="also run the large batch without caching")
    p.add_argument("--output", default="bench_scaling.json", help="JSON results file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --help or a mistyped option is answered before torch and transformers load (seconds, hundreds of MB): the command
# line is checked here, and the heavy imports below run only once it parses.
if __name__ == "__main__":
    parse_args(sys.argv[1:])

import torch

from engine.files import write_json
from engine.optim import param_groups
from engine.runtime import amp_context
from engine.step import cached_step, plain_step
from loss import ContrastiveLoss
from model import RetrievalModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build(args, device):
    from transformers import RobertaConfig, RobertaModel
    config = RobertaConfig(vocab_size=50265, hidden_size=args.text_hidden, num_hidden_layers=args.text_layers,
                           num_attention_heads=max(1, args.text_hidden // 64),
                           intermediate_size=4 * args.text_hidden, max_position_embeddings=514)
    text = RobertaModel(config, add_pooling_layer=False)
    model = RetrievalModel(text, args.image_model, pretrained=False, learnable_temperature=True)
    if args.checkpointing:
        model.set_grad_checkpointing(True)
    return model.to(device).to(memory_format=torch.channels_last).train()


def one_config(args):
    """Runs inside a child process: returns a dict of measurements for one configuration."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args, device)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    amp = amp_context(device, args.amp, "float16")
    loss_fn = ContrastiveLoss()
    b, t = args.batch, args.tokens
    batch = {"images": torch.randn(b, 3, args.image_size, args.image_size, device=device)
             .contiguous(memory_format=torch.channels_last),
             "input_ids": torch.randint(3, 50000, (b, t), device=device),
             "attention_mask": torch.ones(b, t, dtype=torch.long, device=device),
             "image_ids": torch.arange(b, device=device)}

    def step():
        opt.zero_grad(set_to_none=True)
        if args.micro and args.micro < b:
            cached_step(model, loss_fn, batch, args.micro, amp, scaler)
        else:
            plain_step(model, loss_fn, batch, amp, scaler)
        scaler.step(opt)
        scaler.update()

    step()  # warm-up: optimizer state, allocator caches
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size to the current one
        before = rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss_kib("VmHWM") * 1024
    seconds = time.perf_counter() - start
    return {"batch": b, "micro": args.micro, "checkpointing": args.checkpointing, "step_s": seconds,
            "samples_per_s": b / seconds, "step_peak_mib": (peak - before) / 2**20,
            "total_peak_mib": peak / 2**20}


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(one_config(args)))
        return None

    base = [sys.executable, "-m", "bench.scaling", "--child", "--device", args.device, "--image-model",
            args.image_model, "--image-size", str(args.image_size), "--text-layers", str(args.text_layers),
            "--text-hidden", str(args.text_hidden), "--tokens", str(args.tokens)] + (["--amp"] if args.amp else [])
    runs = {f"plain batch {args.micro}": ["--batch", str(args.micro), "--micro", "0"],
            f"batch {args.batch}, micro-batch {args.micro}": ["--batch", str(args.batch), "--micro", str(args.micro)],
            f"plain batch {args.micro} + grad checkpointing": ["--batch", str(args.micro), "--micro", "0",
                                                             "--checkpointing"],
            f"batch {args.batch}, micro {args.micro} + checkpointing": ["--batch", str(args.batch), "--micro",
                                                                      str(args.micro), "--checkpointing"]}
    if args.plain_large:
        runs[f"plain batch {args.batch}"] = ["--batch", str(args.batch), "--micro", "0"]
    # A fixed mmap threshold makes glibc return every large tensor's memory to the OS when it is freed, so the
    # resident set follows the live tensors (by default freed blocks are kept and reused, hiding the peak).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    results = {}
    for name, extra in runs.items():
        done = subprocess.run(base + extra, capture_output=True, text=True, env=env, cwd=REPO)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-1500:]}", file=sys.stderr)
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:<42} step peak {r['step_peak_mib']:>8.0f} MiB   {r['samples_per_s']:>7.1f} samples/s",
              flush=True)
    ref = results.get(f"plain batch {args.micro}")
    if ref:
        print("\nstep peak memory relative to plain batch", args.micro)
        for name, r in results.items():
            r["memory_vs_plain_micro"] = r["step_peak_mib"] / ref["step_peak_mib"]
            print(f"  {name:<42} {r['memory_vs_plain_micro']:.2f}x")
    info = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args)}
    write_json(args.output, {"machine": info, "results": results})
    print(f"\nwritten to {args.output}")
    return results


if __name__ == "__main__":
    main()
