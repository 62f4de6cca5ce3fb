"""Request limits of the web service (inference/serve.py), applied before a request reaches a route: the size of
the body and the length of the URL. Each answers in JSON, as the routes do, so a client always gets a status and
a `detail` it can show, never a dropped connection.
"""
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

MAX_URL_CHARS = 8192  # longest path + query string answered; a text query is capped far lower (MAX_QUERY_CHARS)
MAX_HEAD_BYTES = 1 << 20  # request line + headers uvicorn reads before giving up (h11's default is 16 KB)


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


class UrlLimit:
    """Refuse a URL (path and query string) over `max_chars` with a JSON 414 before any route parses it."""

    def __init__(self, app, max_chars):
        self.app, self.max_chars = app, max_chars

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = len(scope.get("raw_path") or scope["path"]) + len(scope.get("query_string", b""))
            if length > self.max_chars:
                detail = f"the URL is {length} characters, over the {self.max_chars} this server answers; shorten it"
                return await JSONResponse({"detail": detail}, status_code=414)(scope, receive, send)
        await self.app(scope, receive, send)
