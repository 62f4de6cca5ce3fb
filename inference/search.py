"""Index a folder of images with a trained checkpoint, then search it by text or by image.

    python search.py index --model checkpoints/best.pt --images photos/ --out indexes/photos
    python search.py query --index indexes/photos --text "a dog on a beach" -k 5     # text -> image
    python search.py query --index indexes/photos --image query.jpg                  # image -> image
    python search.py query --model checkpoints/best.pt --captions captions.csv --image query.jpg  # image -> text

An index is a folder: `index.json` (the images root, the relative file names with their sizes and times, and
the checkpoint's path, size and SHA-256) and `embeddings-*.npy` ((N, D) float16, L2-normalised rows, in the
order of the file names). Running `index` again on a grown folder encodes only new or changed files and drops
deleted ones. An index made with another checkpoint is refused; `--rebuild` re-encodes everything instead.
Search is exact: one matrix product (or FAISS's exact inner-product index with --faiss, when installed).
"""
import argparse
import csv
import json
import os
import sys
import uuid

import numpy as np
import torch

from inference import INFERENCE_ERRORS, Encoder, list_images

FORMAT = 1  # bump when the layout of index.json changes
REQUIRED_KEYS = {"root", "checkpoint", "dim", "files", "sizes", "mtimes", "embeddings"}


class SearchError(ValueError):
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
        """The checkpoint the images were encoded with, for when no --model is given."""
        path = self.checkpoint["path"]
        if not os.path.isfile(path):
            raise SearchError(f"index '{self.folder}' was built with {path}, which no longer exists; "
                              f"pass --model with that checkpoint's new path")
        return path

    def path(self, i):
        """Absolute path of image `i`. Only names stored in the index are ever joined to the root."""
        return os.path.join(self.root, *self.files[i].split("/"))

    @classmethod
    def load(cls, folder):
        meta = read_meta(folder)
        if meta is None:
            raise SearchError(f"'{folder}' is not an index (no index.json); make one with 'search.py index'")
        path = os.path.join(folder, meta["embeddings"])
        if not os.path.isfile(path):
            raise SearchError(f"index '{folder}' lacks {meta['embeddings']}; rebuild it with 'search.py index'")
        embeddings = np.load(path)
        if embeddings.shape != (len(meta["files"]), meta["dim"]):
            raise SearchError(f"index '{folder}' is inconsistent ({embeddings.shape[0]} embeddings for "
                              f"{len(meta['files'])} files); rebuild it with 'search.py index --rebuild'")
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
        raise SearchError(f"{path} is not a format-{FORMAT} index; rebuild it with 'search.py index --rebuild'")
    missing = sorted(REQUIRED_KEYS - meta.keys())
    if missing:
        raise SearchError(f"{path} lacks {', '.join(missing)}; rebuild it with 'search.py index --rebuild'")
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
                              f"or choose another --out")
        if old["root"] != root:
            raise SearchError(f"index '{out}' holds images of {old['root']}, not {root}; "
                              f"pass --rebuild to replace it, or choose another --out")
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
    with open(os.path.join(out, name), "wb") as f:
        np.save(f, embeddings)
    meta = {**meta, "embeddings": name}
    tmp = os.path.join(out, "index.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    os.replace(tmp, os.path.join(out, "index.json"))
    for other in os.listdir(out):
        if other.startswith("embeddings-") and other.endswith(".npy") and other != name:
            os.remove(os.path.join(out, other))


def read_captions_file(path):
    """Captions to rank for image -> text: a CSV with a `caption` column, or a text file with one per line."""
    if not os.path.isfile(path):
        raise SearchError(f"captions file '{path}' does not exist")
    if path.lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "caption" not in (reader.fieldnames or []):
                raise SearchError(f"{path} has no 'caption' column (found: {','.join(reader.fieldnames or [])})")
            captions = [" ".join((r["caption"] or "").split()) for r in reader]
    else:
        with open(path, encoding="utf-8") as f:
            captions = [" ".join(line.split()) for line in f]
    captions = list(dict.fromkeys(c for c in captions if c))  # unique, in file order
    if not captions:
        raise SearchError(f"{path} holds no captions")
    return captions


# ---------------------------------------------------------------------- command line
def worker_count(value):
    if value == "auto" or value.isdigit():
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got '{value}'")


def parse_args(argv):
    p = argparse.ArgumentParser(description="Index a folder of images, then search it by text or by image.")
    sub = p.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="encode every image under a folder into an index")
    ix.add_argument("--model", required=True, help="checkpoint written by train.py")
    ix.add_argument("--images", required=True, help="folder searched recursively for jpg/jpeg/png/webp")
    ix.add_argument("--out", required=True, help="index folder (created, or updated when it exists)")
    ix.add_argument("--rebuild", action="store_true", help="re-encode everything (e.g. after a new checkpoint)")
    q = sub.add_parser("query", help="rank indexed images (or captions) against a text or an image")
    q.add_argument("--index", help="index folder made by 'search.py index'")
    q.add_argument("--model", help="checkpoint; default: the one the index was built with")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="text -> image search")
    what.add_argument("--image", help="image -> image search, or image -> text with --captions")
    q.add_argument("--captions", help="rank these captions instead (.csv with a caption column, or .txt)")
    q.add_argument("-k", type=int, default=10, help="results to show (default 10)")
    q.add_argument("--faiss", action="store_true", help="search with FAISS (pip install faiss-cpu)")
    for s in (ix, q):
        s.add_argument("--device", default="auto", help="auto, cpu or cuda")
        s.add_argument("--batch-size", type=int, default=64, help="images or texts encoded at once")
    ix.add_argument("--num-workers", type=worker_count, default="auto", help="image-decoding processes, or auto")
    return p.parse_args(argv)


def run_index(a):
    encoder = Encoder(a.model, a.device, batch_size=a.batch_size, num_workers=a.num_workers)
    summary = build_index(encoder, a.images, a.out, rebuild=a.rebuild)
    print(f"index {a.out}: {summary['images']} images ({summary['new']} encoded, {summary['unchanged']} "
          f"unchanged, {summary['removed']} removed, {summary['failed']} failed to decode)")
    return summary


def run_query(a):
    if a.k < 1:
        raise SearchError(f"-k must be at least 1, got {a.k}")
    if a.captions and a.text:
        raise SearchError("--captions ranks captions for an --image; for text -> image leave out --captions")
    index = None
    if a.index:
        index = ImageIndex.load(a.index)
    elif not a.captions:
        raise SearchError("--index is required for image search (only image -> text with --captions needs none)")
    if a.model is None and index is None:
        raise SearchError("pass --model (or an --index, whose checkpoint is then used)")
    encoder = Encoder(a.model or index.model_path(), a.device, batch_size=a.batch_size)
    if index is not None:
        index.check_encoder(encoder)
        if a.faiss:
            index.use_faiss()

    if a.text is not None:
        if not a.text.strip():
            raise SearchError("--text is empty")
        query = encoder.encode_texts([a.text])
    else:
        if not os.path.isfile(a.image):
            raise SearchError(f"image '{a.image}' does not exist")
        query = encoder.encode_images([encoder.open_image(a.image)])  # (1, D)

    if a.captions:
        captions = read_captions_file(a.captions)
        scores, ids = (query @ encoder.encode_texts(captions).T).topk(min(a.k, len(captions)), dim=1)
        results = [{"rank": r + 1, "score": float(s), "caption": captions[i]}
                   for r, (s, i) in enumerate(zip(scores[0].tolist(), ids[0].tolist()))]
        print(f"image -> text: {a.image} against {len(captions)} captions")
        for res in results:
            print(f"{res['rank']:4d}  {res['score']:.4f}  {res['caption']}")
        return results

    scores, ids = index.search(query, a.k)
    results = [{"rank": r + 1, "score": float(s), "id": i, "path": index.path(i)}
               for r, (s, i) in enumerate(zip(scores[0].tolist(), ids[0].tolist()))]
    kind = "text -> image" if a.text is not None else "image -> image"
    print(f"{kind}: {a.text!r} over {len(index)} images" if a.text is not None
          else f"{kind}: {a.image} over {len(index)} images")
    for res in results:
        print(f"{res['rank']:4d}  {res['score']:.4f}  {res['path']}")
    return results


def main(argv=None):
    a = parse_args(argv)
    try:
        return run_index(a) if a.command == "index" else run_query(a)
    except INFERENCE_ERRORS + (SearchError,) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
