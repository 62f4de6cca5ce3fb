"""An image index: the embeddings of every image under a folder, with the file names, searchable by inner product.

An index is a folder: `index.json` (the images root, the relative file names with their sizes and times, the
checkpoint's path, size and SHA-256, the index type), `embeddings-*.npy` ((N, D) float16, L2-normalised rows in
the order of the file names) and, for the approximate types, `ann-*.faiss` (inference/ann.py). Types:
- `flat` (default): exact. The embeddings are memory-mapped (a million images open in seconds, with no float32
  copy in RAM) and searched BLOCK_ROWS rows at a time, merging the top k: one matrix product for small indexes.
- `ivf`, `hnsw`: approximate, through FAISS (pip install faiss-cpu); query-time settings via `ImageIndex.tune`.

Building again on a grown folder encodes only new or changed files and drops deleted ones: unchanged files keep
their order and new and changed ones are appended, so an addition changes no id. The ANN structure is then
extended (`ann.add`) when files were only added, refilled from the embeddings (`ann.rebuild`; ivf keeps its
centroids) when files were removed or changed, and built anew (nothing is re-encoded) when the type or a build
setting differs from the stored one or its file cannot be read. An index made with another checkpoint is
refused; `rebuild=True` re-encodes everything. Format-1 indexes (before the types) are read as flat. New files
get fresh names and index.json is replaced last, so an interrupted run leaves the previous index intact
(inference/index_files.py); an output that is a file, another index or a folder of other things is refused.

An index folder is data from wherever it came, never a key to the disk. Whoever reads one (search, serve, the web
page) names a trusted root (`--trusted-root`, default the working folder): the index's image root must lie inside
it or inside the index folder, every file is served only from inside that image root, and the checkpoint the index
names is loaded (when no --model-path is given) only from inside the same folders. Anything else is refused at
load with one line.
"""
import os
import sys

import numpy as np
import torch

from dataset import inside
from engine.errors import shorten
from engine.files import require_folder
from inference import ann
from inference.encoder import list_images
from inference.index_files import FORMAT, SearchError, check_output_folder, read_meta, write_index

BLOCK_ROWS = 65536  # rows converted to float32 at a time by the exact search: 128 MB at D = 512
BUILD_FLAGS = {"nlist": ("--nlist", "ivf"), "m": ("--m", "hnsw"), "ef_construction": ("--ef-construction", "hnsw")}


class ImageIndex:
    """Image embeddings and their file names, searchable by inner product (= cosine: rows are normalised)."""

    def __init__(self, folder, meta, embeddings, ann_index=None, trusted=None):
        self.folder = folder
        self.trusted = trusted  # the folders the index may point into; None: the caller vouches for it
        self.meta = meta
        self.root = meta["root"]
        self.files = meta["files"]
        self.kind = meta["index_type"]
        self.embeddings = embeddings  # (N, D) float16, memory-mapped: read in blocks, never copied whole
        self.ann = ann_index  # the FAISS structure of an ivf or hnsw index; None for flat
        self.nprobe = self.ef_search = None  # None: the values stored in the ANN structure

    def __len__(self):
        return len(self.files)

    @property
    def checkpoint(self):
        return self.meta["checkpoint"]

    def model_path(self):
        """The checkpoint the images were encoded with, for when no --model-path is given."""
        path = self.checkpoint["path"]
        if self.trusted is not None and not within(path, self.trusted):
            raise SearchError(f"index '{self.folder}' names the checkpoint {shorten(path, 120)}, outside "
                              f"--trusted-root '{self.trusted[1]}' and the index folder; pass --model-path with a "
                              f"checkpoint you chose")
        if not os.path.exists(path):  # a checkpoint file or a model folder
            raise SearchError(f"index '{self.folder}' was built with {path}, which no longer exists; "
                              f"pass --model-path with that checkpoint's new path")
        return path

    def path(self, i):
        """Absolute path of image `i` (only stored names are joined to the root), or None when it would resolve
        outside the root (e.g. through a link)."""
        return inside(self.root, self.files[i])

    @classmethod
    def load(cls, folder, with_ann=True, trusted_root=None):
        """The index at `folder`. With `trusted_root` (what the command line's --trusted-root gives), an index
        whose image root lies outside both it and `folder` is refused, and so later is its checkpoint (module
        docstring); None is for callers that built the index themselves."""
        require_folder(folder, "index", "pass --index a folder made by 'python -m inference.search index'")
        meta = read_meta(folder)
        if meta is None:
            raise SearchError(f"'{folder}' is not an index (no index.json); make one with "
                              f"'python -m inference.search index'")
        trusted = None if trusted_root is None else (folder, trusted_root)
        if trusted is not None and not within(meta["root"], trusted):
            raise SearchError(f"index '{folder}' names its images under {shorten(meta['root'], 120)}, outside "
                              f"--trusted-root '{trusted_root}' and the index folder; if you trust this index, pass "
                              f"--trusted-root a folder that holds its images")
        path = inside(folder, meta["embeddings"])
        if path is None or not os.path.isfile(path):
            raise SearchError(f"index '{folder}' lacks {meta['embeddings']}; rebuild the index with --rebuild")
        try:
            embeddings = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise SearchError(f"{path} is not a readable embeddings file ({str(e).splitlines()[0][:80]}); "
                              f"rebuild the index with --rebuild") from None
        check_embeddings(folder, embeddings, meta)
        ann_index = load_ann(folder, meta) if with_ann and meta["index_type"] != "flat" else None
        return cls(folder, meta, embeddings, ann_index, trusted)

    def tune(self, nprobe=None, ef_search=None):
        """Query-time settings of the approximate types (None: the index's own, see `settings`)."""
        for flag, value, kind in (("--nprobe", nprobe, "ivf"), ("--ef-search", ef_search, "hnsw")):
            if value is not None and self.kind != kind:
                raise SearchError(f"{flag} applies to {kind} indexes only; index '{self.folder}' is {self.kind}")
            if value is not None and value < 1:
                raise SearchError(f"{flag} must be at least 1, got {value}")
        self.nprobe, self.ef_search = nprobe, ef_search
        return self

    def settings(self):
        """The index type and the settings searches use, e.g. {"type": "ivf", "nlist": 100, "nprobe": 64}."""
        if self.ann is None:
            return {"type": self.kind}
        info = {k: v for k, v in ann.describe(self.ann).items() if k not in ("kind", "rows", "dim")}
        if self.nprobe is not None:
            info["nprobe"] = min(self.nprobe, info["nlist"])  # ann.search caps it the same way
        if self.ef_search is not None:
            info["ef_search"] = self.ef_search
        return {"type": self.kind, **info}

    def search(self, queries, k):
        """(Q, D) normalised queries -> (scores, ids), each (Q, min(k, N)), best first. An ivf search whose probed
        lists hold fewer than k images ends its rows with id -1 and score -inf."""
        k = min(k, len(self))
        if k == 0:
            return torch.empty(len(queries), 0), torch.empty(len(queries), 0, dtype=torch.long)
        if self.ann is not None:
            scores, ids = ann.search(self.ann, queries.float().numpy(), k, self.nprobe, self.ef_search)
            scores, ids = torch.from_numpy(scores), torch.from_numpy(ids)
        else:
            scores, ids = exact_search(self.embeddings, queries.float(), k, BLOCK_ROWS)
        # float16 rows have norms off 1 by up to ~1e-3: a cosine is reported within [-1, 1] (ordering unchanged)
        return torch.where(ids >= 0, scores.clamp(-1, 1), scores), ids

    def check_encoder(self, encoder):
        """Refuse to search with a model other than the one the images were encoded with."""
        if encoder.identity()["sha256"] != self.checkpoint["sha256"]:
            raise SearchError(f"index '{self.folder}' was built with {self.checkpoint['path']} "
                              f"(sha256 {self.checkpoint['sha256'][:12]}), not with {encoder.model_path}; "
                              f"use that checkpoint or re-index with --rebuild")


def within(path, folders):
    """Whether `path`, links resolved, is one of `folders` (links resolved) or lies inside one."""
    real = os.path.realpath(path)
    bases = [os.path.realpath(f) for f in folders]
    return any(real == b or real.startswith(b.rstrip(os.sep) + os.sep) for b in bases)


def check_embeddings(folder, embeddings, meta):
    """Refuse embeddings that do not fit index.json, saying what is wrong: shape, type, or values that are not
    finite (which would give NaN scores). The scan reads BLOCK_ROWS rows at a time, never the whole file."""
    problem = None
    if embeddings.ndim != 2:
        problem = f"its embeddings have {embeddings.ndim} dimensions, not 2"
    elif embeddings.dtype.kind != "f":
        problem = f"its embeddings are {embeddings.dtype}, not floating point"
    elif embeddings.shape[0] != len(meta["files"]):
        problem = f"{embeddings.shape[0]} embeddings for {len(meta['files'])} files"
    elif embeddings.shape[1] != meta["dim"]:
        problem = f"its embeddings have {embeddings.shape[1]} values each, index.json says dim {meta['dim']}"
    else:
        for start in range(0, len(embeddings), BLOCK_ROWS):
            bad = ~np.isfinite(embeddings[start:start + BLOCK_ROWS]).all(axis=1)
            if bad.any():
                problem = f"embedding {start + int(bad.argmax())} holds NaN or infinite values"
                break
    if problem:
        raise SearchError(f"index '{folder}' is inconsistent ({problem}); rebuild the index with --rebuild")


def exact_search(embeddings, queries, k, block_rows=BLOCK_ROWS):
    """Top-k inner products of (Q, D) float32 queries with (N, D) rows, read `block_rows` rows at a time so that
    memory holds one float32 block and its (Q, block_rows) scores, whatever N is."""
    best_scores, best_ids = queries.new_empty(len(queries), 0), torch.empty(len(queries), 0, dtype=torch.long)
    for start in range(0, len(embeddings), block_rows):
        block = torch.from_numpy(np.asarray(embeddings[start:start + block_rows], dtype=np.float32))  # (b, D)
        scores, ids = (queries @ block.T).topk(min(k, len(block)), dim=1)  # (Q, b) -> (Q, k')
        scores, ids = torch.cat([best_scores, scores], 1), torch.cat([best_ids, ids + start], 1)  # (Q, <= 2k)
        best_scores, order = scores.topk(min(k, scores.shape[1]), dim=1)
        best_ids = ids.gather(1, order)
    return best_scores, best_ids


def _need_faiss(folder, kind):
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise SearchError(f"index '{folder}' is of type {kind}, which needs the faiss package: "
                          f"pip install faiss-cpu (or build a flat index)") from None


def load_ann(folder, meta):
    """The FAISS structure of an ivf/hnsw index, checked against index.json (type, rows, dimension)."""
    kind, name = meta["index_type"], meta["ann"]
    _need_faiss(folder, kind)
    path = inside(folder, name)
    if path is None or not os.path.isfile(path):
        raise SearchError(f"index '{folder}' lacks its {kind} file {name}; rebuild the index with --rebuild")
    try:
        index = ann.load(path)
        fits = ann.kind_of(index) == kind and (index.ntotal, index.d) == (len(meta["files"]), meta["dim"])
    except ann.AnnError:
        fits = False
    if not fits:
        raise SearchError(f"{path} is not the {kind} index of these {len(meta['files'])} images; "
                          f"rebuild the index with --rebuild")
    return index


def build_index(encoder, images_root, out, rebuild=False, progress=True, index_type=None, nlist=None, m=None,
                ef_construction=None):
    """Create or update the index at `out` from every image under `images_root`; returns a summary dict.

    `index_type` None keeps the existing index's type (flat for a new one); nlist (ivf), m and ef_construction
    (hnsw) None: ann.build's defaults for a new structure, the stored ones otherwise.
    """
    require_folder(images_root, "image folder", "pass --images the folder that holds the images")
    root = os.path.abspath(images_root)
    check_output_folder(out)
    try:
        current = read_meta(out, advice="the folder holds another index, or a damaged one: choose another "
                                        "--output, or pass --rebuild to replace it")
    except SearchError:
        if not rebuild:
            raise
        current = None  # --rebuild also mends a damaged index.json
    old = None if rebuild else current
    kind = index_type or (current["index_type"] if current is not None else "flat")
    if kind not in ann.KINDS:
        raise SearchError(f"unknown index type '{kind}'; choose one of {', '.join(ann.KINDS)}")
    settings = {k: v for k, v in (("nlist", nlist), ("m", m), ("ef_construction", ef_construction)) if v is not None}
    for key in settings:
        flag, owner = BUILD_FLAGS[key]
        if owner != kind:
            raise SearchError(f"{flag} applies to --index-type {owner} only; this index is {kind}")
    if kind != "flat":
        _need_faiss(out, kind)  # before encoding anything
    names = list_images(root)
    outside = {n for n in names if inside(root, n) is None}  # links that lead out: never read nor served
    for name in sorted(outside):
        print(f"skipped {name}: a link that resolves outside '{images_root}'; copy the file in instead",
              file=sys.stderr)
    stats, unreadable = {}, 0
    for name in sorted(set(names) - outside):
        try:
            stats[name] = os.stat(os.path.join(root, name))
        except OSError as e:  # a dangling link, a link loop (ELOOP), a file removed meanwhile: skipped and counted
            unreadable += 1
            print(f"skipped {name}: {e.strerror or e}", file=sys.stderr)
    names = [n for n in names if n in stats]
    if not names:
        raise SearchError(f"no .jpg/.jpeg/.png/.webp images under '{images_root}'"
                          + (f" ({len(outside)} links lead outside it)" if outside else "")
                          + (f" ({unreadable} cannot be read: broken links?)" if unreadable else ""))
    identity = encoder.identity()

    if old is not None:
        if old["checkpoint"]["sha256"] != identity["sha256"]:
            raise SearchError(f"index '{out}' was built with another checkpoint ({old['checkpoint']['path']}); "
                              f"pass --rebuild to re-encode every image with {encoder.model_path}, "
                              f"or choose another --output")
        if old["root"] != root:
            raise SearchError(f"index '{out}' holds images of {old['root']}, not {root}; "
                              f"pass --rebuild to replace it, or choose another --output")
        old_rows = ImageIndex.load(out, with_ann=False).embeddings  # (N_old, D) memmap
    # A file is reused when its name, size and modification time are unchanged; it keeps its row (and id).
    keep = [] if old is None else [
        i for i, (name, size, mtime) in enumerate(zip(old["files"], old["sizes"], old["mtimes"], strict=True))
        if name in stats and stats[name].st_size == size and stats[name].st_mtime_ns == mtime]
    reused = {old["files"][i] for i in keep}
    todo = [n for n in names if n not in reused]
    feats, kept, failed = encoder.encode_image_files([os.path.join(root, n) for n in todo], progress)
    for i, reason in failed:
        print(f"skipped {todo[i]}: {reason}", file=sys.stderr)

    files = [old["files"][i] for i in keep] + [todo[i] for i in kept]  # new and changed files go last
    if not files:
        raise SearchError(f"none of the {len(names)} images under '{images_root}' could be decoded")
    rows = np.concatenate([old_rows[keep] if keep else np.empty((0, feats.shape[1]), np.float16),
                           feats.numpy().astype(np.float16)])  # (N, D)
    appended_only = old is not None and len(keep) == len(old["files"])
    structure, action = (None, None) if kind == "flat" else _ann_structure(out, old, kind, rows, appended_only,
                                                                          settings)
    meta = {"format": FORMAT, "root": root, "checkpoint": identity, "dim": int(rows.shape[1]),
            "image_size": encoder.image_size, "files": files,
            "sizes": [stats[n].st_size for n in files], "mtimes": [stats[n].st_mtime_ns for n in files],
            "failed": [todo[i] for i, _ in failed], "index_type": kind}
    write_index(out, meta, rows, structure)
    removed = 0 if old is None else len(set(old["files"]) - set(names))
    return {"images": len(files), "new": len(kept), "unchanged": len(keep), "removed": removed,
            "failed": len(failed) + unreadable, "outside": len(outside), "index_type": kind, "ann": action}


def _ann_structure(out, old, kind, rows, appended_only, settings):
    """(structure, "added" | "refilled" | "built"): the old one reused when it can be (module docstring)."""
    previous = None
    if old is not None and old["index_type"] == kind:
        try:
            previous = load_ann(out, old)
        except SearchError:
            print(f"note: the {kind} file of '{out}' cannot be read; building a new one", file=sys.stderr)
    if previous is not None and all(ann.describe(previous)[k] == v for k, v in settings.items()):
        if appended_only:
            return ann.add(previous, rows[previous.ntotal:]), "added"
        return ann.rebuild(previous, rows), "refilled"
    if kind == "ivf" and "nlist" not in settings and len(rows) < ann.MIN_ROWS_PER_LIST:
        raise SearchError(f"an ivf index needs at least {ann.MIN_ROWS_PER_LIST} images, got {len(rows)}; "
                          f"use --index-type flat (exact, and fast at this size)")
    return ann.build(rows, kind, **settings), "built"
