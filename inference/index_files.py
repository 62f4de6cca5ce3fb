"""The files of an index folder (see inference/index.py): reading and checking `index.json`, writing a new
version without ever leaving a half-written index, and refusing an output folder that holds something else.

Only names this module writes are ever replaced or removed in the folder: `index.json`, `embeddings-<tag>.npy`
and `ann-<tag>.faiss`, with <tag> eight hex digits (`OWN_FILE`).
"""
import json
import os
import re
import uuid

import numpy as np

from engine.errors import UserError, shorten
from engine.files import PARTIAL, atomic_write
from inference import ann

FORMAT = 2  # bump when the layout of index.json changes; 2 added index_type and ann
READABLE_FORMATS = (1, 2)  # format 1 had neither key and is read as flat
REQUIRED_KEYS = {"root", "checkpoint", "dim", "files", "sizes", "mtimes", "embeddings", "index_type", "ann"}
OWN_FILE = re.compile(r"(index\.json|embeddings-[0-9a-f]{8}\.npy|ann-[0-9a-f]{8}\.faiss)")
REBUILD = "rebuild the index with --rebuild"


class SearchError(UserError, ValueError):
    """A problem with an index or a query that the user can fix."""


def check_output_folder(out):
    """Refuse, before any encoding, an index output that is a file, or a folder of other things than an index."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise SearchError(f"--output '{out}' is a file, not a folder; choose a new folder for the index")
    if not os.path.isdir(out) or os.path.isfile(os.path.join(out, "index.json")):
        return  # a new folder, or an index (read_meta checks it)
    others = sorted(n for n in os.listdir(out) if not OWN_FILE.fullmatch(n) and not n.endswith(PARTIAL))
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise SearchError(f"--output '{out}' is not an index folder (it holds {others[0]}{more}); choose another "
                          f"--output, a new or empty folder")


def read_meta(folder, advice=REBUILD):
    """index.json of the index at `folder` checked field by field, or None when there is none. A problem is a
    SearchError ending in `advice`."""
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise SearchError(f"cannot read {path} ({e}); {advice}") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        raise SearchError(f"{path} is not a format-{FORMAT} index; {advice}")
    if meta["format"] == 1:
        meta = {**meta, "index_type": "flat", "ann": None}
    missing = sorted(REQUIRED_KEYS - meta.keys())
    if missing:
        raise SearchError(f"{path} lacks {', '.join(missing)}; {advice}")
    wrong = next((f"{field} ({what})" for field, what, ok in field_checks(meta) if not ok()), None)
    if wrong:
        raise SearchError(f"{path} has a field of the wrong type: {wrong}; {advice}")
    # Lexical containment for every name (cheap); links are resolved when a file is served (ImageIndex.path).
    for f in meta["files"]:
        if "\0" in f:  # no file system allows it: the name was made, not written by the indexer
            raise SearchError(f"{path} names a file with a NUL byte in it ({shorten(f)}); {advice}")
        if not f or f.startswith("/") or "\\" in f or ".." in f.split("/"):
            raise SearchError(f"{path} names a file outside its root ({shorten(f)}); {advice}")
    return meta


def _whole(v):
    return isinstance(v, int) and not isinstance(v, bool)


def field_checks(meta):
    """(field, what it must be, check) for each field of index.json, in the order a reader needs them."""
    files, ck = meta["files"], meta["checkpoint"]
    n = len(files) if isinstance(files, list) else -1
    return [
        ("root", "a folder path", lambda: isinstance(meta["root"], str) and "\0" not in meta["root"]),
        ("embeddings", "a file name", lambda: isinstance(meta["embeddings"], str)),
        ("dim", "a whole number >= 1", lambda: _whole(meta["dim"]) and meta["dim"] >= 1),
        ("files", "a list of names", lambda: n >= 0 and all(isinstance(f, str) for f in files)),
        *[(k, f"a list of {n} whole numbers", lambda k=k: isinstance(meta[k], list) and len(meta[k]) == n
           and all(_whole(v) for v in meta[k])) for k in ("sizes", "mtimes")],
        ("checkpoint", "path and sha256 strings", lambda: isinstance(ck, dict) and all(
            isinstance(ck.get(k), str) and "\0" not in ck[k] for k in ("path", "sha256"))),
        ("index_type", f"one of {', '.join(ann.KINDS)}", lambda: meta["index_type"] in ann.KINDS),
        ("ann", "null for flat, else a file name", lambda: meta["ann"] is None if meta["index_type"] == "flat"
         else isinstance(meta["ann"], str)),
    ]


def write_index(out, meta, embeddings, structure=None):
    """Embeddings and the ANN structure go to fresh file names; replacing index.json is the single step that
    makes them current, so an interrupted run leaves the previous index intact."""
    os.makedirs(out, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    name, ann_name = f"embeddings-{tag}.npy", None if structure is None else f"ann-{tag}.faiss"
    atomic_write(os.path.join(out, name), lambda f: np.save(f, embeddings), binary=True)
    if structure is not None:
        ann.save(structure, os.path.join(out, ann_name))
    meta = {**meta, "embeddings": name, "ann": ann_name}
    atomic_write(os.path.join(out, "index.json"), lambda f: json.dump(meta, f))
    for other in os.listdir(out):
        if OWN_FILE.fullmatch(other) and other not in ("index.json", name, ann_name):  # only our own names
            os.remove(os.path.join(out, other))

