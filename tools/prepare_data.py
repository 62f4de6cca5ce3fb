"""Convert image-caption datasets into the layout the trainer reads.

Layout: OUT/images/<file> and OUT/captions.csv (UTF-8, header "filename,caption", one
image-caption pair per row, several rows per image; filename is relative to OUT/images).

Commands:
  coco       the official COCO caption JSON (captions_train2017.json, captions_val2017.json)
  flickr30k  either Karpathy's dataset_flickr30k.json (has splits; --split picks one, default
             all) or the results.csv / results_20130124.token caption list (no splits);
             the format is read from the file's content, not its name
  merge      joins folders prepared by the commands above into one; every image is renamed
             <source folder name>_<file> (datasets/coco/images/x.jpg -> coco_x.jpg), so names
             from different sources cannot clash; a clash that remains is an error

Reference run: COCO 2017 train + all of Flickr30k for training, COCO val2017 with one caption
per image (5000 pairs) for validation:

  python prepare_data.py coco --annotations coco/annotations/captions_train2017.json \\
      --images coco/train2017 --out datasets/coco
  python prepare_data.py flickr30k --captions flickr30k/dataset_flickr30k.json \\
      --images flickr30k/flickr30k-images --out datasets/flickr
  python prepare_data.py merge --out datasets/train datasets/coco datasets/flickr
  python prepare_data.py coco --annotations coco/annotations/captions_val2017.json \\
      --images coco/val2017 --out datasets/valid --captions-per-image 1

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

Captions are stripped and inner runs of whitespace become one space; empty captions are
dropped. Every image and captions.csv is written to a temporary name and then renamed, so a
file that exists is complete: a rerun skips images already present and redoes only the rest
(a rerun with a different --resize needs a fresh OUT). Images that cannot be decoded while
resizing are listed in OUT/unreadable.txt and their captions are left out of captions.csv.
"""
import argparse
import csv
import json
import os
import random
import shutil
import sys
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

from PIL import Image
from tqdm import tqdm

JPEG_QUALITY = 90
MAX_LISTED = 5  # missing images named in the error message
SPLITS = ["train", "val", "test", "all"]


class Item(NamedTuple):
    name: str  # output file name, relative to OUT/images
    src: Path  # image to read
    captions: list  # in source order


def fail(message):
    # SystemExit with a string prints it and exits with status 1: no stack trace for user mistakes
    raise SystemExit(f"error: {message}")


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def clean(caption):
    # COCO captions carry trailing newlines and double spaces
    return " ".join(caption.split()) if isinstance(caption, str) else ""


def read_text(path):
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        fail(f"{path} not found")
    except UnicodeDecodeError:
        fail(f"{path} is not a UTF-8 text file")


def parse_json(path, text):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{path} is not valid JSON ({e})")


# ----------------------------------------------------------------------------- readers
# Each reader returns a list of Item; cleaning, checks and writing are shared (prepare()).

def read_coco(annotations, images_dir):
    data = parse_json(annotations, read_text(annotations))
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        fail(f"{annotations} is not a COCO caption file (it needs 'images' and 'annotations' "
             "lists); pass annotations/captions_<split>2017.json")
    try:
        names = {image["id"]: image["file_name"] for image in data["images"]}
        captions = {i: [] for i in names}  # image id -> captions; prepare() counts empty ones
        for ann in data["annotations"]:
            if "caption" not in ann:
                fail(f"{annotations} has annotations without 'caption' (an instances or keypoints "
                     "file?); pass annotations/captions_<split>2017.json")
            if ann["image_id"] not in names:
                fail(f"{annotations}: annotation {ann.get('id')} refers to image id "
                     f"{ann['image_id']}, which is not in 'images'")
            captions[ann["image_id"]].append(ann["caption"])
    except (KeyError, TypeError):
        fail(f"{annotations} is not a COCO caption file (images need 'id' and 'file_name', "
             "annotations 'image_id' and 'caption')")
    return [Item(names[i], images_dir / names[i], caps) for i, caps in captions.items()]


def read_flickr30k(path, images_dir, split):
    text = read_text(path)
    if text.lstrip().startswith("{"):
        return read_karpathy(path, parse_json(path, text), images_dir, split)
    if split not in (None, "all"):
        fail(f"--split {split} needs Karpathy's dataset_flickr30k.json, but {path} is a plain "
             "caption list without splits; leave out --split to use all of it")
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        fail(f"{path} is empty")
    first = lines[0][1]
    if "|" in first:
        parse = parse_results_line
    elif "\t" in first:
        parse = parse_token_line
    else:
        fail(f"{path} is not a Flickr30k caption file (expected dataset_flickr30k.json, "
             "results.csv with 'image| number| caption' rows, or a .token file with "
             "'image#number<TAB>caption' rows)")
    if first.startswith("image_name"):  # results.csv header
        lines = lines[1:]
    captions = {}  # image name -> captions, in file order
    for number, line in lines:
        parsed = parse(line)
        if parsed is None:
            fail(f"{path} line {number} does not look like the lines before it: {line[:80]!r}")
        name, caption = parsed
        captions.setdefault(name, []).append(caption)
    return [Item(name, images_dir / name, caps) for name, caps in captions.items()]


def parse_results_line(line):
    # "1000092795.jpg| 0| Two young guys ..."; the caption may itself contain '|'
    name, sep, rest = line.partition("|")
    if not sep:
        return None
    number, sep, caption = rest.partition("|")
    if not sep:
        # the Kaggle copy of results.csv has a row that lacks the second '|': "x.jpg| 4 A dog ..."
        number, _, caption = rest.strip().partition(" ")
    if not number.strip().isdigit():
        return None
    return name.strip(), caption


def parse_token_line(line):
    # "1000092795.jpg#0<TAB>Two young guys ..."
    key, sep, caption = line.partition("\t")
    if not sep or "#" not in key:
        return None
    return key.rsplit("#", 1)[0].strip(), caption


def read_karpathy(path, data, images_dir, split):
    try:
        return [Item(entry["filename"], images_dir / entry["filename"],
                     [sentence["raw"] for sentence in entry["sentences"]])
                for entry in data["images"] if split in (None, "all") or entry["split"] == split]
    except (KeyError, TypeError):
        fail(f"{path} is not Karpathy's dataset_flickr30k.json (each entry of 'images' needs "
             "'filename', 'split' and 'sentences' with 'raw')")


def read_prepared(sources, out):
    items = []
    for source in sources:
        if source.resolve() == out.resolve():
            fail(f"--out {out} is also a source; merge into a new folder")
        csv_path = source / "captions.csv"
        if not csv_path.is_file():
            fail(f"{csv_path} not found; prepare {source} first with the coco or flickr30k command")
        captions = {}  # file name -> captions
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            if next(reader, None) != ["filename", "caption"]:
                fail(f"{csv_path} does not start with the header filename,caption")
            for row in reader:
                if len(row) != 2:
                    fail(f"{csv_path} line {reader.line_num} has {len(row)} fields, not 2")
                captions.setdefault(row[0], []).append(row[1])
        prefix = source.resolve().name
        items += [Item(f"{prefix}_{name}", source / "images" / name, caps)
                  for name, caps in captions.items()]
    return items


# ----------------------------------------------------------------------------- writing

def choose_captions(name, captions, k, seed):
    if k is None or len(captions) <= k:
        return captions
    rng = random.Random(f"{seed}:{name}")  # str seeds are hashed with SHA-512: same on every run
    return [captions[i] for i in sorted(rng.sample(range(len(captions)), k))]


def place_image(job):
    """Write one output image. Returns None, or why the source could not be decoded."""
    src, dst, size = job
    dst = Path(dst)
    if dst.exists():  # written as temp + rename, so an existing file is complete
        return None
    tmp = dst.with_name(f".{dst.name}.tmp")  # a crash leaves only this, redone on the next run
    if size is None:
        tmp.unlink(missing_ok=True)  # os.link will not overwrite a leftover
        try:
            os.link(src, tmp)
        except OSError:  # another disk, or a file system without hard links
            shutil.copyfile(src, tmp)
    else:
        try:
            with Image.open(src) as image:
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


def write_atomic(path, write):
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        write(f)
    os.replace(tmp, path)


def output_name(name, resize):
    # resized images are JPEGs whatever the source format
    if resize and Path(name).suffix.lower() not in (".jpg", ".jpeg"):
        return str(Path(name).with_suffix(".jpg"))
    return name


def prepare(items, args):
    items = [Item(output_name(item.name, args.resize), item.src,
                  [c for c in map(clean, item.captions) if c]) for item in items]
    if empty := sum(not item.captions for item in items):
        warn(f"{empty} images have no caption and are left out")
    # sorted by output name: the same rows in the same order whatever the source order
    items = sorted((item for item in items if item.captions), key=lambda item: item.name)

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

    images_dir = args.out / "images"
    for folder in {(images_dir / item.name).parent for item in items}:
        folder.mkdir(parents=True, exist_ok=True)
    errors = place_images([(str(item.src), str(images_dir / item.name), args.resize)
                           for item in items], args.workers)

    # rewritten on every run: images that failed before are retried, as they have no output
    report = args.out / "unreadable.txt"
    unreadable = [(item, error) for item, error in zip(items, errors) if error]
    if unreadable:
        write_atomic(report, lambda f: f.writelines(f"{item.src}\t{error}\n"
                                                    for item, error in unreadable))
    else:
        report.unlink(missing_ok=True)
    kept = [item for item, error in zip(items, errors) if not error]

    def write_csv(f):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filename", "caption"])
        writer.writerows((item.name, caption) for item in kept for caption in item.captions)
    write_atomic(args.out / "captions.csv", write_csv)

    n_captions = sum(len(item.captions) for item in kept)
    summary = f"done: {len(kept)} images, {n_captions} captions in {args.out}"
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
    common.add_argument("--out", type=Path, required=True,
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

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    coco = commands.add_parser("coco", parents=[common], help="COCO caption JSON")
    coco.add_argument("--annotations", type=Path, required=True,
                      help="captions_<split>2017.json")
    coco.add_argument("--images", type=Path, required=True, help="folder of the images")
    flickr = commands.add_parser("flickr30k", parents=[common], help="Flickr30k captions")
    flickr.add_argument("--captions", type=Path, required=True,
                        help="dataset_flickr30k.json, results.csv or results_20130124.token")
    flickr.add_argument("--images", type=Path, required=True, help="folder of the images")
    flickr.add_argument("--split", choices=SPLITS,
                        help="split to keep; only for dataset_flickr30k.json (default: all)")
    merge = commands.add_parser("merge", parents=[common], help="join prepared folders")
    merge.add_argument("sources", type=Path, nargs="+", help="folders made by this script")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command in ("coco", "flickr30k") and not args.images.is_dir():
        fail(f"--images {args.images} is not a folder")
    if args.command == "coco":
        items = read_coco(args.annotations, args.images)
    elif args.command == "flickr30k":
        items = read_flickr30k(args.captions, args.images, args.split)
    else:
        items = read_prepared(args.sources, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    return prepare(items, args)


if __name__ == "__main__":
    main()
