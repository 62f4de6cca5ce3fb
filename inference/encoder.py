"""Use a trained checkpoint: encode images and texts exactly as evaluation does, and classify zero-shot.

    from inference import Encoder
    enc = Encoder("checkpoints/best.pt")
    img = enc.encode_images([enc.open_image("cat.jpg")])            # (1, D), L2-normalised
    probs = enc.classify(img, ["cat", "dog", "car"])                 # (1, 3), rows sum to 1

search.py, classify.py, serve.py and export.py all go through this module; the transforms and the tokenizer
call come from dataset.py, so training, evaluation and inference preprocess identically.
"""
import hashlib
import os

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from dataset import DataError, image_transform, make_loader, normalize, open_image, to_rgb
from eval import USER_ERRORS, encode_texts, load_trained
from runtime import amp_context, resolve_device

# Prompt templates for zero-shot labels (a subset of CLIP's ImageNet prompts); `{}` is replaced by the label.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class InferenceError(ValueError):
    """Something the user passed cannot be used (a bad label list, a template without `{}`)."""


# Everything a user can get wrong on the way to an encoder, for the entry scripts to print in one line.
INFERENCE_ERRORS = USER_ERRORS + (InferenceError,)


def file_sha256(path, chunk=1 << 20):
    """Hex SHA-256 of a file's bytes: the identity of a checkpoint that an index was built with."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Encoder:
    """A checkpoint's model and tokenizer in eval mode, with the preprocessing it was trained with."""

    def __init__(self, model_path, device="auto", text_model=None, batch_size=64, num_workers=0, use_amp=True,
                 amp_dtype="float16"):
        self.device = resolve_device(device)
        self.model, self.tokenizer, self.run_cfg = load_trained(model_path, self.device, text_model)
        self.model_path = model_path
        self.image_size = self.run_cfg["image-size"]
        self.max_length = self.run_cfg["max-length"]
        self.transform = image_transform(self.image_size)  # the eval transform: resize, centre crop, to uint8
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.amp = amp_context(self.device, use_amp, amp_dtype)
        self._identity = None

    @property
    def dim(self):
        return self.model.dim

    def logit_scale(self):
        return float(self.model.logit_scale())

    def identity(self):
        """{"path", "size", "sha256"} of the checkpoint file; hashed once, on first use."""
        if self._identity is None:
            self._identity = {"path": os.path.abspath(self.model_path), "size": os.path.getsize(self.model_path),
                              "sha256": file_sha256(self.model_path)}
        return self._identity

    # ------------------------------------------------------------------ images
    def open_image(self, path_or_file):
        """Decode a file (path or binary file object) as RGB, the way the data loaders do; DataError if it can't."""
        return open_image(path_or_file, strict=True, min_size=self.image_size)

    @torch.no_grad()
    def encode_images(self, images):
        """(N, D) float32 CPU features of PIL images (or image paths, which must all decode)."""
        if not images:
            return torch.empty(0, self.dim)
        feats = []
        for s in range(0, len(images), self.batch_size):
            chunk = [self._as_rgb(x) for x in images[s:s + self.batch_size]]
            feats.append(self._encode_batch(torch.stack([self.transform(im) for im in chunk])))
        return torch.cat(feats)

    def _as_rgb(self, image):
        if isinstance(image, (str, os.PathLike)):
            return self.open_image(image)
        return to_rgb(image)  # the conversion training uses (alpha over white, 16-bit scaled, CMYK)

    def encode_image_files(self, paths, progress=False):
        """Encode files, skipping those that fail to decode: returns ((M, D) features, kept indices, failed)."""
        if not paths:
            return torch.empty(0, self.dim), [], []
        data = _FileImages(paths, self.transform, self.image_size)
        loader = make_loader(data, self.batch_size, self.num_workers, self.device, collate_fn=_collate_decoded)
        feats, kept, failed = [], [], []
        with torch.no_grad():
            for images, idx, bad in tqdm(loader, desc="images", disable=not progress, dynamic_ncols=True):
                failed += bad
                if idx:
                    feats.append(self._encode_batch(images))
                    kept += idx
        feats = torch.cat(feats) if feats else torch.empty(0, self.dim)
        return feats, kept, failed  # (M, D), [M indices into paths], [(index, reason)]

    def _encode_batch(self, images):  # uint8 (B, 3, H, W) -> (B, D); normalised here, on the device
        images = normalize(images.to(self.device).contiguous(memory_format=torch.channels_last))
        with self.amp:
            return self.model.encode_image(images).float().cpu()

    # ------------------------------------------------------------------ texts
    def encode_texts(self, texts, progress=False):
        """(N, D) float32 CPU features, tokenised and truncated exactly as in training."""
        if not texts:
            return torch.empty(0, self.dim)
        return encode_texts(self.model, self.tokenizer, list(texts), self.max_length, self.batch_size,
                            self.device, self.amp, progress)

    # ------------------------------------------------------------------ zero-shot
    def label_embeddings(self, labels, templates=DEFAULT_TEMPLATES):
        """(L, D): each label's template embeddings averaged, then renormalised (CLIP's prompt ensembling)."""
        labels, templates = check_labels(labels), check_templates(templates)
        prompts = [t.replace("{}", label) for label in labels for t in templates]
        feats = self.encode_texts(prompts).view(len(labels), len(templates), -1)  # (L, T, D)
        return torch.nn.functional.normalize(feats.mean(dim=1), dim=-1)  # (L, D)

    def classify(self, image_feats, labels, templates=DEFAULT_TEMPLATES):
        """(N, L) probabilities: softmax over labels of logit_scale * cosine similarity."""
        weights = self.label_embeddings(labels, templates)
        return zero_shot_probs(image_feats, weights, self.logit_scale())


def zero_shot_probs(image_feats, label_feats, logit_scale):
    """(N, D) image features, (L, D) label features -> (N, L) softmax probabilities."""
    return torch.softmax(logit_scale * image_feats @ label_feats.T, dim=-1)


def check_labels(labels):
    labels = [" ".join(str(x).split()) for x in labels]
    labels = [x for x in labels if x]
    if not labels:
        raise InferenceError("no labels given: pass at least one, e.g. --labels 'cat,dog'")
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise InferenceError(f"label(s) given twice: {', '.join(duplicates)}")
    return labels


def check_templates(templates):
    templates = [t.strip() for t in templates if t.strip()]
    if not templates:
        raise InferenceError("no prompt templates given; each template is a line holding {} for the label")
    missing = [t for t in templates if "{}" not in t]
    if missing:
        raise InferenceError(f"template '{missing[0]}' has no {{}} where the label goes")
    return templates


def read_lines(path, what):
    """Non-empty stripped lines of a UTF-8 text file (labels, templates, captions)."""
    if not os.path.isfile(path):
        raise InferenceError(f"{what} file '{path}' does not exist")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def list_images(root):
    """Relative POSIX paths of every image under `root`, recursively, sorted. Hidden files and folders are
    skipped; links to folders are not followed (a link loop would never end)."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                out.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(out)


class _FileImages(Dataset):
    """Image files by index; an item is (tensor or None, index, reason) so one bad file never stops a run."""

    def __init__(self, paths, transform, min_size):
        self.paths, self.transform, self.min_size = paths, transform, min_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = open_image(self.paths[i], strict=True, min_size=self.min_size)
        except DataError as e:
            return None, i, str(e)
        return self.transform(image), i, None


def _collate_decoded(items):
    good = [(t, i) for t, i, _ in items if t is not None]
    bad = [(i, why) for t, i, why in items if t is None]
    images = torch.stack([t for t, _ in good]) if good else None  # (B, 3, H, W)
    return images, [i for _, i in good], bad
