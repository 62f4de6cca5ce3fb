"""Convert image-caption datasets into the layout the trainer reads.

Layout: OUT/images/<file> and OUT/captions.csv (UTF-8, header "filename,caption", one
image-caption pair per row, several rows per image; filename is relative to OUT/images).

Commands:
  coco       the official COCO caption JSON (captions_train2017.json, captions_val2017.json), or Karpathy's
             dataset_coco.json (--images: the folder holding train2014/ and val2014/; --split train, restval,
             train+restval (the literature's 113,287 training images), val or test (5,000 each), default all)
  flickr30k  either Karpathy's dataset_flickr30k.json (has splits; --split picks one, default
             all) or the results.csv / results_20130124.token caption list (no splits);
             the format is read from the file's content, not its name
  chinese-clip  Chinese-CLIP's MUGE, Flickr30k-CN, COCO-CN: --input folder, --split valid reads
             valid_imgs.tsv and valid_texts.jsonl; one row per (image, text) pair (tools/chinese_clip.py)
  table      any CSV, TSV or JSON-lines captions table: --captions, --images, --image-column,
             --caption-column (tools/caption_table.py)
  merge      joins folders prepared by the commands above into one; every image is renamed
             <source folder name>_<file> (datasets/coco/images/x.jpg -> coco_x.jpg), so names
             from different sources cannot clash; a clash that remains is an error

Reference run: COCO 2017 train + all of Flickr30k for training, COCO val2017 with one caption
per image (5000 pairs) for validation:

  python -m tools.prepare_data coco --annotations coco/annotations/captions_train2017.json \\
      --images coco/train2017 --output datasets/coco
  python -m tools.prepare_data flickr30k --captions flickr30k/dataset_flickr30k.json \\
      --images flickr30k/flickr30k-images --output datasets/flickr
  python -m tools.prepare_data merge --output datasets/train datasets/coco datasets/flickr
  python -m tools.prepare_data coco --annotations coco/annotations/captions_val2017.json \\
      --images coco/val2017 --output datasets/valid --captions-per-image 1

Options of every command:
  --captions-per-image K  an image with n > K captions keeps the captions at indices
      sorted(random.Random(f"{seed}:{name}").sample(range(n), K)), in their original order,
      where name is the image's file name as written in captions.csv. One RNG per image means
      an image's choice does not depend on which other images are in the set.
  --seed       seed of that choice (default 0)
  --resize S   re-encode images as RGB JPEG (quality 90) with the short side at S pixels,
               aspect kept, never upscaled; the output name ends in .jpg. Runs in --workers
               processes (default: all CPUs). Without --resize, images are hard-linked
               (copied where linking fails, e.g. across disks), so no extra space is used.
  --skip-missing  leave out images that are missing from the image folder, with a warning,
               instead of stopping

  --overwrite true  replace the dataset already in OUT (otherwise a folder with captions.csv
               is refused)

Captions are stripped and inner runs of whitespace become one space; empty captions are
dropped. Image names that would not read back from captions.csv as written (tabs, newlines, double or
leading spaces) are renamed, the mapping in OUT/renamed.json (tools/readable_names.py). Every
image and captions.csv is written to a temporary name and then renamed, so a file that exists is
complete, and captions.csv is written last. A run stopped part-way (no captions.csv yet) is
resumed by the same command: it skips images already present and redoes only the rest.
OUT/prepare.json records the settings a run started with; a rerun with other settings (e.g. another --resize) is
refused, as is an OUT that already holds a finished dataset, unless --overwrite true (see tools/prepare_output.py).
Images that cannot be decoded while resizing are listed in OUT/unreadable.txt and their captions are left out of
captions.csv.
"""
import argparse
import csv
import io
import os
import shutil
import sys
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from dataset import choose_captions, inside
from engine.errors import run_entry
from engine.files import atomic_write, remove_stale_partials, temporary_name, write_json
from tools import prepare_output, readable_names, shards
from tools.caption_sources import SPLITS, Item, SourceOrder, fail, read_coco, read_flickr30k, read_prepared
from tools.caption_table import FORMATS, read_table
from tools.chinese_clip import Embedded, read_chinese_clip, read_embedded

JPEG_QUALITY = 90
MAX_LISTED = 5  # missing images named in the error message


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def clean(caption):
    # COCO captions carry trailing newlines and double spaces
    return " ".join(caption.split()) if isinstance(caption, str) else ""


# ----------------------------------------------------------------------------- writing

def place_image(job):
    """Write one output image. Returns None, or why the source could not be decoded."""
    src, dst, size = job  # src: a path, or an image embedded in a TSV line (tools/chinese_clip.py)
    dst = Path(dst)
    if dst.exists():  # written as temp + rename, so an existing file is complete
        return None
    tmp = Path(temporary_name(dst))  # a crash leaves only this, redone (and replaced) on the next run
    try:
        data = read_embedded(src) if isinstance(src, Embedded) else None
    except (OSError, ValueError) as e:  # the TSV changed since it was indexed
        return f"{type(e).__name__}: {e}"
    if size is None and data is not None:
        tmp.write_bytes(data)  # the image file as it was before base64
    elif size is None:
        tmp.unlink(missing_ok=True)  # os.link will not overwrite a leftover
        try:
            os.link(src, tmp)
        except OSError:  # another disk, or a file system without hard links
            shutil.copyfile(src, tmp)
    else:
        try:
            with Image.open(src if data is None else io.BytesIO(data)) as image:
                w, h = image.size
                if min(w, h) > size:
                    new = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
                    # JPEGs decode straight to a smaller scale (still >= new): several times faster
                    image.draft("RGB", new)
                    result = image.convert("RGB").resize(new, Image.Resampling.BICUBIC)
                else:
                    result = image.convert("RGB")
                # EXIF orientation is not applied, like a plain PIL loader on the original file
                result.save(tmp, format="JPEG", quality=JPEG_QUALITY)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            tmp.unlink(missing_ok=True)
            return f"{type(e).__name__}: {e}"
    os.replace(tmp, dst)
    return None


def place_images(jobs, workers):
    bar = dict(total=len(jobs), desc="images", unit="img")
    if workers == 1:
        return [place_image(job) for job in tqdm(jobs, **bar)]
    with Pool(min(workers, len(jobs))) as pool:
        return list(tqdm(pool.imap(place_image, jobs, chunksize=32), **bar))


def output_name(name, resize):
    # resized images are JPEGs whatever the source format
    if resize and Path(name).suffix.lower() not in (".jpg", ".jpeg"):
        return str(Path(name).with_suffix(".jpg"))
    return name


def prepare(items_in, args):
    items = [Item(output_name(item.name, args.resize), item.src,
                  [c for c in map(clean, item.captions) if c]) for item in items_in]
    if empty := sum(not item.captions for item in items):
        warn(f"{empty} images have no caption and are left out")
    # sorted by output name, the same rows in the same order whatever the source order; except where the order is
    # the benchmark's own (Karpathy's files: the 1K folds are runs of consecutive images)
    def order(kept):
        return list(kept) if isinstance(items_in, SourceOrder) else sorted(kept, key=lambda item: item.name)
    items = order(item for item in items if item.captions)

    unsafe = [item for item in items if inside(str(args.output / "images"), item.name) is None
              or Path(item.name).is_absolute()]
    if unsafe:
        fail(f"{len(unsafe)} image file name(s) are absolute or lead outside the output folder (first: "
             f"{', '.join(repr(item.name[:80]) for item in unsafe[:MAX_LISTED])}); such names are refused, fix "
             "the caption file")

    renamed = readable_names.readable([item.name for item in items])
    if renamed:
        warn(f"{len(renamed)} image name(s) would not read back from captions.csv as written (tabs, newlines, "
             f"double or leading spaces, ./ or //) and are renamed; the mapping is in "
             f"{args.output / readable_names.RECORD}")
        items = order(item._replace(name=renamed.get(item.name, item.name)) for item in items)
    seen = {}  # output name -> source
    for item in items:
        if item.name in seen:
            fail(f"two images would both be written as {item.name} ({seen[item.name]} and "
                 f"{item.src}); output names must be unique (for merge, give the source folders "
                 "different names)")
        seen[item.name] = item.src

    missing = [item for item in items if not item.src.is_file()]
    if missing:
        message = (f"{len(missing)} of {len(items)} images are missing (first: "
                   f"{', '.join(str(item.src) for item in missing[:MAX_LISTED])})")
        if not args.skip_missing:
            fail(f"{message}; check the image folder, or pass --skip-missing to leave them out")
        warn(f"{message}; left out because of --skip-missing")
        missing_names = {item.name for item in missing}
        items = [item for item in items if item.name not in missing_names]
    if not items:
        fail("nothing to write: no image with a caption was found")

    items = [item._replace(captions=choose_captions(item.name, item.captions,
                                                    args.captions_per_image, args.seed))
             for item in items]

    prepare_output.start(args.output, prepare_output.settings(args), args.overwrite)  # input read and checked
    images_dir = args.output / "images"
    for folder in {(images_dir / item.name).parent for item in items}:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(str(folder))  # what a killed earlier run left half-written
    sources = [item.src if isinstance(item.src, Embedded) else str(item.src) for item in items]
    jobs = [(src, str(images_dir / item.name), args.resize) for src, item in zip(sources, items, strict=True)]
    errors = place_images(jobs, args.workers)

    # rewritten on every run: images that failed before are retried, as they have no output
    report = args.output / "unreadable.txt"
    unreadable = [(item, error) for item, error in zip(items, errors, strict=True) if error]
    if unreadable:
        atomic_write(report, lambda f: f.writelines(f"{item.src}\t{error}\n"
                                                    for item, error in unreadable))
    else:
        report.unlink(missing_ok=True)
    kept = [item for item, error in zip(items, errors, strict=True) if not error]
    record = args.output / readable_names.RECORD  # {name in the source: name in captions.csv}
    if renamed:
        write_json(record, renamed)
    else:
        record.unlink(missing_ok=True)

    def write_csv(f):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filename", "caption"])
        writer.writerows((item.name, caption) for item in kept for caption in item.captions)
    atomic_write(args.output / "captions.csv", write_csv)

    n_captions = sum(len(item.captions) for item in kept)
    summary = f"done: {len(kept)} images, {n_captions} captions in {args.output}"
    if unreadable:
        summary += f" ({len(unreadable)} unreadable images left out, listed in {report})"
    print(summary)
    return {"images": len(kept), "captions": n_captions, "unreadable": len(unreadable)}


# ----------------------------------------------------------------------------- command line

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", type=Path, required=True,
                        help="output folder; gets images/ and captions.csv")
    common.add_argument("--captions-per-image", type=positive_int, metavar="K",
                        help="keep at most K captions per image (seeded; see the top of --help)")
    common.add_argument("--seed", type=int, default=0, help="seed of the caption choice")
    common.add_argument("--resize", type=positive_int, metavar="S",
                        help="re-encode as JPEG with the short side at S pixels")
    common.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="processes that write images (default: all CPUs)")
    common.add_argument("--skip-missing", action="store_true",
                        help="leave out missing images with a warning instead of stopping")
    common.add_argument("--overwrite", type=prepare_output.yes_no, nargs="?", const=True, default=False,
                        metavar="true|false", help="replace the dataset already in --output (default: false)")

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    coco = commands.add_parser("coco", parents=[common], help="COCO caption JSON")
    coco.add_argument("--annotations", type=Path, required=True,
                      help="captions_<split>2017.json, or Karpathy's dataset_coco.json")
    coco.add_argument("--images", type=Path, required=True,
                      help="folder of the images (for dataset_coco.json: the one holding train2014/ and val2014/)")
    coco.add_argument("--split", choices=SPLITS,
                      help="split to keep; only for dataset_coco.json (train+restval: the 113,287 training images)")
    flickr = commands.add_parser("flickr30k", parents=[common], help="Flickr30k captions")
    flickr.add_argument("--captions", type=Path, required=True,
                        help="dataset_flickr30k.json, results.csv or results_20130124.token")
    flickr.add_argument("--images", type=Path, required=True, help="folder of the images")
    flickr.add_argument("--split", choices=SPLITS,
                        help="split to keep; only for dataset_flickr30k.json (default: all)")
    chinese = commands.add_parser("chinese-clip", parents=[common], help="Chinese-CLIP's TSV + JSONL")
    chinese.add_argument("--input", type=Path, required=True, help="folder with {split}_imgs.tsv, {split}_texts.jsonl")
    chinese.add_argument("--split", required=True, help="train, valid or test (the files' prefix)")
    table = commands.add_parser("table", parents=[common], help="any CSV, TSV or JSON-lines captions table")
    table.add_argument("--captions", type=Path, required=True, help="the table")
    table.add_argument("--images", type=Path, required=True, help="folder of the images the table names")
    table.add_argument("--image-column", required=True, help="column (or JSON key) of the image file name")
    table.add_argument("--caption-column", required=True, help="column (or JSON key) of the caption")
    table.add_argument("--format", choices=FORMATS, help="default: from the file's extension")
    merge = commands.add_parser("merge", parents=[common], help="join prepared folders")
    merge.add_argument("sources", type=Path, nargs="+", help="folders made by this script")
    shards.add_command(commands)  # python -m tools.prepare_data shards --input ... --output ... --shard-size N
    return parser


def run(args):
    if args.command == "shards":
        return shards.run(args)
    if args.output.exists() and not args.output.is_dir():
        fail(f"--output {args.output} is a file; pass a folder (it gets images/ and captions.csv)")
    if args.command in ("coco", "flickr30k", "table") and not args.images.is_dir():
        fail(f"--images {args.images} is not a folder")
    # before the input is read: a finished dataset or another run's part is never written over unasked
    prepare_output.refuse_or_resume(args.output, prepare_output.settings(args), args.overwrite)
    if args.command == "coco":
        items = read_coco(args.annotations, args.images, args.split)
    elif args.command == "flickr30k":
        items = read_flickr30k(args.captions, args.images, args.split)
    elif args.command == "chinese-clip":
        items = read_chinese_clip(args.input, args.split)
    elif args.command == "table":
        items = read_table(args.captions, args.images, args.image_column, args.caption_column, args.format)
    else:
        items = read_prepared(args.sources, args.output)
    args.output.mkdir(parents=True, exist_ok=True)
    return prepare(items, args)


def main(argv=None):
    return run_entry(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
