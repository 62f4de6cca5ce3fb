"""Pack a prepared dataset folder (captions.csv + images/) into WebDataset tar shards for streaming training.

    python -m tools.prepare_data shards --input datasets/train --output datasets/train-shards --shard-size 1000

One sample per image, so an image is stored and decoded once however many captions it has:
`KEY.<ext>` holds the image file's bytes unchanged (<ext> from its name) and `KEY.json` holds
{"filename": name in images/, "captions": [all its captions, in captions.csv order], "image_id": int}.
`image_id` is the image's index among the sorted file names of the whole folder (the id `PairDataset` gives),
so ids are unique across all shards; KEY is that id, zero-padded. Images go into shards in the order they
first appear in captions.csv, `--shard-size` images per shard, as OUTPUT/000000.tar, 000001.tar, ...;
OUTPUT/sizes.json maps each shard's file name to its number of pairs (the reader's epoch length).

Every file is written to a temporary name in OUTPUT and renamed, so a shard that exists is complete.
A folder that already holds shards is refused unless `--overwrite true`; then shards left over from the old set
(numbered past the new ones) are removed, so `{000000..N}` patterns never mix two runs.
"""
import json
import os
import re

import webdataset as wds
from tqdm import tqdm

from dataset import read_captions
from engine.files import atomic_write
from engine.shards import SIZES_FILE, ShardError
from tools.prepare_output import yes_no

SHARD_NAME = re.compile(r"^\d{6,}\.tar$")


def shard_name(index):
    return f"{index:06d}.tar"


def image_extension(name):
    """The member suffix for an image file: its own extension, lower case; `img` when unusable as one."""
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    return ext if re.fullmatch(r"[a-z0-9]+", ext) and ext != "json" else "img"


def group_by_image(pairs):
    """[(filename, caption)] -> [(filename, [captions])] in order of first appearance."""
    captions = {}
    for name, caption in pairs:
        captions.setdefault(name, []).append(caption)  # dicts keep insertion order
    return list(captions.items())


def _write_shard(f, input_root, images, ids):
    # mtime 0 and no owner names: the same input gives byte-identical shards
    with wds.TarWriter(f, encoder=False, mtime=0, user="", group="") as tar:
        for name, captions in images:
            with open(os.path.join(input_root, "images", name), "rb") as image_file:
                data = image_file.read()
            meta = {"filename": name, "captions": captions, "image_id": ids[name]}
            tar.write({"__key__": f"{ids[name]:09d}", image_extension(name): data,
                       "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})


def write_shards(input_root, output_dir, shard_size, overwrite=False, progress=True):
    """Write the shards of `input_root` into `output_dir`; return {"shards", "images", "pairs"} counts."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ShardError(f"shard size must be a whole number of images >= 1, got {shard_size!r}")
    pairs = read_captions(input_root)  # checks the columns and that every image exists
    images = group_by_image(pairs)
    ids = {name: i for i, name in enumerate(sorted(name for name, _ in images))}
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ShardError(f"--output {output_dir} is a file; give a folder")
    os.makedirs(output_dir, exist_ok=True)
    old = sorted(f for f in os.listdir(output_dir) if SHARD_NAME.match(f))
    if old and not overwrite:
        raise ShardError(f"{output_dir} already holds {len(old)} shard(s); pass --overwrite true to replace them "
                         f"or choose another folder")
    chunks = [images[i:i + shard_size] for i in range(0, len(images), shard_size)]
    sizes = {}
    for index, chunk in enumerate(tqdm(chunks, desc="shards", unit="shard", disable=not progress)):
        name = shard_name(index)
        atomic_write(os.path.join(output_dir, name), lambda f, chunk=chunk: _write_shard(f, input_root, chunk, ids),
                     binary=True)
        sizes[name] = sum(len(captions) for _, captions in chunk)
    for stale in set(old) - set(sizes):
        os.remove(os.path.join(output_dir, stale))
    atomic_write(os.path.join(output_dir, SIZES_FILE),
                  lambda f: f.write(json.dumps(sizes, indent=0, sort_keys=True).encode("utf-8")), binary=True)
    return {"shards": len(chunks), "images": len(images), "pairs": len(pairs)}


def add_command(subparsers):
    """Register the `shards` sub-command on an argparse `add_subparsers()` object."""
    command = subparsers.add_parser("shards", help="pack a prepared folder into WebDataset tar shards",
                                    description=__doc__.split("\n\n")[0])
    command.add_argument("--input", required=True, help="prepared folder: captions.csv + images/")
    command.add_argument("--output", required=True, help="folder for 000000.tar, 000001.tar, ... and sizes.json")
    command.add_argument("--shard-size", type=int, default=1000,
                         help="images per shard (default 1000; 256-px JPEGs make ~20-40 MB shards)")
    command.add_argument("--overwrite", type=yes_no, nargs="?", const=True, default=False, metavar="true|false",
                         help="replace the shards already in --output (default: false)")
    command.set_defaults(run=run)
    return command


def run(args):
    """Run the `shards` sub-command from parsed arguments (tools.prepare_data turns user errors into one line)."""
    counts = write_shards(args.input, args.output, args.shard_size, overwrite=args.overwrite)
    print(f"wrote {counts['shards']} shard(s) with {counts['images']} images and {counts['pairs']} pairs "
          f"to {args.output}")
    return counts
