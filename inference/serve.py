"""A web page and JSON API over an image index: text search, image search and zero-shot classification.

    python search.py index --model checkpoints/best.pt --images photos/ --out indexes/photos
    python serve.py --model checkpoints/best.pt --index indexes/photos      # then open http://127.0.0.1:8000

    GET  /api/search?q=a+red+car&k=10     text -> image        {"results": [{"id", "path", "score", "url"}]}
    POST /api/search/image?k=10           image -> image       multipart field `file`
    POST /api/classify                    zero-shot labels     multipart `file` + form field `labels` (a,b,c)
    GET  /api/image/{id}                  an indexed image, by its index id only
    GET  /api/health                      liveness and what is loaded
    GET  /docs                            the OpenAPI documentation

It listens on the loopback interface unless --host says otherwise. Images are only ever read from the file
names stored in the index; uploads are size-limited, decoded from memory, and refused above a pixel count.
"""
import argparse
import io
import os
import sys
import threading
from functools import lru_cache

from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import Headers

from dataset import DataError
from inference import DEFAULT_TEMPLATES, INFERENCE_ERRORS, Encoder, InferenceError, check_labels, zero_shot_probs
from search import ImageIndex, SearchError

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow decoders an upload may use
MAX_QUERY_CHARS = 500   # longer text queries are refused (the tokenizer would truncate them anyway)
MAX_LABELS = 64         # labels per classification request
MAX_LABEL_CHARS = 100   # characters per label
FORM_OVERHEAD = 64 * 1024  # multipart headers and the labels field, allowed on top of the upload limit


def create_app(model_path, index_dir, max_upload_mb=10.0, max_pixels=40_000_000, max_k=100, device="auto",
               use_faiss=False):
    """The FastAPI app: loads the model and the index once; requests share them (one model call at a time).

    `model_path` None means the checkpoint recorded in the index.
    """
    index = ImageIndex.load(index_dir)
    encoder = Encoder(model_path or index.model_path(), device)
    index.check_encoder(encoder)
    if use_faiss:
        index.use_faiss()
    max_upload = int(max_upload_mb * 1024 * 1024)
    lock = threading.Lock()  # one forward pass at a time: the CPU threads are shared anyway

    app = FastAPI(title="Image-text retrieval",
                  description="Search an image index by text or by image, and classify images zero-shot.")
    app.add_middleware(BodyLimit, max_bytes=max_upload + FORM_OVERHEAD, limit_mb=max_upload_mb)
    app.state.encoder, app.state.index = encoder, index

    @lru_cache(maxsize=32)
    def label_embeddings(labels):  # a label set that comes again is not encoded again
        with lock:
            return encoder.label_embeddings(list(labels), DEFAULT_TEMPLATES)

    def read_upload(file):
        """The uploaded bytes decoded to an RGB image, or the HTTP error that says what is wrong with them."""
        data = file.file.read(max_upload + 1)
        if len(data) > max_upload:
            raise HTTPException(413, f"upload is over the {max_upload_mb:g} MB limit")
        if not data:
            raise HTTPException(400, "the upload is empty; send an image file in the field 'file'")
        try:
            with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as probe:
                width, height = probe.size
        except Image.DecompressionBombError:
            raise HTTPException(413, f"image has too many pixels (limit {max_pixels / 1e6:g} MP)") from None
        except UnidentifiedImageError:
            raise HTTPException(415, f"not an image this server reads ({', '.join(UPLOAD_FORMATS)})") from None
        except (OSError, SyntaxError, ValueError):
            raise HTTPException(400, "the image header cannot be read; the file is corrupt") from None
        if width * height > max_pixels:  # checked on the header, before any pixel is decoded
            raise HTTPException(413, f"image is {width}x{height} = {width * height / 1e6:.1f} MP, over the "
                                     f"{max_pixels / 1e6:g} MP limit")
        try:
            return encoder.open_image(io.BytesIO(data))
        except DataError:
            raise HTTPException(400, "the image cannot be decoded (truncated or corrupt file)") from None

    def results(scores, ids):
        return {"results": [{"id": i, "path": index.files[i], "score": round(s, 6), "url": f"/api/image/{i}"}
                            for s, i in zip(scores[0].tolist(), ids[0].tolist())]}

    k_query = Query(10, ge=1, le=max_k, description="number of results")

    @app.get("/api/health")
    def health():
        return {"status": "ok", "images": len(index), "checkpoint": os.path.basename(encoder.model_path),
                "dim": encoder.dim, "image_size": encoder.image_size, "max_upload_mb": max_upload_mb,
                "max_k": max_k}

    @app.get("/api/search")
    def search_text(q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS, description="text query"),
                    k: int = k_query):
        if not q.strip():
            raise HTTPException(422, "the query is blank")
        with lock:
            query = encoder.encode_texts([q])  # (1, D)
            return {"query": q, **results(*index.search(query, k))}

    @app.post("/api/search/image")
    def search_image(file: UploadFile = File(..., description="query image"), k: int = k_query):
        image = read_upload(file)
        with lock:
            query = encoder.encode_images([image])  # (1, D)
            return results(*index.search(query, k))

    @app.post("/api/classify")
    def classify(file: UploadFile = File(..., description="image to classify"),
                 labels: str = Form(..., description="comma-separated labels, e.g. cat,dog,car")):
        try:
            names = check_labels(labels.split(","))
        except InferenceError as e:
            raise HTTPException(422, str(e)) from None
        if len(names) > MAX_LABELS or max(len(n) for n in names) > MAX_LABEL_CHARS:
            raise HTTPException(422, f"at most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters each")
        image = read_upload(file)
        weights = label_embeddings(tuple(names))  # (L, D)
        with lock:
            probs = zero_shot_probs(encoder.encode_images([image]), weights, encoder.logit_scale())[0]  # (L,)
        ranked = sorted(zip(names, probs.tolist()), key=lambda x: -x[1])
        return {"labels": [{"label": n, "prob": round(p, 6)} for n, p in ranked]}

    @app.get("/api/image/{image_id}")
    def image(image_id: int):
        if not 0 <= image_id < len(index):
            raise HTTPException(404, f"no image with id {image_id} (the index holds {len(index)})")
        path = index.path(image_id)
        if not os.path.isfile(path):
            raise HTTPException(404, f"image {image_id} was removed from disk; re-run search.py index")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(os.path.join(WEB_DIR, "index.html"))

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


class BodyLimit:
    """Refuse request bodies over `max_bytes` with a JSON 413, before they are spooled to memory or disk.

    A declared Content-Length is checked up front; a chunked body is counted as it arrives, and the
    HTTPException raised from `receive` reaches FastAPI's exception handler, which answers in JSON.
    """

    def __init__(self, app, max_bytes, limit_mb):
        self.app, self.max_bytes = app, max_bytes
        self.message = f"request body is over the {limit_mb:g} MB upload limit"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"detail": self.message}, status_code=413)(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.message)
            return message

        await self.app(scope, counting_receive, send)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Serve text/image search and zero-shot classification over an index.")
    p.add_argument("--index", required=True, help="index folder made by 'search.py index'")
    p.add_argument("--model", help="checkpoint; default: the one the index was built with")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload, in MB")
    p.add_argument("--max-megapixels", type=float, default=40.0, help="largest accepted image, in megapixels")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--faiss", action="store_true", help="search with FAISS (pip install faiss-cpu)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    try:
        if a.max_upload_mb <= 0 or a.max_megapixels <= 0:
            raise SearchError("--max-upload-mb and --max-megapixels must be positive")
        app = create_app(a.model, a.index, a.max_upload_mb, int(a.max_megapixels * 1e6), device=a.device,
                         use_faiss=a.faiss)
    except INFERENCE_ERRORS + (SearchError,) as e:
        sys.exit(f"error: {e}")
    import uvicorn  # only needed to listen; tests drive the app directly

    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {a.host}: anyone who can reach this machine can use the service")
    print(f"serving {len(app.state.index)} images on http://{a.host}:{a.port}/ (API docs at /docs)")
    uvicorn.run(app, host=a.host, port=a.port, log_level="info")


if __name__ == "__main__":
    main()
