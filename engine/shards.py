"""Training pairs streamed from WebDataset tar shards (written by `tools/shards.py`).

A shard sample is one image with all its captions: `KEY.<ext>` holds the image file's bytes as stored and
`KEY.json` holds {"filename", "captions", "image_id"}. `image_id` is the image's index among the sorted file
names of the whole source folder, so it is unique across all shards and equals `PairDataset`'s id for the
same folder: two captions of one image are never each other's negatives, even across processes.

In each loader worker the stream is
    this worker's shard urls -> tar samples -> parsed samples -> shuffle (images, as bytes)
    -> decode each image once, one transformed pair per caption -> shuffle (pairs) -> collate_fn batches
and the batches are the same dict as the folder loader's (`dataset.PairCollate`).

Splitting. Every epoch the shard list is shuffled with a seed made of (seed, epoch), the same on every
process; process `rank` takes every `world_size`-th shard of it and its loader workers split those again.
Processes therefore read disjoint shards. A worker never shares a shard, so a process uses at most as many
workers as the smallest share of shards has files (a warning says so when that is fewer than asked).

Epoch length. A stream has no length. With `samples_per_epoch` (global, all processes together) each process
yields exactly `samples_per_epoch // (batch_size * world_size)` full batches per epoch, however many shards it
holds: its shards are read round after round (reshuffled each round) until that count, so no process waits
at a collective for a batch that never comes. Each round is a pipeline of its own whose shuffle buffers drain at
its end, so a round yields every readable pair of its shards once (a batch may span two rounds): with
samples_per_epoch equal to the pairs in the shards and one process, an epoch is one pass over every pair.
Without it, a single process reads every shard once and one epoch is exactly one pass over every pair (each
worker's last batch may be short); several processes then take the pair count from the `sizes.json` that
`tools/shards.py` writes beside the shards.

Bad data. A missing or unreadable shard, a broken tar member, a sample without an image, a caption or a
valid image id, and an image that fails to decode are skipped and counted: the count is added to the
`skipped` of the worker's next batch (a warning reports any left after its last batch). A worker whose
shards hold no readable sample at all, or whose images fail to decode MAX_BAD_IN_A_ROW times in a row,
stops with a ShardError instead of looping forever.

Resume. The stream is the same for the same (seed, epoch, world size, worker count): the shard order and both
shuffles are seeded by the epoch, and each loader worker reseeds torch's generator (random crops) from them when
the epoch starts. So a run resumed in the middle of an epoch (`ShardLoader.resume_at`) reads that epoch again from
its start and drops the batches it had already trained on: it then trains on exactly the batches an unbroken run
does, at the cost of reading and decoding the dropped ones again (the stream keeps no cheaper position).
"""
import functools
import io
import json
import multiprocessing
import os
import random
import warnings
from urllib.parse import urlparse

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dataset import resolve_workers
from engine.errors import DataError
from engine.images import DEFAULT_LIMITS, open_image

SIZES_FILE = "sizes.json"  # {shard file name: pairs}, written beside the shards
MAX_BAD_IN_A_ROW = 64  # consecutive undecodable images before a worker gives up instead of spinning


class ShardError(DataError):
    """Shards that cannot be used as given: no file matches, too few shards, nothing readable."""


def _local_path(url):
    """The file path of a local url (plain path or file:), None for pipe: and remote urls."""
    if url.startswith("file:"):
        return urlparse(url).path
    return None if url.startswith("pipe:") or "://" in url else url


def expand_pattern(pattern):
    """`shards/{000000..000009}.tar` (or several joined by `::`, or a list) -> the list of shard urls.

    `pipe:` commands and remote urls are passed on unchecked. Local files that are missing are kept, so the
    reader skips and counts them, but a pattern whose local files all are missing is an error.
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    urls = [url for p in patterns for url in wds.shardlists.expand_urls(p)]
    local = [path for path in map(_local_path, urls) if path is not None]
    if not urls or (len(local) == len(urls) and not any(os.path.isfile(path) for path in local)):
        shown = pattern if isinstance(pattern, str) else " ".join(patterns)
        raise ShardError(f"no shard file matches '{shown}'; check the path, or write shards with "
                         f"`python -m tools.prepare_data shards`")
    return urls


def count_pairs(urls):
    """Total pairs in the shards, from the sizes.json files beside them; ShardError when one is not listed."""
    sizes = {}
    total = 0
    for url in urls:
        path = _local_path(url)
        folder = os.path.dirname(path) if path is not None else None
        if folder is not None and folder not in sizes:
            sizes_path = os.path.join(folder, SIZES_FILE)
            try:
                with open(sizes_path, encoding="utf-8") as f:
                    sizes[folder] = json.load(f)
            except (OSError, ValueError):
                sizes[folder] = {}
        count = sizes[folder].get(os.path.basename(path)) if folder is not None else None
        if not isinstance(count, int):
            raise ShardError(f"the number of pairs in {url} is unknown (no entry in {SIZES_FILE} beside it); "
                             f"set samples-per-epoch")
        total += count
    return total


class _Counts:
    """Per-worker tallies shared by the pipeline's stages (all run in the same worker process)."""

    def __init__(self):
        self.skipped = 0  # bad samples not yet reported in a batch
        self.good = 0  # samples parsed so far

    def skip(self, exn):
        """webdataset's handler: count the broken shard or member and go on with the next one."""
        self.skipped += 1
        return True

    def take(self):
        skipped, self.skipped = self.skipped, 0
        return skipped


def _shard_source(shards):
    """Yield {"url"} for each shard of one round."""
    for url in shards:
        yield {"url": url}


def _parse(samples, counts):
    """webdataset samples -> (image bytes, [captions], image id); samples missing any of them are counted."""
    for sample in samples:
        image_keys = [k for k in sample if not k.startswith("__") and k != "json"]
        try:
            meta = json.loads(sample["json"])
            captions = [c for c in meta["captions"] if isinstance(c, str) and c.strip()]
            image_id = meta["image_id"]
        except (KeyError, TypeError, ValueError):  # no json member, not JSON, not the fields we write
            captions, image_id = [], None
        if len(image_keys) != 1 or not sample[image_keys[0]] or not captions or type(image_id) is not int:
            counts.skipped += 1
            continue
        counts.good += 1
        yield sample[image_keys[0]], captions, image_id


def _pairs(samples, transform, min_size, counts, random_crop=False, limits=DEFAULT_LIMITS):
    """Decode each image once and yield one (uint8 image, caption, image id, 0) item per caption."""
    bad_in_a_row = 0
    for image_bytes, captions, image_id in samples:
        image = open_image(io.BytesIO(image_bytes), strict=False, min_size=min_size, random_crop=random_crop,
                           limits=limits)
        if image is None:
            counts.skipped += 1
            bad_in_a_row += 1
            if bad_in_a_row >= MAX_BAD_IN_A_ROW:
                raise ShardError(f"{MAX_BAD_IN_A_ROW} images in a row failed to decode; check the shards")
            continue
        bad_in_a_row = 0
        for caption in captions:  # each pair its own transform: augmentation differs between captions
            yield transform(image), caption, image_id, 0


class ShardStream(IterableDataset):
    """One process's batches, built in each loader worker; see the module docstring."""

    def __init__(self, urls, transform, collate_fn, batch_size, rank, world_size, batches_per_rank, seed,
                 epoch, shuffle_buffer, min_size, random_crop=False, limits=DEFAULT_LIMITS):
        self.urls = urls
        self.transform = transform
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.batches_per_rank = batches_per_rank  # None: one pass over the shards
        self.seed = seed
        self.epoch = multiprocessing.Value("i", epoch)  # shared memory: persistent workers see set_epoch
        self.shuffle_buffer = shuffle_buffer or 0
        self.min_size = min_size
        self.random_crop, self.limits = random_crop, limits

    def rank_shards(self, epoch):
        order = list(self.urls)
        if self.shuffle_buffer:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)  # same on every process
        return order[self.rank::self.world_size]

    def round_pairs(self, shards, seed, counts):
        """One read of `shards` as shuffled (image, caption, id, 0) pairs. Each round is its own pipeline, so the
        shuffle buffers drain at its end: a round yields every readable pair of its shards exactly once."""
        stages = [functools.partial(_shard_source, shards), wds.tarfile_to_samples(handler=counts.skip),
                  functools.partial(_parse, counts=counts)]
        if self.shuffle_buffer:  # images as bytes: cheap to hold
            stages.append(wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=random.Random(seed)))
        stages.append(functools.partial(_pairs, transform=self.transform, min_size=self.min_size, counts=counts,
                                        random_crop=self.random_crop, limits=self.limits))
        if self.shuffle_buffer:  # spreads the captions of one image over different batches
            stages.append(wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=random.Random(seed + ":pairs")))
        return wds.DataPipeline(*stages)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch.value
        shards = self.rank_shards(epoch)[worker::workers]
        quota = None
        if self.batches_per_rank is not None:  # spread the process's batches over its workers
            quota = self.batches_per_rank // workers + (worker < self.batches_per_rank % workers)
        if not shards or quota == 0:
            return
        seed = f"{self.seed}:{epoch}:{self.rank}:{worker}"
        if info is not None:  # a worker's crops follow the epoch, not what the (persistent) worker drew before
            torch.manual_seed(random.Random(seed).getrandbits(63))
        order_rng = random.Random(seed + ":shards") if self.shuffle_buffer else None
        order = list(shards)  # round 0 in the epoch's order (rank_shards); later rounds reshuffled
        counts, pending, produced, round_no = _Counts(), [], 0, 0
        while True:  # rounds over this worker's shards: one without a quota, as many as the quota needs with one
            good_before = counts.good
            for pair in self.round_pairs(order, f"{seed}:{round_no}", counts):
                pending.append(pair)
                if len(pending) == self.batch_size:  # a batch may span the end of one round and the next
                    batch, pending = self.collate_fn(pending), []
                    batch["skipped"] += counts.take()
                    yield batch
                    produced += 1
                    if produced == quota:
                        return self.warn_left(counts, epoch, worker)
            if quota is None:
                break
            if counts.good == good_before:  # a whole round without one readable sample: never spin
                raise ShardError(f"no readable sample in {len(shards)} shard(s) ({shards[0]} ...); "
                                 f"check the shard files")
            if order_rng is not None:
                order_rng.shuffle(order)
            round_no += 1
        if pending:  # one pass: the last, short batch
            batch = self.collate_fn(pending)
            batch["skipped"] += counts.take()
            yield batch
        self.warn_left(counts, epoch, worker)

    def warn_left(self, counts, epoch, worker):
        left = counts.take()
        if left:
            warnings.warn(f"{left} bad shard sample(s) skipped after the last batch of epoch {epoch} "
                          f"(rank {self.rank}, worker {worker})", stacklevel=1)


class ShardLoader:
    """Iterate once per epoch; call `set_epoch` before each, as with a DistributedSampler."""

    def __init__(self, stream, loader, batches_per_rank):
        self.stream = stream
        self.loader = loader
        self.batches_per_rank = batches_per_rank
        self.num_workers = loader.num_workers
        self.skip = 0

    def set_epoch(self, epoch):
        self.stream.epoch.value = epoch

    def resume_at(self, samples):
        """Make the next iteration drop this process's first `samples` pairs (whole batches) of the epoch."""
        self.skip = samples // self.stream.batch_size

    def __iter__(self):
        batches, skip, self.skip = iter(self.loader), self.skip, 0
        for _ in range(skip):  # read and dropped: see "Resume" in the module docstring
            next(batches)
        return batches

    def __len__(self):
        if self.batches_per_rank is None:
            raise TypeError("one pass over shards has no length known in advance; set samples_per_epoch")
        return self.batches_per_rank


def shard_loader(pattern, transform, collate_fn, batch_size, num_workers=0, rank=0, world_size=1,
                 samples_per_epoch=None, seed=0, epoch=0, shuffle_buffer=1000, min_size=None,
                 pin_memory=False, random_crop=False, limits=DEFAULT_LIMITS):
    """Batches of `batch_size` pairs (per process) from the shards of `pattern`, for process `rank`.

    `transform`: PIL image -> uint8 (3, H, W), e.g. `dataset.image_transform`; `collate_fn` takes items
    (image, caption, image_id, skipped), e.g. `dataset.PairCollate`. `shuffle_buffer`: images held for the
    shuffle, and as many transformed pairs for a second one (0: no shuffle, shards and pairs in order); the
    pairs cost memory: 1000 uint8 pairs at 224 px are 150 MB per worker.
    `min_size`: decode JPEGs at a reduced scale down to this short side, as `PairDataset` does.
    """
    urls = expand_pattern(pattern)
    if batch_size < 1:
        raise ShardError(f"batch size must be at least 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ShardError(f"rank {rank} is outside 0..{world_size - 1} for world size {world_size}")
    if len(urls) < world_size:
        raise ShardError(f"{len(urls)} shard(s) cannot feed {world_size} processes, each needs at least one; "
                         f"write more, smaller shards (--shard-size)")
    if samples_per_epoch is None and world_size > 1:
        samples_per_epoch = count_pairs(urls)
    batches_per_rank = None
    if samples_per_epoch is not None:
        batches_per_rank = samples_per_epoch // (batch_size * world_size)
        if batches_per_rank < 1:
            raise ShardError(f"samples-per-epoch {samples_per_epoch} is less than one global batch "
                             f"({batch_size} x {world_size} processes); raise it")
    asked = resolve_workers(num_workers)
    workers = min(asked, len(urls) // world_size)  # the smallest share of shards a process gets
    if workers < asked:
        warnings.warn(f"using {workers} loader worker(s), not {asked}: a worker reads whole shards and a "
                      f"process holds at least {len(urls) // world_size} of the {len(urls)}", stacklevel=2)
    stream = ShardStream(urls, transform, collate_fn, batch_size, rank, world_size, batches_per_rank, seed,
                         epoch, shuffle_buffer, min_size, random_crop, limits)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    return ShardLoader(stream, loader, batches_per_rank)

