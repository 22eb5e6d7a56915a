"""Serve a fine-tuned model over HTTP: one image in, the row ``predict.py`` writes for it out, as JSON.

    python serve.py --model RUN/checkpoint-best.pdparams                   # http://127.0.0.1:8080
    python serve.py --model exported/ --host 0.0.0.0 --port 9000 --threads 2
    curl http://127.0.0.1:8080/health
    curl -H 'Content-Type: image/jpeg' --data-binary @eye.jpg http://127.0.0.1:8080/predict
    curl -F image=@eye.jpg http://127.0.0.1:8080/predict
    curl -F left=@left.jpg -F right=@right.jpg http://127.0.0.1:8080/predict          # dual-eye models

``--model`` is whatever ``util.deploy.load_predictor`` takes (a training checkpoint, or a folder written by
``export.py``); it is loaded once, before the server says it is ready, and run once on a grey image so that
a model that cannot run fails at start rather than on the first request.

Endpoints:

- ``GET /health``: ``status``, ``model``, ``task``, ``class_names``, ``input_size``, ``num_views``,
  ``backend``, ``precision``.
- ``POST /predict``: the image as the request body (``Content-Type: image/*`` or
  ``application/octet-stream``), or a ``multipart/form-data`` upload with the field ``image`` (dual-eye
  models: ``left`` and ``right``). The answer is ``{"file": ..., "prediction": ..., "confidence": ...,
  "prob_<class>": ..., ...}``: ``Predictor.results`` for the image, the row ``predict.py`` writes for the
  same file (the same strings), with ``file`` the uploaded file name (``left|right`` for a pair; empty for a
  bare body). A body that is not a complete image, a missing field, or one image for a dual-eye model: 400
  with ``{"error": reason}``; a body over ``--max_body_mb``: 413; another content type: 415; another path:
  404; another method: 405.

Why the standard library's ``http.server`` and not a web framework: there is one endpoint that matters, so a
framework would bring a dependency to install, pin and keep patched for nothing it would be used for; the
server runs wherever the toolkit runs (the same Python, offline). ``ThreadingHTTPServer`` reads and decodes
each request in its own thread; the model itself runs under a lock, one batch at a time, because neither
Paddle's dygraph nor a Paddle Inference predictor is documented as safe to call from several threads (and
on a CPU the math threads of one run already keep the cores busy). Every response closes its connection, so
a stop (SIGINT or SIGTERM) waits only for the requests in flight and then exits 0.

It has no authentication, TLS or rate limit: it listens on 127.0.0.1 by default; put a reverse proxy in
front of it to expose it further. Multipart bodies are split here (the ``cgi`` module is gone from Python
3.13, and the ``email`` parser is line-based and takes seconds on a camera-sized upload); ``email`` only
reads the headers.

References: RFC 7578 (multipart/form-data), RFC 2046 section 5.1 (multipart bodies), RFC 9110 (status codes;
``Expect: 100-continue``).
"""
from __future__ import annotations

import argparse
import email.message
import email.parser
import email.policy
import errno
import io
import json
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np

from util.blas import select_mkl
from util.errors import UserError
from util.threads import math_threads

MATH_THREADS = math_threads()  # before Paddle's import, handed to it after (util/threads.py)
select_mkl()  # before Paddle's import: its matrix products on the current MKL (util/blas.py)
warnings.filterwarnings("ignore", message="No ccache found")

ROUTES = {"/health": "GET", "/predict": "POST"}
MAX_BODY_MB = 50.0
RAW_TYPES = ("application/octet-stream",)  # and image/*


class BadRequest(Exception):
    """A request the server answers with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, headers: dict | None = None):
        super().__init__(message)
        self.status = int(status)
        self.headers = headers or {}


def decode_image(data: bytes, what: str):
    """``data`` as an 8-bit RGB PIL image, read completely (a truncated file fails here, as in
    ``util.image_io.load_image``); ``BadRequest`` naming ``what`` otherwise."""
    from PIL import Image

    from util.image_io import to_rgb

    if not data:
        raise BadRequest(f"{what}: empty (no image data); send a JPEG/PNG/BMP/TIFF file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # the file's structure (PNG chunk checksums, ...), before decoding anything
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = to_rgb(img)
            return img.copy() if rgb is img else rgb
    # Anything a decoder raises on these bytes is the upload's fault: hostile files reach struct, index and
    # arithmetic errors inside Pillow's plugins as well as OSError/SyntaxError/DecompressionBombError.
    except Exception as err:
        raise BadRequest(f"{what}: not a complete image ({type(err).__name__}: {err}); send a complete "
                         f"JPEG/PNG/BMP/TIFF file") from None


def _header_params(value: str) -> email.message.EmailMessage:
    msg = email.message.EmailMessage()
    msg["Content-Type"] = value
    return msg


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str, bytes]]:
    """The fields of a ``multipart/form-data`` body: ``{name: (file name or '', bytes)}`` (the first part of
    each name). Parts are cut at the delimiter lines (CRLF ``--boundary``), so file data is never scanned
    line by line or re-encoded; each part's headers are read by the ``email`` package."""
    boundary = _header_params(content_type).get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise BadRequest("multipart/form-data without a boundary parameter; let the client build the upload "
                         "(curl -F image=@eye.jpg)")
    delimiter = b"--" + boundary.encode("latin-1", "replace")  # header values arrive as latin-1 text
    first = body.find(delimiter)
    if first < 0 or (first > 0 and body[first - 2:first] != b"\r\n"):
        raise BadRequest("multipart body: no part starts with the boundary of the Content-Type header; send a "
                         "well-formed multipart/form-data upload")
    header_parser = email.parser.BytesHeaderParser(policy=email.policy.HTTP)
    fields: dict[str, tuple[str, bytes]] = {}
    pos = first + len(delimiter)
    while not body.startswith(b"--", pos):  # "--boundary--" closes the body
        line_end = body.find(b"\r\n", pos)
        start = line_end + 2
        end = _next_delimiter(body, delimiter, start) if line_end >= 0 else -1
        if end < 0:
            raise BadRequest("multipart body: ends inside a part (no closing boundary; truncated upload?); "
                             "send the whole upload")
        if body.startswith(b"\r\n", start):  # a part without headers
            head_end = data_start = start + 2
        else:
            split = body.find(b"\r\n\r\n", start, end)
            if split < 0:
                raise BadRequest("multipart body: a part has no blank line after its headers; send a "
                                 "well-formed multipart/form-data upload")
            head_end, data_start = split + 2, split + 4
        headers = header_parser.parsebytes(body[start:head_end] + b"\r\n")
        name = headers.get_param("name", header="content-disposition")
        if isinstance(name, str) and name not in fields:
            fields[name] = (_file_name(headers.get_filename()), body[data_start:end])
        pos = end + 2 + len(delimiter)
    return fields


def _next_delimiter(body: bytes, delimiter: bytes, start: int) -> int:
    """Where the CRLF of the next delimiter line is (-1: none): CRLF, the delimiter, then ``--`` (the close)
    or optional spaces and CRLF; data that merely starts like it (``--boundaryX``) is skipped."""
    at = body.find(b"\r\n" + delimiter, start)
    while at >= 0:
        after = body[at + 2 + len(delimiter):at + 2 + len(delimiter) + 80]
        if after.startswith(b"--") or after.lstrip(b" \t").startswith(b"\r\n"):
            return at
        at = body.find(b"\r\n" + delimiter, at + 1)
    return -1


def _file_name(name: str | None) -> str:
    """The uploaded file's name without the client's folders (some clients send a whole path), as text
    any JSON reader takes: raw UTF-8 in the header arrives as escaped bytes and is decoded back."""
    if not name:
        return ""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class Handler(BaseHTTPRequestHandler):
    """One request: route, read the body, decode outside the model lock, run the model under it."""

    server_version = "retfound-serve"
    protocol_version = "HTTP/1.1"  # for Expect: 100-continue; every response still closes its connection
    timeout = 60  # seconds a client may stall while sending, before its connection is dropped
    server: Server

    # -- plumbing ---------------------------------------------------------------------------------------------
    def log_request(self, code="-", size="-"):
        pass  # one line per request is written by _finish, with the time it took

    def _reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True
        self._status = status

    def _finish(self, started: float) -> None:
        ms = (time.perf_counter() - started) * 1000.0
        print(f"{self.command} {urlsplit(self.path).path} {getattr(self, '_status', '-')} {ms:.1f} ms",
              file=sys.stderr, flush=True)

    def _check(self) -> int:
        """The route and the declared body length (0 for GET); ``BadRequest`` for anything refused before
        the body is read."""
        path = urlsplit(self.path).path
        method = ROUTES.get(path)
        if method is None:
            raise BadRequest(f"{path}: no such endpoint (GET /health, POST /predict)", HTTPStatus.NOT_FOUND)
        if self.command != method:
            raise BadRequest(f"{self.command} {path}: method not allowed ({method} {path})",
                             HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": method})
        if method == "GET":
            return 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise BadRequest("chunked request body: not supported (a Content-Length header); send the image with "
                             "its length (curl --data-binary @eye.jpg does)", HTTPStatus.LENGTH_REQUIRED)
        declared = self.headers.get("Content-Length")
        if declared is None:
            raise BadRequest("no Content-Length header; send the image as the request body with its length",
                             HTTPStatus.LENGTH_REQUIRED)
        try:
            length = int(declared)
            if length < 0:
                raise ValueError
        except ValueError:
            raise BadRequest(f"Content-Length {declared!r}: not a byte count") from None
        if length > self.server.max_body:
            raise BadRequest(f"request body of {length} bytes: over the limit of {self.server.max_body} bytes "
                             f"(--max_body_mb); send a smaller image or restart the server with a larger "
                             f"--max_body_mb", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return length

    def handle_expect_100(self):
        # a client that asks first (curl does for large uploads) hears a refusal before sending the body
        try:
            self._check()
        except BadRequest as err:
            started = time.perf_counter()
            self._reply(err.status, {"error": str(err)}, err.headers)
            self._finish(started)
            return False
        return super().handle_expect_100()

    def _discard_body(self) -> None:
        """Read and drop the body of a refused request (at most twice the limit, for at most 5 s), so that a
        client still sending it reads the answer rather than a reset connection."""
        try:
            left = min(int(self.headers.get("Content-Length", "0")), 2 * self.server.max_body)
        except ValueError:
            return
        deadline = time.monotonic() + 5.0
        self.connection.settimeout(1.0)
        try:
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _handle(self) -> None:
        started = time.perf_counter()
        try:
            try:
                length = self._check()
                if self.command == "GET":
                    self._reply(HTTPStatus.OK, self.server.health())
                else:
                    self._reply(HTTPStatus.OK, self._predict(length))
            except BadRequest as err:
                self._reply(err.status, {"error": str(err)}, err.headers)
                if err.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                    self._discard_body()
            except (ConnectionError, TimeoutError):
                raise
            except Exception as err:  # a bug must not stop the server: logged in full, answered with 500
                traceback.print_exc(file=sys.stderr)
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR,
                            {"error": f"internal error: {type(err).__name__}: {err}"})
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            self._status = "dropped"  # the client went away or stalled; nothing more to answer
        self._finish(started)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _handle

    # -- /predict ---------------------------------------------------------------------------------------------
    def _predict(self, length: int) -> dict:
        data = self.rfile.read(length) if length else b""
        if len(data) < length:
            raise BadRequest(f"request body: {len(data)} of the {length} bytes announced arrived; send the "
                             f"whole image")
        if not data:
            raise BadRequest("empty request body; send the image as the body (Content-Type: image/jpeg) or as "
                             "the multipart field 'image'")
        server = self.server
        wanted = ("left", "right") if server.predictor.num_views == 2 else ("image",)
        content_type = self.headers.get("Content-Type")
        kind = _header_params(content_type).get_content_type() if content_type else "application/octet-stream"
        if kind == "multipart/form-data":
            fields = parse_multipart(data, content_type)
            missing = [f for f in wanted if f not in fields]
            if missing:
                sent = ", ".join(repr(f) for f in fields) or "none"
                raise BadRequest(f"multipart field {' and '.join(repr(f) for f in missing)} missing (fields sent: "
                                 f"{sent}); upload the image as " + _usage(wanted))
            images = [decode_image(fields[f][1], f"field '{f}'") for f in wanted]
            name = "|".join(fields[f][0] for f in wanted)
        elif kind.startswith("image/") or kind in RAW_TYPES:
            if len(wanted) == 2:
                raise BadRequest(f"a single image for a dual-eye model ({server.predictor.identity.model} takes a "
                                 f"left and a right image); send both as " + _usage(wanted))
            images, name = [decode_image(data, "request body")], ""
        else:
            raise BadRequest(f"Content-Type {kind}: not an image upload (image/*, application/octet-stream or "
                             f"multipart/form-data); send it as " + _usage(wanted),
                             HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        return {"file": name, **server.predict(images[0] if len(images) == 1 else tuple(images))}


def _usage(fields: tuple) -> str:
    if len(fields) == 2:
        return "multipart fields 'left' and 'right' (curl -F left=@L.jpg -F right=@R.jpg URL)"
    return ("the body with Content-Type: image/jpeg (curl -H 'Content-Type: image/jpeg' --data-binary @eye.jpg "
            "URL) or the multipart field 'image' (curl -F image=@eye.jpg URL)")


class Server(ThreadingHTTPServer):
    """The HTTP server and the model it serves (``predictor`` is set once the model has loaded)."""

    daemon_threads = False  # server_close() waits for the requests in flight
    predictor = None
    max_body = int(MAX_BODY_MB * 1024 * 1024)

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self.lock = threading.Lock()

    def health(self) -> dict:
        p = self.predictor
        return {"status": "ok", "model": p.identity.model, "task": p.task.name, "class_names": p.class_names,
                "input_size": p.identity.input_size, "num_views": p.num_views, "backend": p.backend,
                "precision": p.precision}

    def predict(self, item) -> dict:
        """The result row for one image (or a (left, right) pair of images)."""
        try:
            x = self.predictor.load(item)[None]  # preprocessing, outside the lock
        except UserError as err:  # the image does not suit the run's preprocessing
            raise BadRequest(str(err)) from None
        with self.lock:
            return self.predictor.results(self.predictor.outputs(x))[0]


class Server6(Server):
    address_family = socket.AF_INET6


def bind(host: str, port: int) -> Server:
    """A server listening on ``host:port`` (``port`` 0: a free port), or a ``UserError`` saying why not."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: not a TCP port (0-65535; 0 picks a free one); pass e.g. 8080")
    try:
        return (Server6 if ":" in host else Server)((host, port), Handler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: {host}:{port} is already in use (another server listens there); "
                            f"stop it or pass another --port (--port 0 picks a free one)") from None
        if err.errno == errno.EACCES:
            raise UserError(f"--port {port}: not allowed to listen on {host}:{port} (ports below 1024 need "
                            f"administrator rights); pass a port from 1024 up") from None
        raise UserError(f"--host {host}: cannot listen on {host}:{port} ({err.strerror or err}); pass an address "
                        f"of this machine (127.0.0.1 for this machine only, 0.0.0.0 for every interface)") from None


def main(argv: list[str] | None = None) -> int:
    from util.deploy import add_backend_flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--resume", dest="model", required=True,  # --resume: predict.py's name for it
                   help="checkpoint-best.pdparams written by main_finetune.py, or a folder written by export.py")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", default=8080, type=int, help="TCP port (0: a free port, printed when ready)")
    add_backend_flags(p, MATH_THREADS)
    p.add_argument("--max_body_mb", default=MAX_BODY_MB, type=float,
                   help="largest request body accepted, in MB (larger: 413)")
    a = p.parse_args(argv)
    try:
        return serve(a)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        return 130


def serve(a) -> int:
    if a.threads is not None and a.threads < 1:
        raise UserError(f"--threads {a.threads}: expected 1 or more; pass a positive thread count")
    if not a.max_body_mb > 0:
        raise UserError(f"--max_body_mb {a.max_body_mb}: expected a positive size in MB; pass e.g. 50")
    # the port first: a taken port is reported at once, not after the model has loaded
    server = bind(a.host, a.port)
    try:
        import paddle

        from util.deploy import load_predictor

        paddle.base.core.set_num_threads(a.threads or MATH_THREADS)
        predictor = load_predictor(a.model, a.backend, a.precision, a.threads)
        _warm_up(predictor)
        server.predictor = predictor
        server.max_body = int(a.max_body_mb * 1024 * 1024)

        stopping = threading.Event()

        def stop(signum, frame):
            if not stopping.is_set():  # shutdown() blocks until serve_forever returns: not in this thread
                stopping.set()
                threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        host, port = server.server_address[:2]
        url_host = f"[{host}]" if ":" in host else host
        print(f"serving {predictor.identity.model} on http://{url_host}:{port}", flush=True)
        server.serve_forever()
    finally:
        server.server_close()
    print("stopped", file=sys.stderr, flush=True)
    return 0


def _warm_up(predictor) -> None:
    """One run on a mid-grey image: a model that cannot run fails now, and the first request is not slow."""
    from PIL import Image

    size = predictor.identity.input_size
    grey = Image.new("RGB", (size, size), (128, 128, 128))
    item = (grey, grey) if predictor.num_views == 2 else grey
    predictor.results(predictor.outputs(np.stack([predictor.load(item)])))


if __name__ == "__main__":
    sys.exit(main())
