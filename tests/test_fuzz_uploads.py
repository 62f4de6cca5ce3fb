"""Seeded fuzzing of uploads to the web API, one of the three places a user hands the project raw input
(see tests/fuzzing.py).

Each generator makes a fixed list of malformed inputs from one seed, so a failure names a case that comes back on
every run. Every outcome must be one a user can act on: accepted (and then checked for what it returned), a
one-line error, a counted skip, or an HTTP 4xx with a JSON `detail`; never a traceback and never a 5xx.
"""
import io
import random
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from inference import index as search_index
from inference import serve
from inference.encoder import Encoder
from tests.fuzzing import SEED, UPLOAD_MB, check_all


# ---------------------------------------------------------------------- (c) uploads to the web API
@pytest.fixture(scope="module")
def client(tiny, tmp_path_factory):
    """The app over an index of the tiny run's validation images, as tests/test_serve.py builds it."""
    index_dir = tmp_path_factory.mktemp("fuzz-serve") / "index"
    search_index.build_index(Encoder(str(tiny["checkpoint"]), "cpu"), str(tiny["images"]), str(index_dir),
                             progress=False)
    app = serve.create_app(str(tiny["checkpoint"]), str(index_dir), max_upload_mb=UPLOAD_MB, device="cpu")
    with TestClient(app) as c:  # an exception in the app is raised in the test instead of answering 500
        yield c


def png_header(width, height, idat=b""):
    """A PNG of any declared size, 1 bit per pixel, whose pixel data is `idat` (none: a header-only bomb)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(idat)) + chunk(b"IEND", b""))


def saved(mode, size, fmt, **options):
    buffer = io.BytesIO()
    Image.new(mode, size, "white" if mode != "1" else 1).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def upload_bodies(real):
    """Valid small images of every accepted format and mode, and images that declare absurd sizes (each over the
    server's 40 MP or 20:1 limits, or over Pillow's own bomb limit)."""
    good = [real, saved("RGB", (20, 20), "PNG"), saved("P", (20, 20), "GIF"), saved("RGB", (20, 20), "BMP"),
            saved("RGB", (20, 20), "TIFF"), saved("CMYK", (20, 20), "TIFF"), saved("F", (20, 20), "TIFF"),
            saved("I;16", (20, 20), "PNG"), saved("LA", (20, 20), "PNG"), saved("CMYK", (20, 20), "JPEG"),
            saved("RGB", (20, 20), "WEBP"), saved("RGB", (20, 20), "TIFF", compression="tiff_lzw"),
            saved("1", (20, 20), "TIFF", compression="group4")]
    jpeg = saved("RGB", (20, 20), "JPEG")
    sof = jpeg.index(b"\xff\xc0") + 5  # height, width of the frame header
    huge = [png_header(1, 100_000, b"\0\0" * 100_000), png_header(100_000, 1), png_header(30_000, 30_000),
            saved("1", (10_000, 10_000), "PNG"),
            jpeg[:sof] + struct.pack(">HH", 65_000, 65_000) + jpeg[sof + 4:],
            b"GIF89a" + struct.pack("<HH", 65_535, 65_535) + saved("P", (4, 4), "GIF")[10:],
            saved("RGB", (4, 4), "BMP")[:18] + struct.pack("<ii", 30_000, -30_000) + saved("RGB", (4, 4), "BMP")[26:]]
    return good, huge


def damaged(rng, data):
    data = bytearray(data)
    how = rng.randrange(3)
    if how == 0:
        return bytes(data[:rng.randint(0, len(data))])  # truncated
    for _ in range(rng.randint(1, 8)):  # bytes flipped, mostly in the header where the parsers branch
        at = rng.randrange(min(len(data), 64) if rng.random() < 0.7 else len(data))
        data[at] = rng.randrange(256)
    return bytes(data) if how == 1 else bytes(data) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 99)))


ODD_K = ["0", "-1", "101", "abc", "1e3", "", "2", "9" * 30, "1.5", " 3", "100", "1", "0x10", "\u0661"]
ODD_LABELS = ["cat,dog", "", ",", " , ", "a,a", "a" * 101, ",".join(map(str, range(65))), "\u732b,\u72ac",
              "line\nbreak,x", "nul\x00,y", "a, b ,c", "x" * 100, "\U0001F642,\U0001F600", "a;b"]


def http_cases(rng, real, count):
    good, huge = upload_bodies(real)
    cases = []
    for i in range(count):
        pick = rng.random()
        if pick < 0.25:
            body, what = rng.choice(good), "good"
        elif pick < 0.45:
            body, what = rng.choice(huge), "huge"
        elif pick < 0.85:
            body, what = damaged(rng, rng.choice(good + huge[:2])), "damaged"
        else:
            body, what = rng.choice([b"", b"hello", bytes(rng.randrange(256) for _ in range(300)),
                                     b"\0" * (int(UPLOAD_MB * 2**20) + 10), b"GIF89a", b"\x89PNG\r\n\x1a\n",
                                     png_header(0, 5)]), "junk"
        field = "file" if rng.random() < 0.9 else rng.choice(["image", "files", "", "File"])
        # an empty file name makes the part a plain form field: FastAPI's 422, not an upload
        name = "a.jpg" if rng.random() < 0.5 else rng.choice(["../../etc/passwd", "", "x" * 300, "\u00e9.png",
                                                              "a\0.png", "noext"])
        request = {"what": what, "route": "/api/classify" if rng.random() < 0.35 else "/api/search/image",
                   "field": field,
                   "name": name, "body": body, "k": rng.choice(ODD_K) if rng.random() < 0.3 else None,
                   "labels": rng.choice(["cat,dog"] + ODD_LABELS) if rng.random() < 0.95 else None}
        cases.append((f"upload #{i} {what} {len(body)} bytes to {request['route']} "
                      f"(field {field!r}, k {request['k']!r}, labels {request['labels']!r:.40})", request))
    return cases


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # damaged TIFF tags, by design
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the 100 MP header, refused with 413
def test_fuzzed_uploads_get_200_or_a_json_4xx_and_the_server_keeps_serving(client, tiny):
    real = sorted(tiny["images"].iterdir())[0].read_bytes()
    cases = http_cases(random.Random(SEED), real, 100)
    images = client.get("/api/health").json()["images"]
    statuses = {}

    def run(req):
        params = {"k": req["k"]} if req["k"] is not None else {}
        data = {"labels": req["labels"]} if req["labels"] is not None and req["route"] == "/api/classify" else {}
        try:
            r = client.post(req["route"], params=params, data=data,
                            files={req["field"]: (req["name"], req["body"], "application/octet-stream")})
        except Exception as e:  # noqa: BLE001 - TestClient re-raises what would have been a 500
            raise AssertionError(f"the server raised {type(e).__name__}: {e}") from None
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code == 200 or 400 <= r.status_code < 500, f"status {r.status_code}: {r.text[:200]}"
        assert r.headers["content-type"] == "application/json", r.headers["content-type"]
        if r.status_code != 200:
            assert r.json()["detail"], r.text
            # an absurd size is refused as such, from the header, whatever else is wrong with the file
            assert req["what"] != "huge" or r.status_code in (413, 422), (r.status_code, r.json()["detail"])
            return "refused"
        if req["route"] == "/api/classify":
            probs = [x["prob"] for x in r.json()["labels"]]
            assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4, probs
        else:
            results = r.json()["results"]
            assert len(results) == min(int(req["k"] or 10), images), (req["k"], len(results))
        return "accepted"

    tally = check_all(cases, run)
    assert tally.get("accepted", 0) >= 10 and statuses.get(413, 0) >= 5 and len(statuses) >= 4, statuses
    health = client.get("/api/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    after = client.get("/api/search", params={"q": "a red circle", "k": 3})
    assert after.status_code == 200 and len(after.json()["results"]) == 3
