"""The web API through FastAPI's TestClient, on the tiny checkpoint and an index of its validation images."""
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from inference import index as search_index
from inference import serve
from inference.encoder import DEFAULT_TEMPLATES
from tests.trusted import TRUSTED

UPLOAD_MB = 0.5  # a small limit, so the over-limit test sends little


@pytest.fixture(scope="module")
def client(tiny, index_dir):
    app = serve.create_app(str(tiny["checkpoint"]), str(index_dir), max_upload_mb=UPLOAD_MB, device="cpu")
    with TestClient(app) as c:
        yield c


def image_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def png(size, mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_docs_and_page(client, index_dir):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["images"] == len(search_index.ImageIndex.load(str(index_dir)))
    assert health["max_upload_mb"] == UPLOAD_MB
    assert health["index_type"] == "flat" and health["index_settings"] == {"type": "flat"}
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/search", "/api/search/image",
                                                                  "/api/classify", "/api/image/{image_id}"}
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200


def test_text_search_ranks_like_the_index(client, encoder, index_dir):
    r = client.get("/api/search", params={"q": "a big red circle in the top left", "k": 5})
    assert r.status_code == 200
    results = r.json()["results"]
    index = search_index.ImageIndex.load(str(index_dir))
    embeddings = torch.from_numpy(np.asarray(index.embeddings, dtype=np.float32))  # (N, D), memory-mapped float16
    scores = embeddings @ encoder.encode_texts(["a big red circle in the top left"])[0]  # (N,)
    assert [x["id"] for x in results] == scores.topk(5).indices.tolist()
    assert [x["score"] for x in results] == sorted((x["score"] for x in results), reverse=True)
    assert [x["score"] for x in results] == pytest.approx(scores.topk(5).values.tolist(), abs=1e-5)
    for x in results:
        assert x["path"] == index.files[x["id"]] and x["url"] == f"/api/image/{x['id']}"
    first = client.get(results[0]["url"])
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert first.content == image_bytes(index.path(results[0]["id"]))


def test_image_search_finds_the_image_itself(client, index_dir):
    index = search_index.ImageIndex.load(str(index_dir))
    for i in (0, 5, len(index) - 1):
        r = client.post("/api/search/image", params={"k": 4},
                        files={"file": ("query.jpg", image_bytes(index.path(i)), "image/jpeg")})
        assert r.status_code == 200
        results = r.json()["results"]
        assert len(results) == 4 and results[0]["id"] == i and results[0]["score"] > 0.998
        assert [x["score"] for x in results] == sorted((x["score"] for x in results), reverse=True)


def test_classify_probabilities(client, encoder, index_dir):
    index = search_index.ImageIndex.load(str(index_dir))
    path = index.path(3)
    r = client.post("/api/classify", data={"labels": "circle, square,triangle ,star"},
                    files={"file": ("x.jpg", image_bytes(path), "image/jpeg")})
    assert r.status_code == 200
    labels = r.json()["labels"]
    probs = [x["prob"] for x in labels]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-4)
    names = ["circle", "square", "triangle", "star"]
    want = encoder.classify(encoder.encode_images([path]), names, DEFAULT_TEMPLATES)[0]
    want_by_name = dict(zip(names, want.tolist(), strict=True))
    assert {x["label"]: x["prob"] for x in labels} == pytest.approx(want_by_name, abs=1e-5)


def truncated_jpeg(tiny):
    data = image_bytes(sorted(tiny["images"].iterdir())[0])
    return data[:len(data) // 2]


@pytest.mark.parametrize("request_kind, status, message", [
    ("empty query", 422, "at least 1 character"),
    ("blank query", 422, "blank"),
    ("long query", 422, "at most 500 characters"),
    ("k zero", 422, "greater than or equal to 1"),
    ("k too big", 422, "k is at most 100"),
    ("k not a number", 422, "valid integer"),
    ("no file", 422, "Field required"),
    ("text upload", 415, "not an image"),
    ("empty upload", 400, "empty"),
    ("truncated upload", 400, "cannot be decoded"),
    ("over size limit", 413, "MB upload limit"),
    ("decompression bomb", 413, "over the 40 MP limit"),
    ("no labels", 422, "no labels"),
    ("too many labels", 422, "at most 64 labels"),
    ("image id out of range", 404, "no image with id"),
    ("negative image id", 404, "no image with id"),
    ("path instead of id", 404, "Not Found"),
])
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(client, tiny, request_kind, status, message):
    good = image_bytes(sorted(tiny["images"].iterdir())[1])
    send = {
        "empty query": lambda: client.get("/api/search", params={"q": ""}),
        "blank query": lambda: client.get("/api/search", params={"q": "   "}),
        "long query": lambda: client.get("/api/search", params={"q": "x" * 501}),
        "k zero": lambda: client.get("/api/search", params={"q": "red", "k": 0}),
        "k too big": lambda: client.get("/api/search", params={"q": "red", "k": 101}),
        "k not a number": lambda: client.get("/api/search", params={"q": "red", "k": "ten"}),
        "no file": lambda: client.post("/api/search/image", data={"x": "1"}),
        "text upload": lambda: client.post("/api/search/image", files={"file": ("a.jpg", b"hello", "image/jpeg")}),
        "empty upload": lambda: client.post("/api/search/image", files={"file": ("a.jpg", b"", "image/jpeg")}),
        "truncated upload": lambda: client.post("/api/search/image",
                                                files={"file": ("a.jpg", truncated_jpeg(tiny), "image/jpeg")}),
        "over size limit": lambda: client.post("/api/search/image",
                                               files={"file": ("a.jpg", os.urandom(600_000), "image/jpeg")}),
        # 8000 x 6000 black pixels compress to ~50 kB: the header is refused before any decoding
        "decompression bomb": lambda: client.post("/api/search/image",
                                                  files={"file": ("a.png", png((8000, 6000), "L"), "image/png")}),
        "no labels": lambda: client.post("/api/classify", data={"labels": " , "},
                                         files={"file": ("a.jpg", good, "image/jpeg")}),
        "too many labels": lambda: client.post("/api/classify", data={"labels": ",".join(map(str, range(65)))},
                                               files={"file": ("a.jpg", good, "image/jpeg")}),
        "image id out of range": lambda: client.get("/api/image/100000"),
        "negative image id": lambda: client.get("/api/image/-1"),
        "path instead of id": lambda: client.get("/api/image/..%2F..%2Fetc%2Fpasswd"),
    }[request_kind]
    r = send()
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in str(r.json()["detail"])
    # the server is still fine afterwards
    after = client.post("/api/search/image", params={"k": 2}, files={"file": ("ok.jpg", good, "image/jpeg")})
    assert after.status_code == 200 and len(after.json()["results"]) == 2


def test_chunked_upload_over_the_limit_is_refused(client):
    """Without a Content-Length the body is counted as it arrives."""
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + b"\0" * 700_000 + b"\r\n--XyZ--\r\n")
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
    r = client.post("/api/search/image", content=chunks, headers={"content-type": "multipart/form-data; boundary=XyZ"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413 and "upload limit" in r.json()["detail"]


def test_only_indexed_files_are_served(client, index_dir, tiny):
    index = search_index.ImageIndex.load(str(index_dir))
    assert client.get(f"/api/image/{len(index)}").status_code == 404
    for probe in ("/api/image/../../etc/passwd", "/static/../serve.py", "/static/%2e%2e/serve.py"):
        assert client.get(probe).status_code == 404
    assert client.get("/api/image/0").content == image_bytes(index.path(0))


def test_index_built_with_another_checkpoint_is_refused(tiny, index_dir, tmp_path):
    other = tmp_path / "index"
    shutil.copytree(index_dir, other)
    meta = json.loads((other / "index.json").read_text())
    meta["checkpoint"]["sha256"] = "0" * 64  # as if another checkpoint had encoded the images
    (other / "index.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as e:
        serve.main(["--model-path", str(tiny["checkpoint"]), "--index", str(other), "--device", "cpu", *TRUSTED])
    assert str(e.value.code).startswith("error:") and "was built with" in str(e.value.code)
