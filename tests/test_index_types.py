"""Index types (flat, ivf, hnsw) of inference/index.py through `python -m inference.search` and the web app:
each finds what the exact search finds, stays consistent through incremental updates, and says what to do when
its FAISS file is damaged or a flag does not fit it. Approximate settings are chosen so that the search is exact
on these 90 images (ivf: 2 lists, both probed; hnsw: ef_search 128 > 90), unless a test narrows them on purpose.
"""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from inference import ann, search, serve
from inference import index as search_index
from inference.encoder import Encoder
from tests.trusted import TRUSTED
from tools import demo

pytest.importorskip("faiss")

N = 90  # demo images: enough for an ivf index of 2 lists (FAISS wants >= 39 training rows per list)


def one_line_error(call, *fragments):
    with pytest.raises(SystemExit) as e:
        call()
    message = str(e.value.code)
    assert message.startswith("error:") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture(scope="module")
def encoder(tiny):
    return Encoder(str(tiny["checkpoint"]), "cpu", batch_size=32)


@pytest.fixture(autouse=True)
def one_encoder(monkeypatch, encoder):
    """The entry scripts build an Encoder per call (~1-3 s); every call here gets the module's one."""
    monkeypatch.setattr(search, "Encoder", lambda *args, **kwargs: encoder)
    monkeypatch.setattr(serve, "Encoder", lambda *args, **kwargs: encoder)


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    """N demo pictures of distinct scenes, written once; tests copy them before changing anything."""
    root = tmp_path_factory.mktemp("demo")
    demo.write_split(str(root), random.Random(5).sample(demo.all_scenes(), N), 1, random.Random(6))
    return root / "images"


@pytest.fixture()
def photos(demo_images, tmp_path):
    return shutil.copytree(demo_images, tmp_path / "photos")


def index_cmd(tiny, photos, out, *extra):
    return search.main(["index", "--model-path", str(tiny["checkpoint"]), "--images", str(photos),
                        "--output", str(out), "--num-workers", "0", "--device", "cpu", *extra])


def query_cmd(index, *extra):
    return search.main(["query", "--index", str(index), "--device", "cpu", *TRUSTED, *extra])


@pytest.fixture(scope="module")
def indexes(tiny, demo_images, tmp_path_factory):
    """{"flat", "ivf", "hnsw": folder} over the same images; the approximate ones are converted from the flat one."""
    base = tmp_path_factory.mktemp("indexes")
    folders = {kind: base / kind for kind in ann.KINDS}
    index_cmd(tiny, demo_images, folders["flat"])
    for kind in ("ivf", "hnsw"):
        shutil.copytree(folders["flat"], folders[kind])
        summary = index_cmd(tiny, demo_images, folders[kind], "--index-type", kind)
        assert summary["new"] == 0 and summary["unchanged"] == N and summary["ann"] == "built"  # nothing re-encoded
    return folders


def self_queries(encoder, index):
    """Each indexed image encoded afresh, (N, D): its own row should come first."""
    return encoder.encode_images([index.path(i) for i in range(len(index))])


def stored_rows(index):
    return torch.from_numpy(np.asarray(index.embeddings, dtype=np.float32))  # (N, D)


# ---------------------------------------------------------------------- every type finds what flat finds
def test_each_type_finds_what_the_exact_search_finds(indexes, encoder):
    flat = search_index.ImageIndex.load(str(indexes["flat"]))
    queries = self_queries(encoder, flat)  # (N, D)
    want_scores, want_ids = flat.search(queries, 5)
    assert torch.equal(want_ids[:, 0], torch.arange(N))  # every image finds itself first (margin >= 0.02)
    for kind in ("ivf", "hnsw"):
        index = search_index.ImageIndex.load(str(indexes[kind]))
        assert index.kind == kind and index.files == flat.files and ann.kind_of(index.ann) == kind
        assert np.array_equal(index.embeddings, flat.embeddings)  # the same rows, kept beside the structure
        scores, ids = index.search(queries, 5)
        assert torch.equal(ids[:, 0], want_ids[:, 0]), kind
        assert torch.allclose(scores, want_scores, atol=1e-5), kind
    meta = json.loads((indexes["ivf"] / "index.json").read_text())
    assert meta["format"] == search_index.FORMAT == 2 and meta["index_type"] == "ivf"
    assert sorted(os.listdir(indexes["ivf"])) == sorted(["index.json", meta["embeddings"], meta["ann"]])
    assert search_index.ImageIndex.load(str(indexes["ivf"])).settings() == {"type": "ivf", "nlist": 2, "nprobe": 2}


def test_switching_back_to_flat_drops_the_ann_file(tiny, indexes, demo_images, tmp_path):
    out = tmp_path / "index"
    shutil.copytree(indexes["hnsw"], out)
    assert index_cmd(tiny, demo_images, out)["index_type"] == "hnsw"  # left out: the index keeps its type
    summary = index_cmd(tiny, demo_images, out, "--index-type", "flat")
    assert summary["index_type"] == "flat" and summary["ann"] is None and summary["new"] == 0
    assert not [f for f in os.listdir(out) if f.endswith(".faiss")]
    assert json.loads((out / "index.json").read_text())["ann"] is None


# ---------------------------------------------------------------------- incremental updates
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_additions_extend_the_structure_and_keep_ids(tiny, encoder, photos, tmp_path, kind):
    aside = tmp_path / "aside"
    aside.mkdir()
    for name in sorted(os.listdir(photos))[::4]:  # 23 images join later
        shutil.move(photos / name, aside / name)
    out = tmp_path / "index"
    assert index_cmd(tiny, photos, out, "--index-type", kind)["images"] == N - 23
    before, added = search_index.ImageIndex.load(str(out)).files, sorted(os.listdir(aside))
    for name in added:
        shutil.move(aside / name, photos / name)
    summary = index_cmd(tiny, photos, out)
    assert summary == {"images": N, "new": 23, "unchanged": N - 23, "removed": 0, "failed": 0, "outside": 0,
                       "index_type": kind, "ann": "added"}
    index = search_index.ImageIndex.load(str(out))
    assert index.files[:N - 23] == before and index.files[N - 23:] == added
    # ids in the structure are positions in the file list: each stored row finds itself
    _, ids = ann.search(index.ann, np.asarray(index.embeddings), 1, nprobe=index.ann.nlist if kind == "ivf" else None)
    assert ids[:, 0].tolist() == list(range(N))
    queries = self_queries(encoder, index)
    assert torch.equal(index.search(queries, 1)[1], search_index.exact_search(index.embeddings, queries, 1)[1])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_a_removed_file_disappears_from_results(tiny, encoder, photos, tmp_path, kind):
    out = tmp_path / "index"
    index_cmd(tiny, photos, out, "--index-type", kind)
    gone = sorted(os.listdir(photos))[10]
    query = tmp_path / "query.jpg"
    shutil.move(photos / gone, query)
    # a changed file (other content under the same name) is re-encoded and moves to the end
    changed = sorted(os.listdir(photos))[20]
    shutil.copy(photos / sorted(os.listdir(photos))[30], photos / changed)
    summary = index_cmd(tiny, photos, out)
    assert (summary["removed"], summary["new"], summary["unchanged"]) == (1, 1, N - 2)
    assert summary["ann"] == (None if kind == "flat" else "refilled")
    index = search_index.ImageIndex.load(str(out))
    assert gone not in index.files and index.files[-1] == changed and len(index) == N - 1
    results = query_cmd(out, "--image", str(query), "-k", str(N))
    assert len(results) == N - 1 and all(r["path"] != str(photos / gone) for r in results)
    assert sorted(r["id"] for r in results) == list(range(N - 1))  # the whole index, each image once
    queries = self_queries(encoder, index)
    assert torch.equal(index.search(queries, 1)[1], search_index.exact_search(index.embeddings, queries, 1)[1])


# ---------------------------------------------------------------------- exact search over a memmap, in blocks
def test_blocked_memmap_search_equals_one_product(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 32))
    np.save(tmp_path / "e.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
    rows = np.load(tmp_path / "e.npy", mmap_mode="r")  # (1000, 32) float16, read-only
    queries = torch.nn.functional.normalize(torch.randn(7, 32, generator=torch.Generator().manual_seed(1)), dim=1)
    want_scores, want_ids = (queries @ torch.from_numpy(rows.astype(np.float32)).T).topk(10, dim=1)  # (7, 10)
    for block_rows in (1, 3, 64, 999, 1000, 65536):
        scores, ids = search_index.exact_search(rows, queries, 10, block_rows)
        assert torch.equal(ids, want_ids), block_rows
        assert torch.allclose(scores, want_scores, atol=1e-6), block_rows
    assert torch.equal(search_index.exact_search(rows, queries, 1000, 7)[1], (queries @ torch.from_numpy(
        rows.astype(np.float32)).T).topk(1000, dim=1)[1])  # k above the block size: every row, in order


def test_index_search_reads_blocks(indexes, encoder, monkeypatch):
    index = search_index.ImageIndex.load(str(indexes["flat"]))
    assert isinstance(index.embeddings, np.memmap) and not index.embeddings.flags.writeable
    queries = encoder.encode_texts(["a small blue star", "a large yellow square on the right"])  # (2, D)
    want_scores, want_ids = (queries @ stored_rows(index).T).topk(8, dim=1)
    monkeypatch.setattr(search_index, "BLOCK_ROWS", 4)  # 23 blocks
    scores, ids = index.search(queries, 8)
    assert torch.equal(ids, want_ids) and torch.allclose(scores, want_scores, atol=1e-6)


# ---------------------------------------------------------------------- query-time settings
def test_nprobe_narrows_an_ivf_search(indexes):
    exact = query_cmd(indexes["flat"], "--text", "a red star", "-k", str(N))
    assert [r["id"] for r in query_cmd(indexes["ivf"], "--text", "a red star", "-k", "10", "--nprobe", "2")] == \
        [r["id"] for r in exact[:10]]
    one_list = query_cmd(indexes["ivf"], "--text", "a red star", "-k", str(N), "--nprobe", "1")
    found = {r["id"] for r in one_list}
    assert 0 < len(found) < N  # one of the two lists: the -1 ids past its end are not shown
    assert [r["id"] for r in one_list] == [r["id"] for r in exact if r["id"] in found]  # exact within that list
    assert [r["rank"] for r in one_list] == list(range(1, len(one_list) + 1))


def test_ef_search_sets_hnsw_candidates(indexes):
    exact = query_cmd(indexes["flat"], "--text", "a green triangle", "-k", "10")
    wide = query_cmd(indexes["hnsw"], "--text", "a green triangle", "-k", "10", "--ef-search", "200")
    assert [r["id"] for r in wide] == [r["id"] for r in exact]
    index = search_index.ImageIndex.load(str(indexes["hnsw"])).tune(ef_search=7)
    assert index.settings() == {"type": "hnsw", "m": 32, "ef_construction": 40, "ef_search": 7}


@pytest.mark.parametrize("kind, flags, message", [
    ("flat", ["--nprobe", "4"], "--nprobe applies to ivf indexes only"),
    ("hnsw", ["--nprobe", "4"], "--nprobe applies to ivf indexes only"),
    ("flat", ["--ef-search", "4"], "--ef-search applies to hnsw indexes only"),
    ("ivf", ["--ef-search", "4"], "--ef-search applies to hnsw indexes only"),
])
def test_settings_that_do_not_fit_the_index_are_one_line_errors(indexes, tiny, kind, flags, message):
    one_line_error(lambda: query_cmd(indexes[kind], "--text", "a star", *flags), message, kind)
    one_line_error(lambda: serve.main(["--index", str(indexes[kind]), "--device", "cpu", *TRUSTED, *flags]), message)


def test_build_flags_that_do_not_fit_are_one_line_errors(tiny, indexes, demo_images, photos, tmp_path, capsys):
    cases = [(["--index-type", "hnsw", "--nlist", "2"], "--nlist applies to --index-type ivf only"),
             (["--index-type", "ivf", "--m", "8"], "--m applies to --index-type hnsw only"),
             (["--ef-construction", "8"], "--ef-construction applies to --index-type hnsw only; this index is flat")]
    for flags, message in cases:
        one_line_error(lambda flags=flags: index_cmd(tiny, photos, tmp_path / "new", *flags), message)
    assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit) as e:  # argparse's usage error (status 2, on stderr)
        query_cmd(indexes["ivf"], "--text", "x", "--nprobe", "0")
    assert e.value.code == 2 and "at least 1" in capsys.readouterr().err
    one_line_error(lambda: serve.main(["--index", str(indexes["ivf"]), "--nprobe", "0", *TRUSTED]),
                   "--nprobe must be at least 1")
    one_line_error(lambda: search.main(["query", "--model-path", str(tiny["checkpoint"]), "--captions",
                                        str(tiny["captions"]), "--image", str(photos / "00000.jpg"), "--nprobe", "3"]),
                   "--nprobe and --ef-search tune the search of an --index")
    small = tmp_path / "small"
    small.mkdir()
    for name in sorted(os.listdir(photos))[:12]:
        shutil.copy(photos / name, small / name)
    one_line_error(lambda: index_cmd(tiny, small, tmp_path / "ivf", "--index-type", "ivf"),
                   "needs at least 39 images, got 12", "--index-type flat")
    one_line_error(lambda: index_cmd(tiny, photos, tmp_path / "ivf", "--index-type", "ivf", "--nlist", "5"),
                   "nlist=5 needs at least 195")


def test_a_build_setting_change_retrains(tiny, indexes, demo_images, tmp_path):
    out = tmp_path / "index"
    shutil.copytree(indexes["ivf"], out)
    assert index_cmd(tiny, demo_images, out, "--nlist", "2")["ann"] == "added"  # the same setting: reused
    assert index_cmd(tiny, demo_images, out, "--nlist", "1")["ann"] == "built"
    assert search_index.ImageIndex.load(str(out)).settings()["nlist"] == 1


# ---------------------------------------------------------------------- damage and old formats
@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign", "other type", "other size", "missing"])
def test_a_damaged_ann_file_says_rebuild(tiny, indexes, demo_images, tmp_path, damage, capsys):
    out = tmp_path / "index"
    shutil.copytree(indexes["ivf"], out)
    meta = json.loads((out / "index.json").read_text())
    path, rows = out / meta["ann"], np.load(out / meta["embeddings"])  # (N, D)
    {"truncated": lambda: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2]),
     "empty": lambda: path.write_bytes(b""),
     "foreign": lambda: path.write_bytes(np.arange(100).tobytes()),
     "other type": lambda: ann.save(ann.build(rows, "hnsw"), str(path)),
     "other size": lambda: ann.save(ann.build(rows[:50], "ivf", nlist=1), str(path)),
     "missing": path.unlink}[damage]()
    with pytest.raises(search_index.SearchError, match="rebuild the index with --rebuild"):
        search_index.ImageIndex.load(str(out))
    one_line_error(lambda: query_cmd(out, "--text", "a red circle"), "rebuild the index with --rebuild")
    one_line_error(lambda: serve.main(["--index", str(out), "--device", "cpu", *TRUSTED]),
                   "rebuild the index with --rebuild")
    # indexing again mends it from the stored embeddings, without re-encoding
    summary = index_cmd(tiny, demo_images, out)
    assert summary["ann"] == "built" and summary["new"] == 0
    assert "cannot be read; building a new one" in capsys.readouterr().err
    assert len(query_cmd(out, "--text", "a red circle", "-k", "3")) == 3


def test_an_interrupted_write_leaves_the_old_index(tiny, indexes, demo_images, tmp_path, monkeypatch):
    out = tmp_path / "index"
    shutil.copytree(indexes["ivf"], out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def killed(*args):
        raise KeyboardInterrupt  # as if the run were stopped while writing the structure

    real_save = ann.save
    monkeypatch.setattr(ann, "save", killed)
    with pytest.raises(SystemExit) as stopped:
        index_cmd(tiny, demo_images, out, "--index-type", "hnsw")
    assert stopped.value.code == 130
    after = {name: (out / name).read_bytes() for name in os.listdir(out) if not name.startswith("embeddings-")}
    assert after == {name: data for name, data in before.items() if not name.startswith("embeddings-")}
    assert search_index.ImageIndex.load(str(out)).kind == "ivf"
    monkeypatch.setattr(ann, "save", real_save)  # the next run goes through and removes what the stopped one left
    index_cmd(tiny, demo_images, out, "--index-type", "hnsw")
    assert len(os.listdir(out)) == 3 and search_index.ImageIndex.load(str(out)).kind == "hnsw"


def test_format_1_indexes_are_read_as_flat(tiny, indexes, demo_images, tmp_path):
    out = tmp_path / "index"
    shutil.copytree(indexes["flat"], out)
    meta = json.loads((out / "index.json").read_text())
    del meta["index_type"], meta["ann"]
    (out / "index.json").write_text(json.dumps({**meta, "format": 1}))
    index = search_index.ImageIndex.load(str(out))
    assert index.kind == "flat" and index.ann is None
    assert [r["id"] for r in query_cmd(out, "--text", "a star", "-k", "3")] == \
        [r["id"] for r in query_cmd(indexes["flat"], "--text", "a star", "-k", "3")]
    assert index_cmd(tiny, demo_images, out)["new"] == 0  # updated in place, to the current format
    assert json.loads((out / "index.json").read_text())["format"] == 2
    (out / "index.json").write_text(json.dumps({**meta, "format": 99}))
    one_line_error(lambda: query_cmd(out, "--text", "a star"), "not a format-2 index", "--rebuild")


# ---------------------------------------------------------------------- the web app over an ivf index
def test_serve_answers_over_an_ivf_index(tiny, indexes, encoder):
    flat = search_index.ImageIndex.load(str(indexes["flat"]))
    text = "a large purple square at the bottom"
    want = (encoder.encode_texts([text]) @ stored_rows(flat).T)[0].topk(6)  # (6,)
    app = serve.create_app(str(tiny["checkpoint"]), str(indexes["ivf"]), device="cpu", nprobe=2)
    with TestClient(app) as client:
        health = client.get("/api/health").json()
        assert health["index_type"] == "ivf" and health["index_settings"] == {"type": "ivf", "nlist": 2, "nprobe": 2}
        results = client.get("/api/search", params={"q": text, "k": 6}).json()["results"]
        assert [r["id"] for r in results] == want.indices.tolist()
        assert [r["score"] for r in results] == pytest.approx(want.values.tolist(), abs=1e-5)
        assert [r["path"] for r in results] == [flat.files[i] for i in want.indices.tolist()]
        with open(flat.path(17), "rb") as f:
            found = client.post("/api/search/image", params={"k": 3}, files={"file": ("q.jpg", f, "image/jpeg")})
        assert found.status_code == 200 and found.json()["results"][0]["id"] == 17
    narrow = serve.create_app(str(tiny["checkpoint"]), str(indexes["ivf"]), device="cpu", nprobe=1)
    with TestClient(narrow) as client:
        results = client.get("/api/search", params={"q": text, "k": N}).json()["results"]
        assert 0 < len(results) < N and all(0 <= r["id"] < N for r in results)  # no -1 placeholders
