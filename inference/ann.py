"""Approximate nearest-neighbour search over image embeddings, with FAISS (pip install faiss-cpu).

    index = build(embeddings, "hnsw", m=32)          # (N, D) float16/float32 rows, may be a read-only memmap
    save(index, "indexes/photos/ann.faiss")
    index = load("indexes/photos/ann.faiss")
    scores, ids = search(index, queries, k=10, ef_search=64)   # (Q, k) float32, (Q, k) int64 row numbers

Rows are L2-normalised, so the inner product every index type uses is the cosine similarity. Ids are row
numbers in the order the embeddings were added, i.e. positions in the index's list of files.

Index types:
- `flat`: exact; every query is compared with every row (BLAS when queries come in batches).
- `ivf`: rows are bucketed into `nlist` k-means lists; a query scans only the `nprobe` lists whose centroids are
  nearest. nprobe = nlist is exact. Default nlist = 4 * sqrt(N) (FAISS's guidance is 4..16 * sqrt(N)), lowered
  so every list has at least 39 training rows (below that k-means centroids are noise, and FAISS warns).
- `hnsw`: a navigable small-world graph with `m` links per node; a query walks it keeping `ef_search`
  candidates. Costs about 8 * m bytes per row on top of the rows themselves; builds slowest.

Removing rows: `hnsw` cannot delete, and `ivf`/`flat` deletions would renumber the ids, so when images are
removed, refill the index from the new embeddings with `rebuild` (keeps the ivf centroids, so no retraining)
or `build` a new one (retrains; do that when the collection has changed a lot).

This module needs only numpy and faiss, so search.py, serve.py and the benchmark can all use it.
"""
import os

import numpy as np

from engine.errors import UserError

KINDS = ("flat", "ivf", "hnsw")
MIN_ROWS_PER_LIST = 39  # FAISS's own floor for k-means training rows per centroid
TRAIN_ROWS_PER_LIST = 64  # ivf training rows per list (FAISS takes 39..256); 1M rows: ~4 min on 2 cores
CHUNK_ROWS = 65536  # rows converted to float32 at a time while adding: 128 MB at D = 512
# Search defaults, saved with the index. On 1M clustered 512-d rows (python -m bench.ann, 2 CPU cores) they
# gave recall@10 0.970 (ivf, nlist 4000) and 0.967 (hnsw, m 32) at 35x and 44x the exact search's queries/s.
DEFAULT_NPROBE = 64  # capped at nlist
DEFAULT_EF_SEARCH = 128


class AnnError(UserError, ValueError):
    """A problem with an ANN index, its input or its parameters that the user can fix."""


def _faiss():
    try:
        import faiss
    except ImportError:
        raise AnnError("approximate search needs the faiss package: pip install faiss-cpu") from None
    return faiss


def _check_rows(x, dim, what):
    """`x` as a 2-D float array with `dim` columns (any dim when None); no copy is made here."""
    if not isinstance(x, np.ndarray):  # a list, a CPU torch tensor; np.memmap is an ndarray and stays one
        x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise AnnError(f"{what} must be a 2-D array (rows, dim), got shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise AnnError(f"{what} must hold floats (float16 or float32), got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise AnnError(f"{what} have dimension {x.shape[1]} but the index holds dimension {dim}; "
                       f"use embeddings from the same model, or rebuild the index")
    return x


def _float32(chunk, first_row, what):
    """One float32 copy of a chunk of rows (the only copy made), refusing NaN/inf, which FAISS ranks silently."""
    chunk = np.ascontiguousarray(chunk, dtype=np.float32)
    if not np.isfinite(chunk).all():
        bad = first_row + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
        raise AnnError(f"{what} row {bad} holds NaN or infinity; re-encode that item")
    return chunk


def default_nlist(n):
    """4 * sqrt(N) lists, but never fewer than MIN_ROWS_PER_LIST rows per list."""
    return int(min(round(4 * np.sqrt(n)), n // MIN_ROWS_PER_LIST))


def build(embeddings, kind, *, nlist=None, train_rows=None, m=32, ef_construction=40, seed=0):
    """A `kind` index ("flat", "ivf" or "hnsw") over (N, D) embeddings; ids are row numbers 0..N-1.

    ivf: `nlist` lists (default: `default_nlist(N)`), trained on `train_rows` rows sampled with `seed`
    (default: 64 per list, at most N; that sample is the one float32 copy larger than a chunk).
    hnsw: `m` links per node, `ef_construction` candidates while inserting.
    Searches without nprobe/ef_search use DEFAULT_NPROBE/DEFAULT_EF_SEARCH, stored in the index.
    """
    if kind not in KINDS:
        raise AnnError(f"unknown index type '{kind}'; choose one of {', '.join(KINDS)}")
    embeddings = _check_rows(embeddings, None, "embeddings")
    n, dim = embeddings.shape
    if n == 0:
        raise AnnError("no embeddings to index")
    faiss = _faiss()
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        if m < 2 or ef_construction < 1:
            raise AnnError(f"hnsw needs m >= 2 and ef_construction >= 1, "
                           f"got m={m}, ef_construction={ef_construction}")
        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = DEFAULT_EF_SEARCH
    else:
        index = _trained_ivf(faiss, embeddings, nlist, train_rows, seed)
    return add(index, embeddings)


def _trained_ivf(faiss, embeddings, nlist, train_rows, seed):
    n, dim = embeddings.shape
    nlist = default_nlist(n) if nlist is None else int(nlist)
    if nlist < 1 or n < MIN_ROWS_PER_LIST * nlist:
        raise AnnError(f"ivf with nlist={nlist} needs at least {MIN_ROWS_PER_LIST * max(nlist, 1)} embeddings "
                       f"to train, got {n}; pass a smaller nlist or use the 'flat' index")
    train_rows = min(n, TRAIN_ROWS_PER_LIST * nlist) if train_rows is None else int(train_rows)
    if not MIN_ROWS_PER_LIST * nlist <= train_rows <= n:
        raise AnnError(f"ivf train_rows must be between {MIN_ROWS_PER_LIST * nlist} (39 per list) and {n}, "
                       f"got {train_rows}")
    # Sorted row numbers, so a memmap is read front to back; the seed makes the centroids reproducible.
    rows = np.sort(np.random.default_rng(seed).choice(n, train_rows, replace=False))
    sample = _float32(embeddings[rows], 0, "embeddings (training sample)")  # (train_rows, D)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.max_points_per_centroid = max(train_rows // nlist + 1, 256)  # we sampled already; no second cut
    index.train(sample)  # FAISS's Python wrapper keeps `quantizer` alive as long as `index`
    index.nprobe = min(DEFAULT_NPROBE, nlist)
    return index


def add(index, new_embeddings):
    """Append rows (ids continue from the current count), converting CHUNK_ROWS rows to float32 at a time.

    All three types accept additions; an ivf index files new rows under its existing centroids, so after the
    collection has grown several-fold, `build` a new one to retrain them.
    """
    new_embeddings = _check_rows(new_embeddings, index.d, "embeddings")
    for start in range(0, new_embeddings.shape[0], CHUNK_ROWS):
        index.add(_float32(new_embeddings[start:start + CHUNK_ROWS], start, "embeddings"))
    return index


def rebuild(index, embeddings):
    """Empty `index` and fill it with `embeddings` (e.g. after rows were removed); ivf keeps its centroids."""
    index.reset()
    return add(index, embeddings)


def kind_of(index):
    faiss = _faiss()
    for kind, cls in (("ivf", faiss.IndexIVFFlat), ("hnsw", faiss.IndexHNSWFlat), ("flat", faiss.IndexFlatIP)):
        if isinstance(index, cls):
            return kind
    raise AnnError(f"unsupported FAISS index {type(index).__name__}; build one with ann.build")


def describe(index):
    """The index's type, size and build parameters, e.g. for a service's status page."""
    kind = kind_of(index)
    info = {"kind": kind, "rows": int(index.ntotal), "dim": int(index.d)}
    if kind == "ivf":
        info["nlist"], info["nprobe"] = int(index.nlist), int(index.nprobe)
    elif kind == "hnsw":
        info["m"] = int(index.hnsw.nb_neighbors(1))  # FAISS stores 2*m links on level 0, m above
        info["ef_construction"] = int(index.hnsw.efConstruction)
        info["ef_search"] = int(index.hnsw.efSearch)
    return info


def search(index, queries, k, nprobe=None, ef_search=None):
    """(Q, D) queries -> (scores (Q, k') float32, ids (Q, k') int64), best first, k' = min(k, rows).

    `nprobe` (ivf: lists scanned, capped at nlist; nlist is exact) and `ef_search` (hnsw: candidates kept;
    FAISS uses at least k) apply to this call only; left out, the index's own (see `describe`) apply.
    An ivf search whose probed lists hold fewer than k' rows fills the tail with id -1 and score -inf.
    """
    faiss = _faiss()
    kind = kind_of(index)
    queries = _check_rows(queries, index.d, "queries")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise AnnError(f"k must be a whole number >= 1, got {k!r}")
    if nprobe is not None and kind != "ivf":
        raise AnnError(f"nprobe applies to ivf indexes only; this one is {kind}")
    if ef_search is not None and kind != "hnsw":
        raise AnnError(f"ef_search applies to hnsw indexes only; this one is {kind}")
    params = None
    if nprobe is not None:
        if nprobe < 1:
            raise AnnError(f"nprobe must be >= 1, got {nprobe}")
        params = faiss.SearchParametersIVF(nprobe=int(min(nprobe, index.nlist)))
    if ef_search is not None:
        if ef_search < 1:
            raise AnnError(f"ef_search must be >= 1, got {ef_search}")
        params = faiss.SearchParametersHNSW(efSearch=int(ef_search))
    k = min(int(k), int(index.ntotal))
    q = len(queries)
    if k == 0:
        return np.empty((q, 0), np.float32), np.empty((q, 0), np.int64)
    scores, ids = index.search(_float32(queries, 0, "queries"), k, params=params)  # (Q, k) each
    scores[ids < 0] = -np.inf  # FAISS marks missing results with -FLT_MAX
    return scores, ids.astype(np.int64, copy=False)


def save(index, path):
    """Write to a temporary name beside `path`, then rename: a crash never leaves a half-written index."""
    faiss = _faiss()
    kind_of(index)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AnnError(f"folder '{folder}' does not exist; create it before saving the index there")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    except (RuntimeError, OSError) as e:  # a full disk, no permission, `path` being a folder
        raise AnnError(f"cannot write the index to '{path}' ({str(e).splitlines()[0]}); "
                       f"choose another path or free some space") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path):
    """An index written by `save`."""
    faiss = _faiss()
    if not os.path.isfile(path):
        raise AnnError(f"no ANN index at '{path}'; build and save one first")
    try:
        index = faiss.read_index(path)
    except RuntimeError:
        raise AnnError(f"'{path}' is not a readable FAISS index; build and save it again") from None
    kind_of(index)
    return index
