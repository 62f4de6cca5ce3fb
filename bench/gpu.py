"""CUDA acceptance check: every GPU path of the trainer in one command, as a PASS/FAIL table and a JSON file.

    python -m bench.gpu                          # on a GPU: ResNet50 + a roberta-base-sized tower, a few minutes
    python -m bench.gpu --device cpu             # every check in a tiny form, about two minutes; the tests run it
    python -m bench.gpu --only train,gradients   # a subset of: train gradients torchrun inference memory compile

Random weights, nothing downloaded. On the CPU the autocast rows are SKIP; every other row runs the same code.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import namedtuple
from functools import partial
from types import SimpleNamespace

import torch

from bench.scaling import build
from bench.table import Table
from dataset import normalize, read_captions
from engine.checkpoint import load_checkpoint
from engine.epoch import Trainer, train_one_epoch
from engine.errors import UserError, run_entry
from engine.files import write_json
from engine.optim import build_optimizer
from engine.runtime import DeviceError, amp_context, resolve_device, rng_state, run_process, set_rng_state
from engine.step import cached_step, plain_step
from inference.encoder import Encoder
from inference.export import export
from loss import ContrastiveLoss
from model import batchnorm_layers
from tools import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ("train", "gradients", "torchrun", "inference", "memory", "compile")  # compile last: the slowest
PAD, TRAIN_STEPS, COMPILE_PADDING = 1, 5, (0, 8, 16, 0, 8)  # RoBERTa's padding id; a compiled step per padding
# (fp16 AMP may skip the first steps while the grad scaler backs off: five leave room for the loss to fall)

# What "the same" means. Gradients: |g - g_plain| / |g_plain| over the flattened parameter gradient; fp16 autocast
# rounds activations to 11 bits and chunks pick other kernels (~1e-3 expected), fp32 differs in summation order.
GRAD_TOL = {"fp16 AMP": 1e-2, "fp32": 1e-4}
RECALL_TOL = {"cuda": 2, "cpu": 0}  # eval.py on the device vs the CPU: queries a recall may differ by (TF32 ties)
COSINE_MIN = {"cuda": 0.999, "cpu": 0.99999}  # Encoder features on the device (fp16 autocast) vs on the CPU

# tokens: caption tensor length; micro: chunk of the gradients check; lr: AdamW rate of the few steps (more makes
# Adam's first, sign-like steps raise the loss); memory: (batch, micro-batch, px) of the memory rows; timeout: s/child
Size = namedtuple("Size", "image_model image_size text_layers text_hidden tokens batch micro lr memory timeout")
GPU = Size("resnet50", 224, 12, 768, 32, 32, 8, 1e-4, (192, 48, 224), 240)
CPU = Size("resnet18", 32, 2, 64, 16, 16, 4, 1e-5, (16, 4, 32), 240)


def random_model(ctx, dropout=True):
    """bench.scaling's towers (random weights, learnable temperature) at ctx.size on the device, seeded."""
    torch.manual_seed(0)
    model = build(SimpleNamespace(**ctx.size._asdict(), checkpointing=False), ctx.device)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and not dropout:
            m.p = 0.0  # RoBERTa's attention reads its dropout rate from these modules too
    return model


def random_batch(size, pad=0, device=None):
    """A loader's batch: uint8 noise images (B, 3, S, S), random captions (B, T + pad) of T/2..T real tokens (`pad`
    only adds padding columns). With `device`: there, images normalised to float as plain_step takes them."""
    g = torch.Generator().manual_seed(0)
    b, t = size.batch, size.tokens
    images = torch.randint(0, 256, (b, 3, size.image_size, size.image_size), dtype=torch.uint8, generator=g)
    mask = (torch.arange(t + pad) < torch.randint(t // 2, t + 1, (b, 1), generator=g)).long()  # (B, T + pad)
    ids = torch.nn.functional.pad(torch.randint(3, 50000, (b, t), generator=g), (0, pad), value=PAD)  # in the vocab
    ids[:, 0] = 0  # <s>
    batch = {"images": images, "input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask,
             "image_ids": torch.arange(b)}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["images"] = normalize(batch["images"].contiguous(memory_format=torch.channels_last))
    return batch


def child(ctx, argv, env=None):
    """Run `argv` in the repo root: its output, or a RuntimeError whose first line is the last of its stderr."""
    done = run_process(argv, ctx.size.timeout, cwd=REPO, env=env)  # at a timeout, torchrun's workers stop too
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(f"exit status {done.returncode}: {lines[-1][:250]}\n" + "\n".join(lines[-40:]))
    return done.stdout


def train_steps(ctx, amp_dtype, batches, backend=None, micro=None, replay=False):
    """One train_one_epoch call (one step) per batch as train.py trains, after compiling as it does with `backend`,
    with gradient caching in chunks of `micro` when set. `replay`: also measure `replay_cosine` afterwards."""
    model, loss_fn = random_model(ctx), ContrastiveLoss()
    if backend:
        model.image.compile(backend=backend)
        model.text.compile(backend=backend, dynamic=True)  # as train.py: caption length varies per batch
    amp = amp_context(ctx.device, amp_dtype is not None, amp_dtype or "float16")
    cfg = {"learning-rate": ctx.size.lr, "weight-decay": 0.05, "warmup-steps": 0, "use-amp": amp_dtype is not None,
           "amp-dtype": amp_dtype or "float16"}
    trainer = Trainer(model, loss_fn, *build_optimizer(model, cfg, len(batches), ctx.device), amp, ctx.device,
                      micro_batch=micro, grad_clip=1.0)
    losses, seconds = [], []
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        losses.append(train_one_epoch(trainer, [dict(batch, skipped=0)], step, show_progress=False)["loss"])
        seconds.append(round(time.perf_counter() - start, 3))
    ok, measured = bool(torch.isfinite(torch.tensor(losses)).all()) and losses[-1] < losses[0], ""
    values = {"losses": losses, "step_seconds": seconds}
    if replay:
        values["replay_cosine"] = cos = replay_cosine(ctx, model, amp, micro)
        ok, measured = ok and cos >= COSINE_MIN[ctx.dev], f"; dropout replay cosine {cos:.6f}"
    return (ok, f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; steps {seconds[0]:.1f} s, then {seconds[-1]:.2f} s"
            + measured, "finite, last < first" + f"; replay >= {COSINE_MIN[ctx.dev]}" * replay, values)


def replay_cosine(ctx, model, amp, rows):
    """Least cosine between the features of a no-grad forward and of a forward with grad after restoring the RNG,
    dropout on: cached_step's two passes, which must draw the same dropout masks (compiled, they run two graphs)."""
    batch = random_batch(ctx.size._replace(batch=rows), device=ctx.device)
    saved = rng_state()
    with torch.no_grad(), amp:
        first = model(batch["images"], batch["input_ids"], batch["attention_mask"])[:2]
    set_rng_state(saved)
    with amp:
        second = model(batch["images"], batch["input_ids"], batch["attention_mask"])[:2]
    return min(float(torch.nn.functional.cosine_similarity(a.float(), b.detach().float()).min())
               for a, b in zip(first, second, strict=True))


def check_train(ctx, table):
    cpu = None if ctx.cuda else "CPU: autocast is CUDA-only here (train.py ignores use-amp)"
    no_bf16 = cpu or (None if torch.cuda.is_bf16_supported() else "this GPU has no bfloat16")
    for precision, dtype, skip in (("fp32", None, None), ("fp16 AMP + GradScaler", "float16", cpu),
                                   ("bf16 AMP", "bfloat16", no_bf16)):
        table.add("train", f"{TRAIN_STEPS} steps on one batch of {ctx.size.batch}", precision, skip or (
            lambda dtype=dtype: train_steps(ctx, dtype, [random_batch(ctx.size)] * TRAIN_STEPS)))


def check_compile(ctx, table):
    amp = "float16" if ctx.cuda else None
    table.add("compile", f"{len(COMPILE_PADDING)} steps, padding {COMPILE_PADDING}, backend {ctx.backend}",
              ctx.precision, lambda: train_steps(ctx, amp, [random_batch(ctx.size, pad) for pad in COMPILE_PADDING],
                                                 ctx.backend))
    small = SimpleNamespace(**{**vars(ctx), "size": CPU})  # the tiny towers: two more graphs compile in seconds
    table.add("compile", f"{TRAIN_STEPS} cached steps, micro {CPU.micro} of {CPU.batch}, small towers; replay",
              ctx.precision, lambda: train_steps(small, amp, [random_batch(CPU)] * TRAIN_STEPS, ctx.backend,
                                                 CPU.micro, replay=True))


def check_gradients(ctx, table):
    """Dropout off and BatchNorm frozen on the batch's own statistics: plain, cached (per-chunk statistics would be
    another function) and checkpointed steps then compute one function."""
    amp, loss_fn, tol = amp_context(ctx.device, ctx.cuda), ContrastiveLoss(), GRAD_TOL[ctx.precision]
    model, batch = random_model(ctx, dropout=False), random_batch(ctx.size, device=ctx.device)
    for m in batchnorm_layers(model):  # running statistics := this batch's (momentum None: a plain average)
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad(), amp:
        model(batch["images"], batch["input_ids"], batch["attention_mask"])
    model.freeze(batchnorm=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(step):  # (P,) flattened and unscaled, and the loss
        model.zero_grad(set_to_none=True)
        scaler = torch.amp.GradScaler(ctx.device.type, init_scale=2.0 ** 10, enabled=ctx.cuda)  # 2**16 may overflow
        loss = step(scaler)["loss"].item()
        return torch.cat([p.grad.float().flatten() for p in params]) / scaler.get_scale(), loss

    def compare(step):
        flat, loss = gradient(step)
        err = ((flat - reference).norm() / reference.norm()).item()  # nan (not finite) fails too
        return (err <= tol, f"relative error {err:.1e} (loss {loss:.4f} vs {reference_loss:.4f})", f"<= {tol:.0e}",
                {"relative_error": err, "tolerance": tol, "loss": loss, "plain_loss": reference_loss})

    plain = partial(plain_step, model, loss_fn, batch, amp)  # each takes the grad scaler
    reference, reference_loss = gradient(plain)
    table.add("gradients", f"cached_step, micro {ctx.size.micro} of {ctx.size.batch} = plain_step", ctx.precision,
              lambda: compare(partial(cached_step, model, loss_fn, batch, ctx.size.micro, amp)))
    model.set_grad_checkpointing(True)  # the last use of this model
    table.add("gradients", "gradient checkpointing = plain_step", ctx.precision, lambda: compare(plain))


def demo_run(ctx):
    """Demo data and one epoch of train.py under torchrun on the device, made on the first call; returns the paths.
    That epoch trains without AMP: the resume then turns fp16 AMP on, as a user may (the scaler starts afresh)."""
    d = ctx.demo
    if not d:
        d.update({k: os.path.join(ctx.folder, k) for k in ("train", "valid", "text")},
                 last=os.path.join(ctx.folder, "run", "last.pt"), best=os.path.join(ctx.folder, "run", "best.pt"))
        demo.write_split(d["valid"], random.Random(0).sample(demo.all_scenes(), 24), 1, random.Random(1))  # not 576
        demo.make_demo(d["train"], d["valid"], d["text"], train_images=48, captions_per_image=2)
        torchrun(ctx, "--epochs", "1", "--use-amp", "false")
        d["epoch0"] = load_checkpoint(d["last"])["log_line"]
    return d


def torchrun(ctx, *extra):
    """train.py under torch.distributed.run, one process, on the demo data; returns its output. Each `--key value`
    pair of `extra` replaces the default of its key (the command line refuses a key given twice)."""
    d = ctx.demo
    args = {"--train-root": d["train"], "--valid-root": d["valid"], "--text-model": d["text"], "--demo-data": "false",
            "--select-images": "8", "--batch-size": "16", "--warmup-steps": "2", "--num-workers": "0",
            "--device": ctx.dev, "--use-amp": str(ctx.cuda).lower(), "--last-path": d["last"],
            "--best-path": d["best"]}
    args.update(zip(extra[::2], extra[1::2], strict=True))
    return child(ctx, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                       *entry("train.py", "demo.yaml"), *(token for pair in args.items() for token in pair)])


def entry(script, config):
    """The start of a command line for an entry script of the repo with a shipped config."""
    return [os.path.join(REPO, script), "--config", os.path.join(REPO, "configs", config)]


def check_torchrun(ctx, table):
    def train_and_resume():
        demo_run(ctx)
        out = torchrun(ctx, "--epochs", "2", "--load-checkpoint", "true", "--load-path", ctx.demo["last"])
        first, second = ctx.demo["epoch0"], load_checkpoint(ctx.demo["last"])["log_line"]
        return (first["epoch"] == 0 and second["epoch"] == 1 and "resumed from" in out,
                f"epoch 0 loss {first['train']['loss']:.3f}; resumed, epoch 1 loss {second['train']['loss']:.3f}",
                "last.pt at epoch 0, then 'resumed from' and epoch 1", {"epochs": [first, second]})

    def evals_agree():
        runs = {"first": ctx.dev, "second": "cpu"}  # on the CPU: two processes, which must agree exactly
        paths = {k: os.path.join(ctx.folder, f"eval-{k}-{d}.json") for k, d in runs.items()}
        for k, d in runs.items():
            child(ctx, [sys.executable, *entry("eval.py", "demo-eval.yaml"), "--model-path", demo_run(ctx)["best"],
                        "--valid-root", ctx.demo["valid"], "--num-workers", "0", "--device", d, "--output", paths[k]])
        a, b = (json.load(open(p, encoding="utf-8")) for p in paths.values())
        # queries per direction (texts shared by several images are one query)
        n = {"image_to_text": a["num_images"], "text_to_image": a.get("num_text_queries", a["num_captions"])}
        gaps = {f"{d} {k}": round(abs(a[d][k] - b[d][k]) * n[d], 3) for d in n for k in ("R@1", "R@5", "R@10")}
        worst = max(gaps.values())
        return (worst <= RECALL_TOL[ctx.dev], f"largest recall gap {worst:g} queries; rsum {a['rsum']:.4f} vs "
                f"{b['rsum']:.4f}", f"<= {RECALL_TOL[ctx.dev]} queries", {"gaps_in_queries": gaps, "evals": [a, b]})

    table.add("torchrun", f"train.py, 1 process on {'nccl' if ctx.cuda else 'gloo'}: train, resume",
              "fp32, resumed in fp16 AMP" if ctx.cuda else ctx.precision, train_and_resume)
    table.add("torchrun", f"eval.py {ctx.dev} = eval.py cpu", "fp32", evals_agree)


def check_inference(ctx, table):
    def encoders_agree():
        best, valid = demo_run(ctx)["best"], ctx.demo["valid"]
        pairs = read_captions(valid)
        images, texts = sorted({os.path.join(valid, "images", n) for n, _ in pairs}), [c for _, c in pairs]
        here, cpu = Encoder(best, ctx.dev), Encoder(best, "cpu")
        cos = min(float((a * b).sum(-1).min()) for a, b in ((here.encode_images(images), cpu.encode_images(images)),
                                                           (here.encode_texts(texts), cpu.encode_texts(texts))))
        return (cos >= COSINE_MIN[ctx.dev], f"least cosine {cos:.6f} over {len(images)} images, {len(texts)} "
                f"captions", f">= {COSINE_MIN[ctx.dev]}", {"least_cosine": cos})

    def onnx():  # export needs the CPU: the device-written checkpoint must load there
        paths = export(Encoder(demo_run(ctx)["best"], "cpu"), os.path.join(ctx.folder, "onnx"))
        kib = {k: os.path.getsize(p) // 1024 for k, p in paths.items()}
        return min(kib.values()) > 0, f"image {kib['image']} KiB, text {kib['text']} KiB", "both graphs written", paths

    table.add("inference", f"Encoder {ctx.dev} = Encoder cpu", ctx.precision, encoders_agree)
    table.add("inference", f"ONNX export of the {ctx.dev}-trained checkpoint", "fp32", onnx)


def check_memory(ctx, table):
    (batch, micro, side), s = ctx.size.memory, ctx.size
    base = [sys.executable, "-m", "bench.scaling", "--child", "--device", ctx.dev, "--image-model", s.image_model,
            "--image-size", str(side), "--text-layers", str(s.text_layers), "--text-hidden", str(s.text_hidden),
            "--tokens", str(s.tokens), "--batch", str(batch)] + ["--amp"] * ctx.cuda
    for item, extra in ((f"plain, batch {batch}", ["--micro", "0"]),
                        (f"micro-batch {micro}, batch {batch}", ["--micro", str(micro)]),
                        (f"gradient checkpointing, batch {batch}", ["--micro", "0", "--checkpointing"])):
        def measure(extra=extra):
            out = child(ctx, base + extra, dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"))  # as bench.scaling
            r = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
            return (r["samples_per_s"] > 0 and r["total_peak_mib"] > 0, f"{r['samples_per_s']:.1f} samples/s, "
                    f"peak {r['total_peak_mib']:.0f} MiB (step +{r['step_peak_mib']:.0f})", "measured",
                    {**r, "device": ctx.card, "image_size": side})
        table.add("memory", f"{item}, {side} px on {ctx.card}", ctx.precision, measure)


RUNNERS = {name: globals()[f"check_{name}"] for name in CHECKS}  # --only name -> check_name(ctx, table)


def run(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: every check in a tiny form")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--output", default="bench_gpu.json", help="JSON file: every row with its measured values")
    args = p.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    if not only or any(c not in CHECKS for c in only):
        p.error(f"--only takes a comma-separated subset of {','.join(CHECKS)}; got {args.only!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA GPU is visible; run this on a GPU machine, or "
                          "pass --device cpu for the tiny CPU form")
    device = resolve_device(args.device)
    cuda = torch.backends.cudnn.benchmark = device.type == "cuda"  # cuDNN autotuning on CUDA, as train.py
    card, start, size = torch.cuda.get_device_name(device) if cuda else "cpu", time.perf_counter(), GPU if cuda else CPU

    def save(rows, finished=False):  # after every row: "finished" false means the run stopped before its end
        result = {"device": card, "torch": torch.__version__, "cuda": torch.version.cuda, "size": size._asdict(),
                  "finished": finished, "passed": finished and all(r["status"] != "FAIL" for r in rows),
                  "seconds": round(time.perf_counter() - start, 1), "rows": rows}
        write_json(args.output, result)
        return result

    table = Table(save)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as folder:
        # precision: of the gradients, compile, torchrun and encoder rows (fp16 autocast on CUDA, as train.yaml)
        ctx = SimpleNamespace(device=device, dev=device.type, cuda=cuda, size=size, folder=folder, card=card, demo={},
                              precision="fp16 AMP" if cuda else "fp32",
                              backend="inductor" if cuda else "eager")  # eager: inductor compiles for minutes on a CPU
        for check in only:  # a row "(setup)" appears only when a check's shared setup fails
            table.add(check, "(setup)", "", lambda check=check: RUNNERS[check](ctx, table))
    result = save(table, finished=True)
    failed = [f"{r['check']}: {r['item']} [{r['precision']}]" for r in table if r["status"] == "FAIL"]
    print(f"\n{table.format()}\n\n{len(table) - len(failed)} of {len(table)} rows passed or skipped in "
          f"{result['seconds']:.0f} s on {card}; written to {args.output}")
    if failed:
        raise UserError(f"{len(failed)} row(s) FAILED: {'; '.join(failed)}; see the table above and {args.output}")
    return result


def main(argv=None):
    return run_entry(run, argv)


if __name__ == "__main__":
    main()
