"""Small real HTTP servers for the backend tests: an image host and a stand-in for Label Studio's file and
token endpoints (the end-to-end test uses the real Label Studio)."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs


def make_jwt(claims: dict) -> str:
    """An unsigned JWT-shaped token (the backend reads only its claims)."""
    encode = lambda data: base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{encode({'alg': 'HS256', 'typ': 'JWT'})}.{encode(claims)}.c2lnbmF0dXJl"


class ImageHost:
    """Serves ``directory`` at ``/files/<name>`` (no auth) and ``/data/upload/<name>`` (auth required).

    Label Studio's rules: ``Authorization: Token <legacy>`` or ``Bearer <access>`` where the access token came
    from ``POST /api/token/refresh/`` with the personal (refresh) token. Special paths: ``/slow`` (sleeps),
    ``/text`` (HTML), ``/big`` (many bytes), ``/trickle`` (one byte every 0.2 s, for a minute), ``/redirect?to=URL``
    (302). Every request's headers are recorded in ``requests``.

    Like Label Studio it lists ``projects`` and their ``tasks`` (``/api/projects/N/``, ``/api/tasks/?project=N``,
    paged), takes predictions (``POST /api/predictions/``, kept in ``predictions``; ``GET
    /api/predictions/?task=N``) and presigns cloud URIs of the bucket ``photos`` (``GET /tasks/N/presign/?fileuri=
    <base64 s3://photos/NAME>`` redirects to ``/files/NAME``; other buckets: 404).
    """

    def __init__(self, directory: Path, legacy_token: str = "legacy-token-123",
                 personal_token: str | None = None, access_ttl: float = 300.0) -> None:
        self.directory = Path(directory)
        self.legacy_token = legacy_token
        self.personal_token = personal_token
        self.access_ttl = access_ttl
        self.issued: list[str] = []
        self.predictions: list[dict] = []
        self.projects: dict[int, dict] = {}  # GET /api/projects/<id>/
        self.tasks: list[dict] = []  # GET /api/tasks/?project=&page=&page_size= (Label Studio's paging)
        self.requests: list[tuple[str, str, dict]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> "ImageHost":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def authorized(self, header: str | None) -> bool:
        if header == f"Token {self.legacy_token}":
            return True
        return header is not None and header.startswith("Bearer ") and header[7:] in self.issued

    def _handler(self):
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

            def do_POST(self):
                host.requests.append(("POST", self.path, dict(self.headers)))
                length = int(self.headers.get("Content-Length", 0))
                data = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/api/token/refresh/" and data.get("refresh") == host.personal_token:
                    access = make_jwt({"token_type": "access", "exp": time.time() + host.access_ttl,
                                       "n": len(host.issued)})
                    host.issued.append(access)
                    return self._send(200, json.dumps({"access": access}).encode(), "application/json")
                if self.path == "/api/predictions/" and host.authorized(self.headers.get("Authorization")):
                    host.predictions.append(data)
                    return self._send(201, json.dumps({"id": len(host.predictions), **data}).encode(),
                                      "application/json")
                return self._send(401, b'{"detail": "bad token"}', "application/json")

            def do_GET(self):
                host.requests.append(("GET", self.path, dict(self.headers)))
                path = self.path.split("?")[0]
                if path == "/slow":
                    time.sleep(2)
                    return self._send(200, b"late", "image/jpeg")
                if path == "/text":
                    return self._send(200, b"<html>login</html>", "text/html; charset=utf-8")
                if path == "/big":
                    return self._send(200, b"\0" * 200_000, "image/jpeg")
                if path == "/redirect" or path.startswith("/data/upload/redirect"):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("to=", 1)[1] if "to=" in self.path else "/")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                query = parse_qs(self.path.split("?", 1)[1]) if "?" in self.path else {}
                if path == "/api/predictions/" and host.authorized(self.headers.get("Authorization")):
                    task = int(query.get("task", ["-1"])[0])
                    found = [p for p in host.predictions if p.get("task") == task]
                    return self._send(200, json.dumps(found).encode(), "application/json")
                if path.startswith("/api/") and not host.authorized(self.headers.get("Authorization")):
                    return self._send(401, b'{"detail": "no token"}', "application/json")
                project = re.fullmatch(r"/api/projects/(\d+)/", path)
                if project and int(project.group(1)) in host.projects:
                    return self._send(200, json.dumps(host.projects[int(project.group(1))]).encode(),
                                      "application/json")
                if path == "/api/tasks/":
                    page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["30"])[0])
                    mine = [t for t in host.tasks if t.get("project") == int(query.get("project", ["0"])[0])]
                    if (page - 1) * size >= len(mine) and page > 1:
                        return self._send(404, b'{"detail": "Invalid page."}', "application/json")
                    body = {"tasks": mine[(page - 1) * size: page * size], "total": len(mine)}
                    return self._send(200, json.dumps(body).encode(), "application/json")
                if re.fullmatch(r"/tasks/\d+/presign/", path):
                    if not host.authorized(self.headers.get("Authorization")):
                        return self._send(401, b'{"detail": "no token"}', "application/json")
                    uri = base64.urlsafe_b64decode(query.get("fileuri", [""])[0]).decode()
                    if not uri.startswith("s3://photos/"):
                        return self._send(404, b"", "application/json")
                    self.send_response(303)
                    self.send_header("Location", f"{host.url}/files/{uri[len('s3://photos/'):]}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if path == "/trickle":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", "300")
                    self.end_headers()
                    try:
                        for _ in range(300):
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                            time.sleep(0.2)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return None
                if path.startswith("/data/upload/"):
                    if not host.authorized(self.headers.get("Authorization")):
                        return self._send(401, b'{"detail": "Authentication credentials were not provided."}',
                                          "application/json")
                    name = path[len("/data/upload/"):]
                elif path.startswith("/files/"):
                    name = path[len("/files/"):]
                else:
                    return self._send(404, b"not found", "text/plain")
                file = host.directory / name
                if "/" in name or not file.is_file():
                    return self._send(404, b"not found", "text/plain")
                kind = "image/png" if name.endswith(".png") else "image/jpeg"
                return self._send(200, file.read_bytes(), kind)

        return Handler
