"""A web page and JSON API over an image index: text search, image search and zero-shot classification.

    python -m inference.search index --model-path checkpoints/best.pt --images photos/ --output indexes/photos
    python -m inference.serve --index indexes/photos           # then open http://127.0.0.1:8000

    GET  /api/search?q=a+red+car&k=10     text -> image        {"results": [{"id", "path", "score", "url"}]}
    POST /api/search/image?k=10           image -> image       multipart field `file`
    POST /api/classify                    zero-shot labels     multipart `file` + form field `labels` (a,b,c)
    GET  /api/image/{id}                  an indexed image, by its index id only
    GET  /api/health                      liveness and what is loaded (with the index type and its settings)
    GET  /docs                            the OpenAPI documentation

An ivf or hnsw index (`python -m inference.search index --index-type ...`) is searched through FAISS with its
own settings unless --nprobe (ivf) or --ef-search (hnsw) say otherwise. It listens on the loopback interface
unless --host says otherwise. Images are only ever read from the file names stored in the index; uploads are
size-limited, decoded from memory, and refused above a pixel count.
"""
import argparse
import errno
import io
import os
import socket
import sys
import threading
from functools import lru_cache

from inference import ann
from inference.options import add_image_limits, add_trusted_root, megapixels, port, positive_float, positive_int


def parse_args(argv):
    p = argparse.ArgumentParser(description="Serve text/image search and zero-shot classification over an index.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--index", required=True, help="index folder made by 'python -m inference.search index'")
    p.add_argument("--model-path", help="checkpoint; default: the one the index was built with")
    p.add_argument("--text-model", help="tokenizer/config folder; default: the one named in the checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=port, default=8000, help="TCP port, 1 to 65535")
    add_trusted_root(p)
    p.add_argument("--max-upload-mb", type=positive_float, default=10.0, help="largest accepted upload, in MB")
    add_image_limits(p)
    p.add_argument("--max-megapixels", dest="max_image_pixels", type=megapixels, default=argparse.SUPPRESS,
                   help="--max-image-pixels in millions (its former name)")
    p.add_argument("--max-k", type=positive_int, default=100, help="most results one request may ask for")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--nprobe", type=int, help=f"ivf: lists scanned per query (more: slower and closer to exact). "
                                              f"Left out: {ann.DEFAULT_NPROBE}, capped at nlist")
    p.add_argument("--ef-search", type=int, help=f"hnsw: candidates kept per query (more: slower and closer to "
                                                 f"exact). Left out: {ann.DEFAULT_EF_SEARCH}")
    return p.parse_args(argv)


# --help or a mistyped option is answered before torch, transformers and FastAPI load (seconds, hundreds of MB):
# the command line is checked here, and the heavy imports below run only once it parses.
if __name__ == "__main__":
    parse_args(sys.argv[1:])

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError

from engine.errors import DataError, UserError, run_entry
from engine.images import ImageLimits, ImageTooLarge, MetadataTooLarge, check_size, decode_size, metadata_over_limit
from inference.encoder import DEFAULT_TEMPLATES, Encoder, InferenceError, check_labels, zero_shot_probs
from inference.index import ImageIndex
from inference.limits import MAX_HEAD_BYTES, MAX_URL_CHARS, BodyLimit, UrlLimit

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow decoders an upload may use
MAX_QUERY_CHARS = 500   # longer text queries are refused (the tokenizer would truncate them anyway)
MAX_LABELS = 64         # labels per classification request
MAX_LABEL_CHARS = 100   # characters per label
FORM_OVERHEAD = 64 * 1024  # multipart headers and the labels field, allowed on top of the upload limit


class Service:
    """What the routes share: the encoder, the index, the limits, and one lock so one model call runs at a time
    (the CPU threads are shared anyway). Stored on `app.state.service`."""

    def __init__(self, encoder, index, max_upload_mb, max_k):
        self.encoder, self.index = encoder, index
        self.max_upload_mb, self.max_upload = max_upload_mb, int(max_upload_mb * 1024 * 1024)
        self.max_k = max_k
        self.lock = threading.Lock()
        # a label set that comes again is not encoded again
        self.label_embeddings = lru_cache(maxsize=32)(self._label_embeddings)

    def _label_embeddings(self, labels):
        with self.lock:
            return self.encoder.label_embeddings(list(labels), DEFAULT_TEMPLATES)

    def read_upload(self, file):
        """The uploaded bytes decoded to an RGB image, or the HTTP error that says what is wrong with them."""
        data = file.file.read(self.max_upload + 1)
        if len(data) > self.max_upload:
            raise HTTPException(413, f"upload is over the {self.max_upload_mb:g} MB limit")
        if not data:
            raise HTTPException(400, "the upload is empty; send an image file in the field 'file'")
        try:
            with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as probe:
                width, height = decode_size(probe, self.encoder.image_size)  # as engine.images.load_image does
        except Image.DecompressionBombError:
            raise HTTPException(413, "image has too many pixels for this server") from None
        except UnidentifiedImageError:
            raise HTTPException(415, f"not an image this server reads ({', '.join(UPLOAD_FORMATS)})") from None
        except (OSError, SyntaxError, ValueError) as e:
            problem = metadata_over_limit(e)
            raise HTTPException(400, f"the image {problem}" if problem else
                                "the image header cannot be read; the file is corrupt") from None
        try:  # the decoded size (from the header) against the limits, before any pixel is decoded
            check_size(width, height, self.encoder.enc.limits, "upload")
        except ImageTooLarge as e:
            raise HTTPException(413, str(e)) from None
        try:
            return self.encoder.open_image(io.BytesIO(data))
        except MetadataTooLarge as e:
            raise HTTPException(400, f"the image {e.problem}") from None
        except DataError:
            raise HTTPException(400, "the image cannot be decoded (truncated or corrupt file)") from None

    def results(self, scores, ids):
        return {"results": [{"id": i, "path": self.index.files[i], "score": round(s, 6), "url": f"/api/image/{i}"}
                            for s, i in zip(scores[0].tolist(), ids[0].tolist(), strict=True)
                            if i >= 0]}  # an ivf search marks with -1 what its probed lists could not fill


router = APIRouter()
K_QUERY = Query(10, ge=1, description="number of results (at most the server's max-k)")


def service(request: Request) -> Service:
    return request.app.state.service


async def one_upload(request: Request):
    """Refuse a form with several `file` parts, of which FastAPI would silently keep the last."""
    if len((await request.form()).getlist("file")) > 1:  # the form FastAPI parsed already: cached, not re-read
        raise HTTPException(400, "send one file in the field 'file', not several")


async def validation_error(request: Request, exc: RequestValidationError):
    """FastAPI's 422 without the `input` it echoes (a 100 kB bad value would come back whole)."""
    return JSONResponse({"detail": [{"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")}
                                    for e in exc.errors()]}, status_code=422)


def check_k(svc, k):
    if k > svc.max_k:
        raise HTTPException(422, f"k is at most {svc.max_k}")
    return k


@router.get("/api/health")
def health(request: Request):
    svc = service(request)
    return {"status": "ok", "images": len(svc.index), "checkpoint": os.path.basename(svc.encoder.model_path),
            "dim": svc.encoder.dim, "image_size": svc.encoder.image_size, "max_upload_mb": svc.max_upload_mb,
            "max_k": svc.max_k, "index_type": svc.index.kind, "index_settings": svc.index.settings()}


@router.get("/api/search")
def search_text(request: Request,
                q: str = Query(..., min_length=1, description=f"text query, at most {MAX_QUERY_CHARS} characters"),
                k: int = K_QUERY):
    svc = service(request)
    check_k(svc, k)
    if len(q) > MAX_QUERY_CHARS:  # checked here: FastAPI's own max_length error echoes the whole query back
        raise HTTPException(422, f"the query has {len(q)} characters; at most {MAX_QUERY_CHARS} characters are "
                                 f"accepted")
    if not q.strip():
        raise HTTPException(422, "the query is blank")
    with svc.lock:
        query = svc.encoder.encode_texts([q])  # (1, D)
        return {"query": q, **svc.results(*svc.index.search(query, k))}


@router.post("/api/search/image", dependencies=[Depends(one_upload)])
def search_image(request: Request, file: UploadFile = File(..., description="query image"), k: int = K_QUERY):
    svc = service(request)
    check_k(svc, k)
    image = svc.read_upload(file)
    with svc.lock:
        query = svc.encoder.encode_images([image])  # (1, D)
        return svc.results(*svc.index.search(query, k))


@router.post("/api/classify", dependencies=[Depends(one_upload)])
def classify(request: Request, file: UploadFile = File(..., description="image to classify"),
             labels: str = Form(..., description="comma-separated labels, e.g. cat,dog,car")):
    svc = service(request)
    if labels.count(",") >= MAX_LABELS:  # before any per-label work
        raise HTTPException(422, f"at most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters each")
    try:
        names = check_labels(labels.split(","), how="send at least one in the form field 'labels', e.g. cat,dog")
    except InferenceError as e:
        raise HTTPException(422, str(e)) from None
    if len(names) > MAX_LABELS or max(len(n) for n in names) > MAX_LABEL_CHARS:
        raise HTTPException(422, f"at most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters each")
    image = svc.read_upload(file)
    weights = svc.label_embeddings(tuple(names))  # (L, D)
    with svc.lock:
        probs = zero_shot_probs(svc.encoder.encode_images([image]), weights, svc.encoder.logit_scale())[0]  # (L,)
    ranked = sorted(zip(names, probs.tolist(), strict=True), key=lambda x: -x[1])
    return {"labels": [{"label": n, "prob": round(p, 6)} for n, p in ranked]}


@router.get("/api/image/{image_id}")
def image(request: Request, image_id: int):
    index = service(request).index
    if not 0 <= image_id < len(index):
        raise HTTPException(404, f"no image with id {image_id} (the index holds {len(index)})")
    path = index.path(image_id)
    if path is None or not os.path.isfile(path):
        raise HTTPException(404, f"image {image_id} is no longer under the index's folder; re-run the indexing")
    return FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})


@router.get("/", include_in_schema=False)
def page():
    return FileResponse(os.path.join(WEB_DIR, "index.html"))


def create_app(model_path, index_dir, max_upload_mb=10.0, max_pixels=40_000_000, max_k=100, device="auto",
               text_model=None, max_aspect_ratio=20.0, nprobe=None, ef_search=None, trusted_root=None):
    """The FastAPI app: loads the model and the index once; requests share them through `app.state.service`.

    `model_path` None means the checkpoint recorded in the index; `nprobe` (ivf) and `ef_search` (hnsw) None
    mean the index's own settings; `trusted_root` bounds what the index may point at (ImageIndex.load; the
    command line always gives one, None is for code that built the index itself).
    """
    index = ImageIndex.load(index_dir, trusted_root=trusted_root).tune(nprobe, ef_search)
    encoder = Encoder(model_path or index.model_path(), device, text_model,
                      limits=ImageLimits(max_pixels, max_aspect_ratio))
    index.check_encoder(encoder)
    app = FastAPI(title="Image-text retrieval",
                  description="Search an image index by text or by image, and classify images zero-shot.")
    app.state.service = Service(encoder, index, max_upload_mb, max_k)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(BodyLimit, max_bytes=app.state.service.max_upload + FORM_OVERHEAD, limit_mb=max_upload_mb)
    app.add_middleware(UrlLimit, max_chars=MAX_URL_CHARS)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def listen_socket(host, port):
    """A socket bound to host:port the way uvicorn binds one, or a one-line error when it cannot be: uvicorn's
    own failure is a multi-line log and exit status 3."""
    sock = socket.socket(family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (by another server?); pick another with --port") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host and --port") from None
    return sock


def server_config(app, host, port, log_level="info"):
    """uvicorn's settings for `app`: a request head up to MAX_HEAD_BYTES reaches the app, so a long URL is
    answered 414 by UrlLimit instead of h11 dropping the connection at its 16 KB default."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES)


def run(a):
    app = create_app(a.model_path, a.index, a.max_upload_mb, a.max_image_pixels, a.max_k, a.device,
                     a.text_model, a.max_aspect_ratio, nprobe=a.nprobe, ef_search=a.ef_search,
                     trusted_root=a.trusted_root)
    import uvicorn  # only needed to listen; tests drive the app directly

    sock = listen_socket(a.host, a.port)  # held from here on: no other server can take the port meanwhile
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {a.host}: anyone who can reach this machine can use the service")
    index = app.state.service.index
    print(f"serving {len(index)} images ({index.kind} index) on http://{a.host}:{a.port}/ (API docs at /docs)")
    try:
        uvicorn.Server(server_config(app, a.host, a.port)).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C is how a server stops: it has shut down cleanly (as uvicorn.run treats it)
        pass
    return app


def main(argv=None):
    return run_entry(run, parse_args(argv))


if __name__ == "__main__":
    main()
