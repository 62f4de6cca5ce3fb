"""Readers of the caption files the datasets are published with. Each returns a list of `Item`s; cleaning,
checks and writing are tools.prepare_data's."""
import json
from pathlib import Path
from typing import NamedTuple

from dataset import DataError, read_captions_csv
from engine.errors import UserError

# Karpathy's splits; COCO's also has restval, which the literature trains on with train (113,287 images)
SPLITS = ["train", "restval", "train+restval", "val", "test", "all"]


class PrepareError(UserError, ValueError):
    """A source file or option that cannot be prepared as given."""


class Item(NamedTuple):
    name: str  # output file name, relative to OUT/images
    src: Path  # image to read
    captions: list  # in source order


class SourceOrder(list):
    """Items whose order is part of the benchmark, kept as the source gives it: Karpathy's files list each split's
    images in the order the papers' 1K folds cut (five runs of 1,000 consecutive test images), so prepare_data writes
    them in that order instead of sorting them by name."""


def fail(message):
    raise PrepareError(message)


def read_text(path):
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        fail(f"{path} not found")
    except IsADirectoryError:
        fail(f"{path} is a folder; pass the caption file")
    except UnicodeDecodeError:
        fail(f"{path} is not a UTF-8 text file")


def parse_json(path, text):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{path} is not valid JSON ({e})")
    except ValueError:  # Python refuses to parse an integer of more than 4300 digits
        fail(f"{path} holds a number too long to be an id or a count; it is not a caption file")
    except RecursionError:
        fail(f"{path} is nested too deeply to be a caption file")


def shown(value):
    """A value from a file, short enough for a one-line message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_id(path, where, value):
    # ids are dictionary keys and are printed: a list is unhashable, a bool or float is no id
    if type(value) not in (int, str):
        fail(f"{path}: {where} is {shown(value)}; ids must be integers or strings")
    return value


def check_name(path, where, value):
    if not isinstance(value, str) or not value:
        fail(f"{path}: {where} is {shown(value)}; image file names must be non-empty strings")
    return value


def is_karpathy(data):
    # Karpathy's files (dataset_coco.json, dataset_flickr30k.json) have 'images' with 'sentences', no 'annotations'
    return (isinstance(data, dict) and isinstance(data.get("images"), list) and "annotations" not in data
            and bool(data["images"]) and isinstance(data["images"][0], dict) and "sentences" in data["images"][0])


def read_coco(annotations, images_dir, split=None):
    data = parse_json(annotations, read_text(annotations))
    if is_karpathy(data):
        return read_karpathy(annotations, data, images_dir, split)
    if split not in (None, "all"):
        fail(f"--split {split} needs Karpathy's dataset_coco.json, but {annotations} is an official COCO caption "
             "file, which is one split already; leave out --split")
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        fail(f"{annotations} is not a COCO caption file (it needs 'images' and 'annotations' "
             "lists); pass annotations/captions_<split>2017.json")
    try:
        names = {check_id(annotations, f"the id of images[{n}]", image["id"]):
                 check_name(annotations, f"the file_name of images[{n}]", image["file_name"])
                 for n, image in enumerate(data["images"])}
        captions = {i: [] for i in names}  # image id -> captions; prepare() counts empty ones
        for n, ann in enumerate(data["annotations"]):
            if "caption" not in ann:
                fail(f"{annotations} has annotations without 'caption' (an instances or keypoints "
                     "file?); pass annotations/captions_<split>2017.json")
            image_id = check_id(annotations, f"the image_id of annotations[{n}]", ann["image_id"])
            if image_id not in names:
                fail(f"{annotations}: annotations[{n}] refers to image id {shown(image_id)}, which is not in "
                     "'images'")
            captions[image_id].append(ann["caption"])
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
    """Karpathy's dataset_coco.json or dataset_flickr30k.json: each entry's image is images_dir/[filepath/]filename
    (COCO's filepath is train2014 or val2014) and is written as its filename, which is unique in both files."""
    wanted = {"train+restval": {"train", "restval"}, None: None, "all": None}.get(split, {split})
    items, splits = [], set()
    for n, entry in enumerate(data["images"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("sentences"), list)
                and all(isinstance(s, dict) and "raw" in s for s in entry["sentences"])):
            fail(f"{path} is not Karpathy's dataset_flickr30k.json or dataset_coco.json (images[{n}] needs "
                 "'filename', 'split' and 'sentences' with 'raw')")
        name = check_name(path, f"the filename of images[{n}]", entry.get("filename"))
        folder = check_name(path, f"the filepath of images[{n}]", entry.get("filepath", "."))
        if Path(folder).is_absolute() or ".." in Path(folder).parts:  # the file names a folder; --images decides
            fail(f"{path}: the filepath of images[{n}] is {shown(folder)}, which leads outside --images; such "
                 "paths are refused")
        splits.add(check_name(path, f"the split of images[{n}]", entry.get("split")))
        if wanted is None or entry["split"] in wanted:
            items.append(Item(name, images_dir / folder / name, [s["raw"] for s in entry["sentences"]]))
    if not items:
        fail(f"{path} has no image in split {split} (its splits: {', '.join(sorted(map(shown, splits)))}); "
             "choose one of those")
    return SourceOrder(items)


def read_prepared(sources, out):
    items = []
    for source in sources:
        if source.resolve() == out.resolve():
            fail(f"--output {out} is also a source; merge into a new folder")
        csv_path = source / "captions.csv"
        if not csv_path.is_file():
            fail(f"{csv_path} not found; prepare {source} first with the coco or flickr30k command")
        try:
            rows = read_captions_csv(str(csv_path))
        except DataError as e:
            fail(str(e))
        captions = {}  # file name -> captions
        for _, (name, caption) in rows:
            captions.setdefault(name, []).append(caption)
        prefix = source.resolve().name
        items += [Item(f"{prefix}_{name}", source / "images" / name, caps) for name, caps in captions.items()]
    return items
