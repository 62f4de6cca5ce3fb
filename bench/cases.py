"""The measurements behind `python -m bench`: data pipeline, training step and encoding, each next to its naive
baseline, on data generated here. Recall lives in bench/recall.py.
"""
import copy
import itertools
import os
import random
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tools.demo import all_scenes, distinct_captions, write_captions_csv

MAX_LENGTH = 64  # configs/train.yaml's caption length, capped by the model like train.py does

# ---------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cycle(fn, items):
    """A no-argument function that calls `fn` on the next item, round and round."""
    it = itertools.cycle(items)
    return lambda: fn(next(it))


def alternate(fns, repeats, device, warmup=1):
    """Seconds per call of each function, interleaved round by round (the order rotating, so none always goes
    first); `warmup` untimed rounds before."""
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times



# ---------------------------------------------------------------- generated data

def make_photo(rng, width=640, height=480):
    """Smooth random colour fields and blobs plus sensor-like grain: compresses like a photo, not a flat colour."""
    def field(h, w, amount):
        coarse = rng.uniform(0, 255, (h, w, 3)).astype(np.uint8)
        smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        return amount * (np.asarray(smooth, dtype=np.float32) - 128)
    pixels = 128 + field(6, 8, 1.0) + field(48, 64, 0.35) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


class Workspace:
    """Generated inputs, made on first use in a temporary folder: COCO-like JPEGs, captions, a text model."""

    def __init__(self, folder, images, captions_per_image, text_model, text_size, seed=0):
        self.folder, self.images, self.per_image = folder, images, captions_per_image
        self.rng = random.Random(seed)
        # the demo's caption generator, `captions_per_image` different captions of a random scene per image
        scenes = all_scenes()
        self.captions = [c for _ in range(images)
                         for c in distinct_captions(self.rng.choice(scenes), captions_per_image, self.rng)]
        self._text_model, self.text_size = text_model, text_size
        self._photos = self._resized = None

    @property
    def photos(self):
        """Dataset folder of 640x480 JPEGs (quality 90) with `captions_per_image` captions each."""
        if self._photos is None:
            self._photos = os.path.join(self.folder, "photos")
            np_rng = np.random.default_rng(self.rng.randrange(2**32))
            self._write(self._photos, lambda i, path: make_photo(np_rng).save(path, quality=90))
        return self._photos

    @property
    def resized(self):
        """The same images with the short side at 256, as `prepare_data.py --resize 256` writes them."""
        if self._resized is None:
            self._resized = os.path.join(self.folder, "resized256")
            source = self.photos

            def shrink(i, path):
                with Image.open(os.path.join(source, "images", f"{i:05d}.jpg")) as img:
                    w, h = img.size
                    new = (256, round(h * 256 / w)) if w <= h else (round(w * 256 / h), 256)
                    img.convert("RGB").resize(new, Image.Resampling.BICUBIC).save(path, quality=90)
            self._write(self._resized, shrink)
        return self._resized

    def _write(self, root, save):
        os.makedirs(os.path.join(root, "images"))
        for i in range(self.images):
            save(i, os.path.join(root, "images", f"{i:05d}.jpg"))
        write_captions_csv(os.path.join(root, "captions.csv"),
                           [(f"{i // self.per_image:05d}.jpg", c) for i, c in enumerate(self.captions)])

    @property
    def text_label(self):
        if self._text_model is None or self._text_model.startswith(self.folder):
            return "random RoBERTa (hidden {}, {} layers)".format(*self.text_size)
        return self._text_model

    @property
    def text_model(self):
        """The text model folder: the one asked for, else a small random RoBERTa made here."""
        if self._text_model is None:
            from tools.demo import write_text_model
            self._text_model = os.path.join(self.folder, "text-model")
            hidden, layers = self.text_size
            write_text_model(self._text_model, self.captions, hidden=hidden, layers=layers)
        return self._text_model


def build(ws, image_model, device):
    """The model (random weights) with configs/train.yaml's settings, its tokenizer and caption length limit."""
    from model import build_model
    cfg = {"image-model": image_model, "text-model": ws.text_model, "load-pretrained": False, "temperature": 0.07,
           "learnable-temperature": False, "text-pooling": "first", "weight-decay": 0.05, "learning-rate": 5e-6,
           "warmup-steps": 1000, "use-amp": False, "amp-dtype": "float16", "grad-clip": 1.0}
    model = build_model(cfg, pretrained=False).to(device).to(memory_format=torch.channels_last)
    tokenizer, max_length = text_setup(ws)
    return model, tokenizer, max_length, cfg


# ---------------------------------------------------------------- 1. data pipeline

def float_transform(size):
    """The baseline's transform: the training crop and jitter, then the usual ToTensor + Normalize, so float32
    leaves the worker."""
    from torchvision import transforms as T
    from dataset import image_transform
    from model import IMAGENET_MEAN, IMAGENET_STD
    crop, jitter, _ = image_transform(size, augment=True).transforms
    return T.Compose([crop, jitter, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def naive_pairs(root, transform):
    """The baseline loader dataset: same rows, but a full-size `Image.open(p).convert('RGB')`."""
    from dataset import PairDataset

    class NaivePairs(PairDataset):
        def __getitem__(self, i):
            name, caption = self.pairs[i]
            image = Image.open(os.path.join(self.root, "images", name)).convert("RGB")
            return self.transform(image), caption, self.image_ids[i], 0

    return NaivePairs(root, transform)


def bench_data(ws, args, device, report):
    """Samples per second from loader to model input on the device: the naive loader yields float32 after
    decoding, cropping and jittering in the worker; the real one decodes at the crop's scale, crops to uint8 in
    the worker, and jitters (`engine.augment.color_jitter`) and normalises the batch on the device."""
    from dataset import PairCollate, PairDataset, image_transform, make_loader, normalize, resolve_workers
    from engine.augment import color_jitter
    tokenizer, max_length = text_setup(ws)
    size = 224  # the issue states its data target at 224 output, whatever the model size
    transform = image_transform(size, augment=True, jitter=False)  # decode, crop, resize only
    sets = {"naive": naive_pairs(ws.photos, float_transform(size)),
            "real": PairDataset(ws.photos, transform, strict=False, min_size=size, random_crop=True),
            "resized": PairDataset(ws.resized, transform, strict=False, min_size=size, random_crop=True)}
    collate = PairCollate(tokenizer, max_length)
    loaders = {k: make_loader(d, args.batch_size, args.workers, device, shuffle=True, collate_fn=collate)
               for k, d in sets.items()}

    def epoch(loader, finish):
        return lambda: sum(finish(batch["images"].to(device, non_blocking=True)).shape[0] for batch in loader)

    def on_device(images):
        return normalize(color_jitter(images))

    fns = {k: epoch(v, (lambda x: x) if k == "naive" else on_device) for k, v in loaders.items()}
    fns["loader alone"] = epoch(loaders["real"], lambda x: x)  # what the host does when a GPU jitters
    times = alternate(fns, args.repeats, device)
    del loaders  # stops the persistent workers
    # the device-side jitter alone, on whole batches of the real crops
    batch = torch.stack([sets["real"][i][0] for i in range(min(args.batch_size, len(sets["real"])))]).to(device)
    jitter_times = alternate({"jitter": lambda: color_jitter(batch), "normalize": lambda: normalize(batch)},
                             args.repeats * 3, device)
    n = len(sets["real"])
    workers = resolve_workers(args.workers)
    label = f"640x480 JPEG -> {size}, {workers} worker(s), batch {args.batch_size}"
    base = report.add("data", f"naive Image.open().convert(), jitter in worker, float32 out ({label})", "samples/s",
                      [n / t for t in times["naive"]], is_baseline=True)
    report.add("data", "real PairDataset: crop-scale decode, crop only in worker, uint8 out; jitter + normalize "
               "on device", "samples/s", [n / t for t in times["real"]], base, target=">= 3x naive",
               check=lambda r: r["ratio"] >= 3)
    report.add("data", "real PairDataset, images pre-resized to 256", "samples/s",
               [n / t for t in times["resized"]], base)
    report.add("data", "real PairDataset, loader alone (jitter + normalize left to a GPU)", "samples/s",
               [n / t for t in times["loader alone"]], base)
    report.add("data", f"engine.augment.color_jitter alone, batch {len(batch)} at {size} px on {device.type}", "ms",
               [1000 * t for t in jitter_times["jitter"]], lower_is_better=True)
    report.add("data", "dataset.normalize alone, same batch, for scale", "ms",
               [1000 * t for t in jitter_times["normalize"]], lower_is_better=True)
    kb = statistics.mean(os.path.getsize(os.path.join(ws.photos, "images", f)) / 1024
                         for f in os.listdir(os.path.join(ws.photos, "images")))
    report.notes.append(f"data: {ws.images} generated 640x480 JPEGs (quality 90, {kb:.0f} KB on average), "
                        f"{ws.per_image} captions each, {n} pairs per epoch; augment on (training transforms); "
                        f"timed up to the model's float input on {device.type}; on the CPU the batch jitter runs "
                        f"in the main process while the workers prepare the next batches")
    return data_stages(ws, size, tokenizer, max_length, args.batch_size)


def per_sample_ms(fn, items, repeats=3):
    """Median over `repeats` passes of this thread's CPU time per item (steadier than the wall clock on a busy
    machine), and the outputs of the last pass."""
    runs = []
    for _ in range(repeats):
        start = time.thread_time()
        out = [fn(x) for x in items]
        runs.append((time.thread_time() - start) / len(items) * 1000)
    return statistics.median(runs), out


def data_stages(ws, size, tokenizer, max_length, batch_size, count=16):
    """Where a sample's time goes, one stage at a time in one thread, as inside a loader worker. The naive path
    decodes at full size with Pillow, crops, jitters and ends in float32 (ToTensor + Normalize, a 4-byte
    collate); the real one decodes at the crop's scale (torchvision's decoder for these 640x480 JPEGs), crops
    to uint8 and stops. The colour jitter and `normalize` of the real path run on the device, outside the
    workers, and are listed apart."""
    from torchvision import transforms as T
    from dataset import image_transform, load_crop_source, normalize, open_image, tokenize
    from engine.augment import color_jitter
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run with one thread
    try:
        n = min(count, ws.images)
        paths = [os.path.join(ws.photos, "images", f"{i:05d}.jpg") for i in range(n)]
        small = [os.path.join(ws.resized, "images", f"{i:05d}.jpg") for i in range(n)]
        crop, jitter, _ = image_transform(size, augment=True).transforms  # the naive worker's
        crop_only = image_transform(size, augment=True, jitter=False)  # the real worker's
        to_float = T.Compose(float_transform(size).transforms[2:])  # ToTensor + Normalize
        name = type(crop).__name__
        ms = {}
        naive_ms, full = per_sample_ms(lambda p: Image.open(p).convert("RGB"), paths)
        real_ms, decoded = per_sample_ms(lambda p: load_crop_source(p, size), paths)
        ms["decode 640x480, Pillow full size (naive)"] = naive_ms
        ms["decode 640x480, Pillow draft at 1/2 (the eval rule; upsamples crops)"], _ = per_sample_ms(
            lambda p: open_image(p, True, size), paths)
        ms[f"decode 640x480, load_crop_source: {type(decoded[0]).__name__} (real)"] = real_ms
        ms["decode pre-resized 256, load_crop_source (real)"], resized = per_sample_ms(
            lambda p: load_crop_source(p, size), small)
        crop_naive, cropped = per_sample_ms(crop, full)
        crop_real, pixels = per_sample_ms(crop_only, decoded)
        ms[f"{name} from {'x'.join(map(str, full[0].size))} PIL (naive)"] = crop_naive
        ms[f"{name} from {decoded[0].shape[2]}x{decoded[0].shape[1]} uint8 tensor, no float copy (real)"] = crop_real
        ms[f"{name} from pre-resized (real)"], _ = per_sample_ms(crop_only, resized)
        ms["ColorJitter on PIL (naive, in the worker)"], jittered = per_sample_ms(jitter, cropped)
        ms["ToTensor + Normalize (naive, float32)"], floats = per_sample_ms(to_float, jittered)
        captions = ws.captions[:batch_size]
        ms["tokenize (per caption, in a batch; both)"] = per_sample_ms(
            lambda c: tokenize(tokenizer, c, max_length), [captions])[0] / len(captions)
        # a worker hands a batch over by copying it into fresh shared memory: page faults, not the copy, dominate
        for label, x in (("naive, float32", floats), ("real, uint8", pixels)):
            ms[f"collate: stack + shared memory ({label})"] = per_sample_ms(
                lambda b: torch.stack(b).share_memory_(), [x[:1] * batch_size])[0] / batch_size
        batch = torch.stack((pixels * batch_size)[:batch_size])  # (B, 3, size, size) uint8
        ms["color_jitter on the batch (real, on the device: not in a worker)"] = per_sample_ms(
            color_jitter, [batch])[0] / batch_size
        ms["normalize (real, on the device: not in a worker)"] = per_sample_ms(normalize, [batch])[0] / batch_size
    finally:
        torch.set_num_threads(threads)
    shared = ms["tokenize (per caption, in a batch; both)"]
    naive = (naive_ms + crop_naive + ms["ColorJitter on PIL (naive, in the worker)"] + shared
             + ms["ToTensor + Normalize (naive, float32)"] + ms["collate: stack + shared memory (naive, float32)"])
    real = real_ms + crop_real + shared + ms["collate: stack + shared memory (real, uint8)"]
    device = (ms["color_jitter on the batch (real, on the device: not in a worker)"]
              + ms["normalize (real, on the device: not in a worker)"])
    return {"ms_per_sample": ms, "naive_image_ms": naive, "real_image_ms": real, "real_device_ms": device,
            "ratio_from_stages": naive / real,
            "ratio_if_after_crop_were_free": (naive_ms + crop_naive) / (real_ms + crop_real)}


def text_setup(ws):
    """Tokenizer and caption length limit, as train.py sets them up (max-length 64, capped by the model)."""
    from transformers import AutoConfig
    from model import load_tokenizer, text_length_limit
    tokenizer = load_tokenizer(ws.text_model)  # first: a wrong path becomes a one-line ModelError
    limit = text_length_limit(AutoConfig.from_pretrained(ws.text_model))
    return tokenizer, min(MAX_LENGTH, limit)


# ---------------------------------------------------------------- 2. training step

def bench_train(ws, args, device, report, variants):
    from engine.epoch import Trainer, train_one_epoch
    from engine.optim import build_optimizer
    from engine.runtime import amp_context
    from loss import ContrastiveLoss
    model, tokenizer, max_length, cfg = build(ws, args.image_model, device)
    cfg.update({"image-size": args.image_size, "batch-size": args.batch_size})
    from dataset import normalize
    batches = random_batches(ws, tokenizer, max_length, args, device, steps=args.steps)  # uint8 images
    floats = [{**b, "images": normalize(b["images"])} for b in batches]  # the bare step gets model input
    runs = args.repeats * args.steps
    loss_fn = ContrastiveLoss(0, 1)
    for label, (use_amp, dtype), compiled in variants:
        net = torch.compile(model) if compiled else model
        optimizer, scheduler, scaler = build_optimizer(model, {**cfg, "use-amp": use_amp, "amp-dtype": dtype},
                                                       10**6, device)
        context = amp_context(device, use_amp, dtype)
        trainer = Trainer(net, loss_fn, optimizer, scheduler, scaler, context, device, grad_clip=cfg["grad-clip"])
        bare_opt = torch.optim.AdamW(model.parameters(), lr=cfg["learning-rate"])
        bare_scaler = torch.amp.GradScaler(device.type, enabled=scaler.is_enabled())

        def real(b):  # one step through the real loop
            train_one_epoch(trainer, [dict(b)], 0, show_progress=False)

        def bare(b):
            net.train()
            bare_opt.zero_grad(set_to_none=True)
            with context:
                img, txt, scale = net(b["images"], b["input_ids"], b["attention_mask"])
                logits = scale * img @ txt.t()  # (B, B)
                target = torch.arange(logits.shape[0], device=device)
                loss = F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)
            bare_scaler.scale(loss).backward()
            bare_scaler.step(bare_opt)
            bare_scaler.update()

        # one step per timed run, the two kinds alternating, so a burst of load hits both alike
        times = alternate({"bare": cycle(bare, floats), "real": cycle(real, batches)}, runs, device, warmup=2)
        base = report.add("train", f"bare fwd+bwd+AdamW ({label})", "samples/s",
                          [args.batch_size / t for t in times["bare"]], is_baseline=True)
        report.add("train", f"train_one_epoch step ({label})", "samples/s",
                   [args.batch_size / t for t in times["real"]], base, target=">= 0.90x bare",
                   check=lambda r: r["ratio"] >= 0.9)
    report.notes.append(f"train: {args.image_model} + {ws.text_label}, image {args.image_size}px, "
                        f"batch {args.batch_size}, {runs} single-step runs each, random tensors already on "
                        f"{device.type} (uint8 images for the real step, normalised floats for the bare one); "
                        f"the real step adds normalize, the loss module, grad clipping, scheduler and per-step "
                        f".item() syncs")


def random_batches(ws, tokenizer, max_length, args, device, steps):
    from dataset import tokenize
    g = torch.Generator().manual_seed(0)
    out = []
    for s in range(steps):
        captions = [ws.captions[(s * args.batch_size + i) % len(ws.captions)] for i in range(args.batch_size)]
        ids, mask = tokenize(tokenizer, captions, max_length)
        size = (args.batch_size, 3, args.image_size, args.image_size)
        images = torch.randint(0, 256, size, generator=g, dtype=torch.uint8)  # as the loader yields them
        out.append({"images": images.to(device).contiguous(memory_format=torch.channels_last),  # (B, 3, H, W)
                    "input_ids": ids.to(device), "attention_mask": mask.to(device),  # (B, T)
                    "image_ids": torch.arange(args.batch_size, device=device) + s * args.batch_size,
                    "skipped": 0})
    return out


# ---------------------------------------------------------------- 3. encoding

def bench_encode(ws, args, device, report, amp_specs):
    from engine.evaluation import Encoding, encode_texts, evaluate
    from engine.runtime import amp_context
    amps = {name: amp_context(device, *spec) for name, spec in amp_specs.items()}
    model, tokenizer, max_length, _ = build(ws, args.image_model, device)
    model.eval()
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
              for _ in range(args.steps)]
    images_cl = [x.contiguous(memory_format=torch.channels_last) for x in images]
    captions = ws.captions[:args.batch_size * args.steps]

    def encode(net, amp):
        def one_batch(x):
            with torch.no_grad(), amp:
                net.encode_image(x)
        return one_batch

    runs = args.repeats * args.steps  # one batch per timed run
    fns = {"fp32, contiguous": cycle(encode(plain, amps["fp32"]), images),
           "fp32, channels_last": cycle(encode(model, amps["fp32"]), images_cl)}
    for name, amp in amps.items():
        if name != "fp32":
            fns[f"{name}, channels_last"] = cycle(encode(model, amp), images_cl)
    base = None
    for name, t in alternate(fns, runs, device).items():
        row = report.add("encode", f"model.encode_image {name}", "images/s", [args.batch_size / s for s in t], base,
                         is_baseline=base is None)
        base = base or row
    batches = [captions[s:s + args.batch_size] for s in range(0, len(captions), args.batch_size)]
    def encoding(amp):
        return Encoding(args.image_size, max_length, args.batch_size, args.workers, device, amp)

    fns = {name: cycle(lambda c, e=encoding(amp): encode_texts(model, tokenizer, c, e), batches)
           for name, amp in amps.items()}
    base = None
    for name, t in alternate(fns, runs, device).items():
        row = report.add("encode", f"encode_texts {name} (tokenize+encode)", "texts/s",
                         [args.batch_size / s for s in t], base, is_baseline=base is None)
        base = base or row
    # evaluate() on a split with several captions per image must run the image tower once per image
    seen = []
    hook = model.image.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[0]))
    start = time.perf_counter()
    evaluate(model, tokenizer, ws.photos, encoding(amps["fp32"]))
    seconds = time.perf_counter() - start
    hook.remove()
    report.add("encode", f"evaluate: images encoded per image ({ws.images} images, "
               f"{len(ws.captions)} captions, {seconds:.1f} s)", "ratio", [sum(seen) / ws.images],
               target="== 1 (each image once)", check=lambda r: r["median"] == 1)
    report.notes.append(f"encode: batch {args.batch_size}, {args.image_size}px, {runs} single-batch runs each")
