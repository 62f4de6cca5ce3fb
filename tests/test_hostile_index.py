"""An index folder read from disk is data, never a key to the disk (inference/index.py): its image root and its
checkpoint must lie inside the folder the operator trusts (--trusted-root) or the index folder, and a damaged
index says what is wrong. Hand-made index folders stand for ones copied from elsewhere."""
import http.client
import json
import os
import random
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from inference import index as search_index
from inference import search, serve
from inference.limits import MAX_URL_CHARS
from tests.fuzzing import SEED, check_all, outcome
from tests.helpers import free_port, one_line_exit


def hand_made_index(folder, root, files, checkpoint="/nowhere/best.pt", embeddings=None, **fields):
    """An index folder as someone could write it by hand: index.json (`fields` replace its values) and (N, 4)
    embeddings."""
    os.makedirs(folder, exist_ok=True)
    rows = np.eye(len(files), 4, dtype=np.float16) if embeddings is None else embeddings
    np.save(os.path.join(folder, "embeddings-0000abcd.npy"), rows)
    meta = {"format": 2, "root": str(root), "checkpoint": {"path": str(checkpoint), "sha256": "0" * 64},
            "dim": 4, "files": files, "sizes": [1] * len(files), "mtimes": [1] * len(files),
            "embeddings": "embeddings-0000abcd.npy", "index_type": "flat", "ann": None, **fields}
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump(meta, f)
    return folder


# ---------------------------------------------------------------------- the boundary
def test_an_index_naming_etc_is_refused_by_search_and_serve(tmp_path, tiny):
    index = hand_made_index(tmp_path / "evil", "/etc", ["passwd"])
    trusted = ["--trusted-root", str(tmp_path)]
    with pytest.raises(search_index.SearchError, match="names its images under '/etc', outside --trusted-root"):
        search_index.ImageIndex.load(str(index), trusted_root=str(tmp_path))
    for call in (lambda: search.main(["query", "--index", str(index), *trusted, "--text", "x"]),
                 lambda: serve.main(["--index", str(index), "--model-path", str(tiny["checkpoint"]), *trusted])):
        with pytest.raises(SystemExit) as e:
            call()
        assert "outside --trusted-root" in one_line_exit(e)


def test_the_default_trusted_root_is_the_working_folder(tmp_path, monkeypatch):
    images = tmp_path / "photos"
    images.mkdir()
    index = hand_made_index(tmp_path / "index", images, ["a.jpg"])
    monkeypatch.chdir(tmp_path)
    assert search.parse_args(["query", "--index", "index", "--text", "x"]).trusted_root == "."
    assert len(search_index.ImageIndex.load(str(index), trusted_root=".")) == 1  # photos/ is under it
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(search_index.SearchError, match="outside --trusted-root '.'"):
        search_index.ImageIndex.load(str(index), trusted_root=".")


def test_a_root_inside_the_index_folder_needs_no_trusted_root(tmp_path):
    index = tmp_path / "index"
    (index / "images").mkdir(parents=True)
    hand_made_index(index, index / "images", ["a.jpg"])
    loaded = search_index.ImageIndex.load(str(index), trusted_root=str(tmp_path / "elsewhere"))
    assert loaded.path(0) == os.path.realpath(index / "images" / "a.jpg")


def test_a_link_cannot_carry_the_root_outside(tmp_path):
    os.symlink("/etc", tmp_path / "innocent")
    index = hand_made_index(tmp_path / "index", tmp_path / "innocent", ["passwd"])
    with pytest.raises(search_index.SearchError, match="outside --trusted-root"):
        search_index.ImageIndex.load(str(index), trusted_root=str(tmp_path))


def test_the_checkpoint_an_index_names_must_lie_inside_the_trusted_root(tmp_path):
    (tmp_path / "trusted" / "images").mkdir(parents=True)
    outside = tmp_path / "downloads" / "evil.pt"
    outside.parent.mkdir()
    outside.write_bytes(b"would run code if unpickled")
    index = hand_made_index(tmp_path / "trusted" / "index", tmp_path / "trusted" / "images", ["a.jpg"],
                            checkpoint=outside)
    loaded = search_index.ImageIndex.load(str(index), trusted_root=str(tmp_path / "trusted"))
    with pytest.raises(search_index.SearchError, match="names the checkpoint .*evil.pt', outside --trusted-root"):
        loaded.model_path()
    with pytest.raises(SystemExit) as e:  # the query never loads it: --model-path is the way out
        search.main(["query", "--index", str(index), "--trusted-root", str(tmp_path / "trusted"), "--text", "x"])
    assert "pass --model-path" in one_line_exit(e)
    inside = tmp_path / "trusted" / "best.pt"
    inside.write_bytes(b"x")
    index = hand_made_index(tmp_path / "trusted" / "index", tmp_path / "trusted" / "images", ["a.jpg"],
                            checkpoint=inside)
    assert search_index.ImageIndex.load(str(index), trusted_root=str(tmp_path / "trusted")).model_path() == str(inside)


# ---------------------------------------------------------------------- what a damaged index says
@pytest.mark.parametrize("change, message", [
    ({"embeddings": np.ones((2, 4), np.int32)}, r"embeddings are int32, not floating point"),
    ({"dim": 4.5}, r"wrong type: dim \(a whole number >= 1\)"),
    ({"dim": True}, r"wrong type: dim"),
    ({"embeddings": np.full((2, 4), np.nan, np.float16)}, r"embedding 0 holds NaN or infinite values.*--rebuild"),
    ({"embeddings": np.array([[1, 0, 0, 0], [0, np.inf, 0, 0]], np.float16)}, r"embedding 1 holds NaN"),
    ({"embeddings": np.ones((2, 3), np.float16)}, r"3 values each, index.json says dim 4"),
    ({"files": ["a.jpg", "b\0.jpg"]}, r"a file with a NUL byte in it \('b\\x00.jpg'\)"),
    ({"files": ["a.jpg", "../b.jpg"]}, r"outside its root \('../b.jpg'\)"),
    ({"sizes": [1, "2"]}, r"wrong type: sizes \(a list of 2 whole numbers\)"),
])
def test_a_damaged_index_says_what_is_wrong(tmp_path, change, message):
    (tmp_path / "images").mkdir()
    fields = {"files": ["a.jpg", "b.jpg"], **change}
    index = hand_made_index(tmp_path / "index", tmp_path / "images", **fields)
    with pytest.raises(search_index.SearchError, match=message) as e:
        search_index.ImageIndex.load(str(index), trusted_root=str(tmp_path))
    assert "\0" not in str(e.value) and "inconsistent (2 embeddings for 2 files)" not in str(e.value)


# ---------------------------------------------------------------------- fuzzed index folders
def hostile_index_cases(rng, tmp_path):
    roots = ["/etc", "/", "..", "", "\0", str(tmp_path / "images" / ".." / ".."), 7, None, ["/etc"],
             str(tmp_path / "images"), "x" * 5000]
    files = [["passwd"], ["../../etc/passwd"], ["/etc/passwd"], ["a\0b"], [""], [1], None, "a.jpg", ["a.jpg"],
             ["sub/../../x"], ["a.jpg"] * 3]
    dims = [4, 0, -1, 4.0, "4", None, 2 ** 40]
    checkpoints = ["/etc/shadow", str(tmp_path / "best.pt"), 5, "\0"]
    cases = []
    for i in range(60):
        fields = {"root": rng.choice(roots), "files": rng.choice(files), "dim": rng.choice(dims),
                  "checkpoint": {"path": rng.choice(checkpoints), "sha256": "0" * 64}}
        cases.append((f"#{i} {json.dumps(fields)[:150]}", fields))
    return cases


def test_fuzzed_index_folders_never_open_a_file_outside(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "best.pt").write_bytes(b"x")
    allowed = os.path.realpath(tmp_path)

    def run(fields):
        folder = tmp_path / "index"
        hand_made_index(folder, "/unused", ["a.jpg"])
        meta = json.loads((folder / "index.json").read_text())
        meta.update(fields)
        (folder / "index.json").write_text(json.dumps(meta))
        kind, value, _ = outcome(lambda: load_and_resolve(folder, str(tmp_path)))
        if kind == "ok":  # whatever loaded resolves inside the trusted folder
            assert all(p is None or p.startswith(allowed + os.sep) for p in value), value
        return kind

    tally = check_all(hostile_index_cases(random.Random(SEED), tmp_path), run)
    assert tally.get("error", 0) >= 40, tally


def load_and_resolve(folder, trusted):
    try:
        index = search_index.ImageIndex.load(str(folder), trusted_root=trusted)
        paths = [index.path(i) for i in range(len(index))]
        return paths + [os.path.realpath(index.model_path())]
    except search_index.SearchError as e:  # a user error, as the fuzz rule wants it
        raise SystemExit(f"error: {e}") from None


# ---------------------------------------------------------------------- broken links while indexing
def test_link_loops_and_dangling_links_are_skipped_and_counted(tiny, encoder, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(os.listdir(tiny["images"]))[:3]:
        (images / name).write_bytes((tiny["images"] / name).read_bytes())
    os.symlink(images / "loop.jpg", images / "loop.jpg")  # ELOOP
    os.symlink(images / "gone.png", images / "dangling.png")  # FileNotFoundError (a link out is counted apart)
    summary = search_index.build_index(encoder, str(images), str(tmp_path / "index"), progress=False)
    assert (summary["images"], summary["failed"]) == (3, 2)


# ---------------------------------------------------------------------- the web service's answers
@pytest.fixture(scope="module")
def app(tiny, index_dir):
    return serve.create_app(str(tiny["checkpoint"]), str(index_dir), device="cpu")


def test_a_long_query_string_gets_414_not_a_reset(app):
    with TestClient(app) as client:
        r = client.get("/api/search", params={"q": "x" * 60_000})  # the test client's own limit is 64 KB
        assert r.status_code == 414 and "over the 8192" in r.json()["detail"]
        assert client.get("/api/search", params={"q": "a red circle"}).status_code == 200
    import uvicorn  # the real server too: h11 would otherwise drop a 200 KB request line at its 16 KB limit
    port = free_port()
    server = uvicorn.Server(serve.server_config(app, "127.0.0.1", port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/search?q=" + "y" * (MAX_URL_CHARS * 25))
        response = conn.getresponse()
        assert response.status == 414 and b"shorten it" in response.read()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_png_over_the_metadata_limit_is_not_called_corrupt(app, tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 10), zip=True)
    path = tmp_path / "meta.png"
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    with TestClient(app) as client:
        r = client.post("/api/search/image", files={"file": ("meta.png", path.read_bytes(), "image/png")})
    assert r.status_code == 400 and "metadata" in r.json()["detail"] and "corrupt" not in r.json()["detail"]
