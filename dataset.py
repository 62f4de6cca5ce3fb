"""Image-caption data: `ROOT/captions.csv` (`filename,caption`) and `ROOT/images/`.

One row is one pair; an image may have several rows. Training iterates over pairs, evaluation over unique
images and all captions. The transforms, `normalize` and the tokenizer call here are the only ones in the project:
training, evaluation and inference all go through them. Loaders yield uint8 images; `normalize` runs on the device.
"""
import csv
import functools
import io
import os
import posixpath
import random
import warnings

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import v2

from engine.errors import DataError
from engine.images import CROP_RATIO, CROP_SCALE, DEFAULT_LIMITS, open_image
from engine.skips import Skips
from model import IMAGENET_MEAN, IMAGENET_STD


def read_captions_csv(path, columns=("filename", "caption")):
    """Rows of a UTF-8 CSV as tuples of `columns`, whitespace-normalised, with its line numbers: [(line, values)].

    The one reader of captions.csv-style files in the project. A byte-order mark (as spreadsheet programs save
    it) is accepted; bytes that are not UTF-8, a header without the columns and a row with more fields than the
    header are one-line DataErrors naming the line where the row starts, and so is a quote never closed or one
    whose field swallows lines that look like rows. File names are normalised (`./a.jpg` is `a.jpg`).
    """
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: a dataset folder needs captions.csv and images/ (see datasets/README.md)")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line} is not UTF-8 text; save the file as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, header, width, start, last = [], None, 0, 1, None
    try:
        for record in reader:  # reader.line_num is the line where the record ends; `start` where it began
            if reader.line_num > start:  # a quoted field spans lines
                _check_open_quote(path, record, start, reader.line_num)
            last = start
            if record and header is None:
                header, width = _check_header(path, record, columns), len(record)
            elif record:
                if len(record) > width:
                    raise DataError(f"{path} line {start} has {len(record)} fields, more than the header's "
                                    f"{width}; put captions that contain commas in double quotes")
                values = [" ".join(record[header[c]].split()) if header[c] < len(record) else "" for c in columns]
                rows.append((start, tuple(normalise_name(v) if c == "filename" else v
                                          for c, v in zip(columns, values, strict=True))))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path} line {start} is not valid CSV ({e})") from None
    if last is not None and _open_at_end(text, last):  # only the last record can hold a quote left open
        raise DataError(f"{path} line {last} opens a quote that is never closed; close it, or remove the "
                        f"stray double quote")
    if header is None:
        _check_header(path, [], columns)
    return rows


def _check_open_quote(path, record, start, end):
    """Refuse a field spanning lines `start`..`end` that swallowed lines holding a comma: rows, merged silently."""
    swallowed = [line for field in record for line in field.splitlines()[1:] if "," in line]
    if swallowed:  # the first one shown escaped: the message stays one line
        raise DataError(f"{path} line {start} opens a quote that runs to line {end} and swallows {len(swallowed)} "
                        f"line(s) that look like rows (first: {ascii(swallowed[0][:60])}); close the quote there")

def _open_at_end(text, start):
    """Whether a quote opened on line `start` is still open at the end (only a strict reader tells that from one
    closed on the last line)."""
    try:
        list(csv.reader(io.StringIO("".join(text.splitlines(keepends=True)[start - 1:]), newline=""), strict=True))
    except csv.Error as e:
        return "unexpected end of data" in str(e)
    return False


def _check_header(path, found, columns):
    """{column: index} of a header row that holds each of `columns` once, else a DataError."""
    if any(c not in found for c in columns) or any(found.count(c) > 1 for c in columns):
        header = ",".join(columns)
        shown = ascii(",".join(found))[1:-1] if found else "nothing"  # escaped: the message stays one line
        raise DataError(f"{path} must have the header '{header}' (each column once), found {shown[:200]}")
    return {c: found.index(c) for c in columns}


def normalise_name(name):
    """`./a.jpg`, `sub//b.jpg` -> `a.jpg`, `sub/b.jpg`: one spelling per file, so one image is counted once.
    Names that lead outside stay outside (`x/../../a.jpg` -> `../a.jpg`), and `inside` refuses them."""
    return posixpath.normpath(name) if name else name


def inside(folder, name):
    """The path of `name` under `folder`, or None when it is absolute or leads outside (`..`, a symlink)."""
    if not name or os.path.isabs(name) or "\\" in name or "\0" in name or ".." in name.split("/"):
        return None
    base = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(base, name))
    return path if path.startswith(base + os.sep) else None


def read_captions(root):
    """Return [(filename, caption)] from ROOT/captions.csv after checking it against ROOT/images/.

    Empty captions and exact duplicate rows are dropped with a warning; a file name that is absolute or leads
    outside ROOT/images/ is an error naming the row, and so is a listed image that does not exist.
    """
    path = os.path.join(root, "captions.csv")
    rows = read_captions_csv(path)
    image_dir = os.path.join(root, "images")
    first_line = {}
    for line, (name, _) in rows:
        first_line.setdefault(name, line)
    for name, line in first_line.items():  # each file name once: resolving links costs a system call
        if inside(image_dir, name) is None:
            raise DataError(f"{path} line {line}: file name '{name[:80]}' is absolute or leads outside "
                            f"{image_dir}/; file names must be relative paths inside images/")
    pairs = [values for _, values in rows]
    empty = sum(1 for _, cap in pairs if not cap)
    if empty:
        warnings.warn(f"{path}: dropped {empty} row(s) with an empty caption", stacklevel=2)
        pairs = [(n, c) for n, c in pairs if c]
    unique = list(dict.fromkeys(pairs))
    if len(unique) < len(pairs):
        warnings.warn(f"{path}: dropped {len(pairs) - len(unique)} exact duplicate row(s) (same file and caption); "
                      f"kept, they would count one caption several times", stacklevel=2)
        pairs = unique
    if not pairs:
        raise DataError(f"{path} has no captioned rows")
    missing = sorted({n for n, _ in pairs if not os.path.isfile(os.path.join(image_dir, n))})
    if missing:
        shown = ", ".join(missing[:5])
        raise DataError(f"{len(missing)} image(s) listed in {path} are missing from {image_dir}/ "
                        f"(first: {shown}); add them or remove their rows")
    return pairs


def image_transform(image_size, augment=False, jitter=True):
    """PIL image -> uint8 (3, H, W). Evaluation: short side to `image_size` then centre crop (aspect ratio kept).
    Training may augment. No horizontal flip: captions say "left" and "right".

    With `jitter=False` the training transform only crops and resizes, and also takes the uint8 tensors of
    `load_crop_source`; the colour jitter then runs on the batch (`engine.augment.color_jitter`).

    The output stays 8-bit on purpose: a quarter of the bytes of float32 go through the loader's shared memory
    and to the GPU. `normalize` makes the model's float input once the batch is on the device.
    """
    if augment and jitter:
        return T.Compose([T.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
                          T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2), T.PILToTensor()])
    if augment:
        # v2 draws the same crop as T.RandomResizedCrop and resizes uint8 tensors without a float copy;
        # its PILToTensor leaves tensors as they are
        return v2.Compose([v2.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
                           v2.PILToTensor()])
    return T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size), T.PILToTensor()])


@functools.lru_cache(maxsize=None)
def _mean_std(device):
    """ImageNet mean and std as (3, 1, 1) float32 tensors on `device`, made once per device."""
    def column(values):
        return torch.tensor(values, dtype=torch.float32, device=device).view(3, 1, 1)
    return column(IMAGENET_MEAN), column(IMAGENET_STD)


def normalize(images):
    """uint8 (B, 3, H, W) or (3, H, W) from `image_transform`, on any device -> float32, the model's input.

    The arithmetic of `ToTensor` + `Normalize` (divide by 255, subtract the mean, divide by the std), done on the
    device; the memory format (channels_last or not) is kept.
    """
    if images.dtype != torch.uint8:
        # a float tensor here would be normalised twice without a visible error
        raise TypeError(f"normalize expects the uint8 images of image_transform, got {images.dtype}")
    mean, std = _mean_std(images.device)
    return images.float().div_(255).sub_(mean).div_(std)  # .float() keeps the strides; the rest is in place


def tokenize(tokenizer, texts, max_length):
    """Pad to the longest caption in this batch (not in the dataset), truncate at max_length."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]  # (B, T), (B, T)


def choose_captions(name, captions, k, seed):
    """At most `k` of an image's captions, chosen by a seeded RNG of its own (so an image's choice does not depend
    on which other images are in the set) and kept in their original order. prepare_data's
    --captions-per-image and the one-caption-per-image protocol of evaluation both use this rule."""
    if k is None or len(captions) <= k:
        return captions
    rng = random.Random(f"{seed}:{name}")  # str seeds are hashed with SHA-512: same on every run
    return [captions[i] for i in sorted(rng.sample(range(len(captions)), k))]


def hold_out(image_files, count, seed):
    """`count` of the image files, drawn by a seeded RNG: a selection split that training never sees (all the
    captions of a held-out image go with it). Sorted, so the choice does not depend on the files' order."""
    return sorted(random.Random(f"select:{seed}").sample(sorted(image_files), count))


class PairDataset(Dataset):
    """One item per caption row: (uint8 image tensor, caption, image id, skipped). Same image file -> same id.

    With `strict=False` (training) an image that fails to decode is skipped: the next decodable row takes its
    place and `skipped` counts the failures (engine.skips); a run never stops for one bad file, batches keep size.
    """

    MAX_SKIPS = 16

    def __init__(self, root, transform, strict=True, min_size=None, random_crop=False, limits=DEFAULT_LIMITS,
                 only=None, exclude=(), pairs=None):
        self.root = root
        self.limits = limits
        self.pairs = read_captions(root) if pairs is None else pairs  # `pairs`: read_captions(root), already read
        if only is not None:  # a subset of the images (with all their captions): e.g. a held-out split
            only = set(only)
            self.pairs = [(n, c) for n, c in self.pairs if n in only]
        if exclude:
            exclude = set(exclude)
            self.pairs = [(n, c) for n, c in self.pairs if n not in exclude]
        self.image_files = sorted({n for n, _ in self.pairs})
        index = {n: i for i, n in enumerate(self.image_files)}
        self.image_ids = [index[n] for n, _ in self.pairs]
        self.transform = transform
        self.strict = strict
        self.min_size = min_size
        # decode for the training crop to `min_size` (load_crop_source): the transform then gets PIL images or
        # uint8 tensors, which image_transform(..., augment=True, jitter=False) takes
        self.random_crop = random_crop
        if random_crop and not min_size:
            raise ValueError("random_crop needs min_size, the side of the training crop")

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        for attempt in range(self.MAX_SKIPS):
            j = (i + attempt) % len(self.pairs)
            name, caption = self.pairs[j]
            try:
                image = open_image(os.path.join(self.root, "images", name), True, self.min_size, self.random_crop,
                                   self.limits)
            except DataError as e:
                if self.strict:
                    raise
                # named once per loader process (Python shows a warning text once); the epoch line counts them
                warnings.warn(f"training skips an image: {e}", stacklevel=2)
                continue
            failed = [self.pairs[(i + k) % len(self.pairs)][0] for k in range(attempt)]  # every row before j
            return self.transform(image), caption, self.image_ids[j], Skips(failed)
        raise DataError(f"{self.MAX_SKIPS} images in a row failed to decode in {self.root}/images/ "
                        f"(from {self.pairs[i][0]}); check the files")


class ImageDataset(Dataset):
    """Image files by index, each decoded once (evaluation and indexing).

    An item is (uint8 tensor or None, index, reason): a file that fails to decode never stops the loader; the
    caller decides whether that is an error (evaluation) or a skip to report (indexing). `collate_decoded`
    batches such items.
    """

    def __init__(self, paths, transform, min_size=None, limits=DEFAULT_LIMITS):
        self.paths = paths
        self.transform = transform
        self.min_size = min_size
        self.limits = limits

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = open_image(self.paths[i], strict=True, min_size=self.min_size, limits=self.limits)
        except DataError as e:
            return None, i, str(e)
        return self.transform(image), i, None


def collate_decoded(items):
    """ImageDataset items -> (uint8 (B, 3, H, W) of the decoded ones or None, their indices, [(index, reason)])."""
    good = [(t, i) for t, i, _ in items if t is not None]
    bad = [(i, why) for t, i, why in items if t is None]
    images = torch.stack([t for t, _ in good]) if good else None  # (B, 3, H, W)
    return images, [i for _, i in good], bad


class PairCollate:
    """Stack images, tokenise the batch's captions, sum the skipped-image counts and list their files."""

    def __init__(self, tokenizer, max_length):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items):
        images, captions, ids, skipped = zip(*items, strict=True)
        input_ids, attention_mask = tokenize(self.tokenizer, captions, self.max_length)
        return {"images": torch.stack(images),  # (B, 3, H, W) uint8
                "input_ids": input_ids, "attention_mask": attention_mask,  # (B, T)
                "image_ids": torch.tensor(ids, dtype=torch.long),  # (B,)
                "skipped": sum(skipped), "skipped_files": [n for s in skipped for n in getattr(s, "files", ())]}


def resolve_workers(num_workers):
    """`auto`: one worker per core, leaving one for the main process, at most 8."""
    if num_workers == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(8, cores - 1))
    if not isinstance(num_workers, int) or num_workers < 0:
        raise DataError(f"num-workers must be 'auto' or a whole number >= 0, got {num_workers!r}")
    return num_workers


def make_loader(dataset, batch_size, num_workers, device, shuffle=False, sampler=None, collate_fn=None,
                drop_last=False):
    workers = resolve_workers(num_workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate_fn, drop_last=drop_last, persistent_workers=workers > 0,
                      pin_memory=torch.device(device).type == "cuda", prefetch_factor=4 if workers > 0 else None)

