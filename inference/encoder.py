"""Use a trained checkpoint: encode images and texts exactly as evaluation does, and classify zero-shot.

    from inference.encoder import Encoder
    enc = Encoder("checkpoints/best.pt")
    img = enc.encode_images([enc.open_image("cat.jpg")])            # (1, D), L2-normalised
    probs = enc.classify(img, ["cat", "dog", "car"])                 # (1, 3), rows sum to 1

search, classify, serve and export all go through this module; encoding is engine.evaluation's and the
transforms and tokenizer call are dataset.py's, so training, evaluation and inference preprocess identically.
"""
import hashlib
import os
from collections import Counter

import torch

from dataset import image_transform
from engine.checkpoint import load_trained
from engine.errors import UserError
from engine.evaluation import (
    Encoding,
    encode_image_batch,
    encode_image_files,
    encode_texts,
)
from engine.files import require_file
from engine.images import DEFAULT_LIMITS, check_size, open_image, to_rgb
from engine.model_folder import weights_identity_file
from engine.runtime import amp_context, resolve_device

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


class InferenceError(UserError, ValueError):
    """Something the user passed cannot be used (a bad label list, a template without `{}`)."""


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
                 amp_dtype="float16", limits=DEFAULT_LIMITS):
        self.device = resolve_device(device)
        self.model, self.tokenizer, self.run_cfg = load_trained(model_path, self.device, text_model)
        self.model_path = model_path
        self.image_size = self.run_cfg["image-size"]
        self.max_length = self.run_cfg["max-length"]
        self.transform = image_transform(self.image_size)  # the eval transform: resize, centre crop, to uint8
        self.enc = Encoding(self.image_size, self.max_length, batch_size, num_workers, self.device,
                            amp_context(self.device, use_amp, amp_dtype), limits)
        self._identity = None

    @property
    def dim(self):
        return self.model.dim

    def logit_scale(self):
        return float(self.model.logit_scale())

    def identity(self):
        """{"path", "size", "sha256"} of the checkpoint file (of a model folder's weights); hashed once, on first
        use."""
        if self._identity is None:
            weights = weights_identity_file(self.model_path)
            self._identity = {"path": os.path.abspath(self.model_path), "size": os.path.getsize(weights),
                              "sha256": file_sha256(weights)}
        return self._identity

    # ------------------------------------------------------------------ images
    def open_image(self, path_or_file):
        """Decode a file (path or binary file object) as RGB, the way the data loaders do; DataError if it can't."""
        return open_image(path_or_file, strict=True, min_size=self.image_size, limits=self.enc.limits)

    @torch.no_grad()
    def encode_images(self, images):
        """(N, D) float32 CPU features of PIL images (or image paths, which must all decode)."""
        if not images:
            return torch.empty(0, self.dim)
        feats = []
        step = self.enc.batch_size
        for s in range(0, len(images), step):
            chunk = [self._as_rgb(x) for x in images[s:s + step]]
            feats.append(encode_image_batch(self.model, torch.stack([self.transform(im) for im in chunk]), self.enc))
        return torch.cat(feats)

    def _as_rgb(self, image):
        if isinstance(image, (str, os.PathLike)):
            return self.open_image(image)
        check_size(*image.size, self.enc.limits, "in memory")
        return to_rgb(image)  # the conversion training uses (alpha over white, 16-bit scaled, CMYK)

    def encode_image_files(self, paths, progress=False):
        """Encode files, skipping those that fail to decode: returns ((M, D) features, kept indices, failed)."""
        if not paths:
            return torch.empty(0, self.dim), [], []
        return encode_image_files(self.model, paths, self.enc, progress)

    # ------------------------------------------------------------------ texts
    def encode_texts(self, texts, progress=False):
        """(N, D) float32 CPU features, tokenised and truncated exactly as in training."""
        if not texts:
            return torch.empty(0, self.dim)
        return encode_texts(self.model, self.tokenizer, list(texts), self.enc, progress)

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


def check_labels(labels, how="pass at least one, e.g. --labels 'cat,dog'"):
    """Labels with whitespace collapsed and blanks dropped; none, or one twice, is an error (`how`: the advice
    of the entry that asks, e.g. the form field of the web API)."""
    labels = [" ".join(str(x).split()) for x in labels]
    labels = [x for x in labels if x]
    if not labels:
        raise InferenceError(f"no labels given: {how}")
    duplicates = sorted(x for x, n in Counter(labels).items() if n > 1)  # linear: a request may send many
    if duplicates:
        raise InferenceError(f"label(s) given twice: {', '.join(duplicates)}")
    return labels


def check_templates(templates):
    templates = [t.strip() for t in templates if t.strip()]
    if not templates:
        raise InferenceError("no prompt templates given; each template is a line holding {} for the label")
    for t in templates:  # str.replace would write the label into every {}
        if t.count("{}") != 1:
            where = "has no {}" if "{}" not in t else f"has {t.count('{}')} {{}}s; it must hold exactly one {{}}"
            raise InferenceError(f"template '{t}' {where} where the label goes")
    return templates


def read_lines(path, what):
    """Non-empty stripped lines of a UTF-8 text file (labels, templates, captions); anything else (an image
    passed by mistake) is an InferenceError, never lines of garbage."""
    advice = f"pass a UTF-8 text file with one {what[:-1]} per line"
    require_file(path, f"{what} file", advice)
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise InferenceError(f"{what} file '{path}' is not UTF-8 text; {advice}") from None
    if "\0" in text:
        raise InferenceError(f"{what} file '{path}' is not UTF-8 text (it holds NUL bytes); {advice}")
    return [line.strip() for line in text.split("\n") if line.strip()]


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
