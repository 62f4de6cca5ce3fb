"""An image index: the embeddings of every image under a folder, with the file names, searchable by inner product.

An index is a folder: `index.json` (the images root, the relative file names with their sizes and times, and
the checkpoint's path, size and SHA-256) and `embeddings-*.npy` ((N, D) float16, L2-normalised rows, in the
order of the file names). Building again on a grown folder encodes only new or changed files and drops deleted
ones. An index made with another checkpoint is refused; `rebuild=True` re-encodes everything instead.
"""
import json
import os
import sys
import uuid

import numpy as np
import torch

from dataset import inside, read_captions_csv
from engine.errors import UserError
from engine.files import atomic_write
from inference.encoder import list_images

FORMAT = 1  # bump when the layout of index.json changes
REQUIRED_KEYS = {"root", "checkpoint", "dim", "files", "sizes", "mtimes", "embeddings"}


class SearchError(UserError, ValueError):
    """A problem with an index or a query that the user can fix."""


class ImageIndex:
    """Image embeddings and their file names, searchable by inner product (= cosine: rows are normalised)."""

    def __init__(self, folder, meta, embeddings):
        self.folder = folder
        self.meta = meta
        self.root = meta["root"]
        self.files = meta["files"]
        self.embeddings = torch.from_numpy(embeddings.astype(np.float32))  # (N, D)
        self.faiss = None

    def __len__(self):
        return len(self.files)

    @property
    def checkpoint(self):
        return self.meta["checkpoint"]

    def model_path(self):
        """The checkpoint the images were encoded with, for when no --model-path is given."""
        path = self.checkpoint["path"]
        if not os.path.isfile(path):
            raise SearchError(f"index '{self.folder}' was built with {path}, which no longer exists; "
                              f"pass --model-path with that checkpoint's new path")
        return path

    def path(self, i):
        """Absolute path of image `i`, or None when it would resolve outside the root (e.g. through a link).

        Only names stored in the index are ever joined to the root.
        """
        return inside(self.root, self.files[i])

    @classmethod
    def load(cls, folder):
        meta = read_meta(folder)
        if meta is None:
            raise SearchError(f"'{folder}' is not an index (no index.json); make one with "
                              f"'python -m inference.search index'")
        path = inside(folder, meta["embeddings"])
        if path is None or not os.path.isfile(path):
            raise SearchError(f"index '{folder}' lacks {meta['embeddings']}; rebuild the index with --rebuild")
        try:
            embeddings = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise SearchError(f"{path} is not a readable embeddings file ({str(e).splitlines()[0][:80]}); "
                              f"rebuild the index with --rebuild") from None
        if embeddings.ndim != 2 or embeddings.dtype.kind != "f" or \
                embeddings.shape != (len(meta["files"]), meta["dim"]):
            raise SearchError(f"index '{folder}' is inconsistent ({embeddings.shape[0]} embeddings for "
                              f"{len(meta['files'])} files); rebuild the index with --rebuild")
        return cls(folder, meta, embeddings)

    def use_faiss(self):
        """Search through FAISS's exact inner-product index (same results, optional dependency)."""
        try:
            import faiss
        except ImportError:
            raise SearchError("--faiss needs the faiss package: pip install faiss-cpu (or drop --faiss)") from None
        self.faiss = faiss.IndexFlatIP(self.embeddings.shape[1])
        self.faiss.add(np.ascontiguousarray(self.embeddings.numpy()))
        return self

    def search(self, queries, k):
        """(Q, D) normalised queries -> (scores, ids), each (Q, min(k, N)), best first."""
        k = min(k, len(self))
        if k == 0:
            return torch.empty(len(queries), 0), torch.empty(len(queries), 0, dtype=torch.long)
        if self.faiss is not None:
            scores, ids = self.faiss.search(np.ascontiguousarray(queries.float().numpy()), k)
            return torch.from_numpy(scores), torch.from_numpy(ids).long()
        return (queries.float() @ self.embeddings.T).topk(k, dim=1)  # (Q, N) -> (Q, k)

    def check_encoder(self, encoder):
        """Refuse to search with a model other than the one the images were encoded with."""
        if encoder.identity()["sha256"] != self.checkpoint["sha256"]:
            raise SearchError(f"index '{self.folder}' was built with {self.checkpoint['path']} "
                              f"(sha256 {self.checkpoint['sha256'][:12]}), not with {encoder.model_path}; "
                              f"use that checkpoint or re-index with --rebuild")


def read_meta(folder):
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise SearchError(f"cannot read {path} ({e}); rebuild the index with --rebuild") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SearchError(f"{path} is not a format-{FORMAT} index; rebuild the index with --rebuild")
    missing = sorted(REQUIRED_KEYS - meta.keys())
    if missing:
        raise SearchError(f"{path} lacks {', '.join(missing)}; rebuild the index with --rebuild")
    files = meta["files"]
    n = len(files) if isinstance(files, list) else -1
    well_typed = (isinstance(meta["root"], str) and isinstance(meta["embeddings"], str)
                  and isinstance(meta["dim"], int) and n >= 0 and all(isinstance(f, str) for f in files)
                  and all(isinstance(meta[k], list) and len(meta[k]) == n and all(isinstance(v, int) for v in meta[k])
                          for k in ("sizes", "mtimes"))
                  and isinstance(meta["checkpoint"], dict)
                  and all(isinstance(meta["checkpoint"].get(k), str) for k in ("path", "sha256")))
    if not well_typed:
        raise SearchError(f"{path} has fields of the wrong type; rebuild the index with --rebuild")
    # Lexical containment for every name (cheap); links are resolved when a file is served (ImageIndex.path).
    outside = [f for f in files if not f or f.startswith("/") or "\\" in f or ".." in f.split("/")]
    if outside:
        raise SearchError(f"{path} names a file outside its root ('{outside[0][:80]}'); rebuild the index with "
                          f"--rebuild")
    return meta


def build_index(encoder, images_root, out, rebuild=False, progress=True):
    """Create or update the index at `out` from every image under `images_root`; returns a summary dict."""
    if not os.path.isdir(images_root):
        raise SearchError(f"image folder '{images_root}' does not exist")
    root = os.path.abspath(images_root)
    names = list_images(root)
    if not names:
        raise SearchError(f"no .jpg/.jpeg/.png/.webp images under '{images_root}'")
    stats = {n: os.stat(os.path.join(root, n)) for n in names}
    identity = encoder.identity()

    old = None if rebuild else read_meta(out)
    if old is not None:
        if old["checkpoint"]["sha256"] != identity["sha256"]:
            raise SearchError(f"index '{out}' was built with another checkpoint ({old['checkpoint']['path']}); "
                              f"pass --rebuild to re-encode every image with {encoder.model_path}, "
                              f"or choose another --output")
        if old["root"] != root:
            raise SearchError(f"index '{out}' holds images of {old['root']}, not {root}; "
                              f"pass --rebuild to replace it, or choose another --output")
        old_rows = ImageIndex.load(out).embeddings
    # A file is reused when its name, size and modification time are unchanged.
    reuse = {}
    if old is not None:
        for i, (name, size, mtime) in enumerate(zip(old["files"], old["sizes"], old["mtimes"])):
            st = stats.get(name)
            if st is not None and st.st_size == size and st.st_mtime_ns == mtime:
                reuse[name] = old_rows[i]
    todo = [n for n in names if n not in reuse]
    feats, kept, failed = encoder.encode_image_files([os.path.join(root, n) for n in todo], progress)
    fresh = {todo[i]: feats[j] for j, i in enumerate(kept)}
    for i, reason in failed:
        print(f"skipped {todo[i]}: {reason}", file=sys.stderr)

    files = [n for n in names if n in reuse or n in fresh]
    if not files:
        raise SearchError(f"none of the {len(names)} images under '{images_root}' could be decoded")
    rows = torch.stack([reuse[n] if n in reuse else fresh[n] for n in files])  # (N, D)
    meta = {"format": FORMAT, "root": root, "checkpoint": identity, "dim": int(rows.shape[1]),
            "image_size": encoder.image_size, "files": files,
            "sizes": [stats[n].st_size for n in files], "mtimes": [stats[n].st_mtime_ns for n in files],
            "failed": [todo[i] for i, _ in failed]}
    write_index(out, meta, rows.numpy().astype(np.float16))
    removed = 0 if old is None else len(set(old["files"]) - set(names))
    return {"images": len(files), "new": len(fresh), "unchanged": len(reuse), "removed": removed,
            "failed": len(failed)}


def write_index(out, meta, embeddings):
    """Embeddings go to a fresh file name; replacing index.json is the single step that makes them current,
    so an interrupted run leaves the previous index intact."""
    os.makedirs(out, exist_ok=True)
    name = f"embeddings-{uuid.uuid4().hex[:8]}.npy"
    atomic_write(os.path.join(out, name), lambda f: np.save(f, embeddings), binary=True)
    meta = {**meta, "embeddings": name}
    atomic_write(os.path.join(out, "index.json"), lambda f: json.dump(meta, f))
    for other in os.listdir(out):
        if other.startswith("embeddings-") and other.endswith(".npy") and other != name:
            os.remove(os.path.join(out, other))


def read_captions_file(path):
    """Captions to rank for image -> text: a CSV with a `caption` column, or a text file with one per line."""
    if not os.path.isfile(path):
        raise SearchError(f"captions file '{path}' does not exist")
    if path.lower().endswith(".csv"):
        captions = [values[0] for _, values in read_captions_csv(path, columns=("caption",))]
    else:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            captions = [" ".join(line.split()) for line in f]
    captions = list(dict.fromkeys(c for c in captions if c))  # unique, in file order
    if not captions:
        raise SearchError(f"{path} holds no captions")
    return captions
