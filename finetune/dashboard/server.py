"""`finetune dashboard EXP`: one web page for an experiment, live while it trains and afterwards.

Starlette on uvicorn. The page and its script ship with the package (no CDN: it works offline).
Every mutating request needs `Authorization: Bearer TOKEN` (401 without it, 403 with another);
bound to anything but loopback, reads need the token too. The page takes the token from its
URL (`?token=...`) and sends it with each request. On loopback, where reads need no token, only
requests for a loopback name are answered (421 otherwise): a page of another site whose name
resolves to 127.0.0.1 (DNS rebinding) reads nothing.

Bad input is answered 400, 404, 413 or 422 with a message, never 500; a damaged experiment
file 503 with the one line that says which and what to do.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import re
import secrets
import sqlite3
from pathlib import Path
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from finetune.dashboard import views
from finetune.schedule.store import ExperimentDamaged

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 64 * 1024  # a clone request is a few hundred bytes
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
EXAMPLE_BODY = '{"set": {"training_args.learning_rate": "2e-4"}, "warm_start": false}'
JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
HOST_HEADER = re.compile(r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[^:\[\]/@\s]+))(?::[0-9]{1,5})?", re.ASCII)


class Refused(Exception):
    """A request answered with `status` and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class FiniteJSON(JSONResponse):
    """JSON without NaN or infinities (JavaScript cannot parse them): a diverged loss is null."""

    def render(self, content: Any) -> bytes:
        return super().render(_finite(content))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def host_names(host: str) -> frozenset[str] | None:
    """The names a Host header may give for a server bound to `host`. Off loopback every request
    needs the token, and the machine may be reached by any of its names: None, not checked."""
    return LOOPBACK_NAMES | {host.lower()} if is_loopback(host) else None


def host_name(header: str) -> str | None:
    """The name of a Host header (`name`, `name:port`, `[v6]:port`) in lower case; None if malformed."""
    match = HOST_HEADER.fullmatch(header.strip().lower())
    return None if match is None else match["v6"] or match["name"]


class Guard:
    """Before any route: the Host check, and bodies declared larger than `MAX_BODY` (413)."""

    def __init__(self, app: ASGIApp, names: frozenset[str] | None) -> None:
        self.app = app
        self.names = names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = self.refusal(Headers(scope=scope)) if scope["type"] == "http" else None
        if refused is not None:
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, headers: Headers) -> Response | None:
        host = headers.get("host", "")
        if self.names is not None and host_name(host) not in self.names:
            served = ", ".join(sorted(self.names))
            return error(421, f"this dashboard answers requests for {served}, not {host or 'no host'!r}: "
                              "open the address that `finetune dashboard` printed")
        try:
            declared = int(headers.get("content-length", "0"))
        except ValueError:
            return error(400, "Content-Length is not a number")
        return error(413, f"the body is larger than {MAX_BODY} bytes") if declared > MAX_BODY else None


def token_check(token: str, reads_need_token: bool) -> Callable[[Request], Response | None]:
    expected = token.encode()

    def check(request: Request) -> Response | None:
        mutating = request.method not in ("GET", "HEAD")
        if not mutating and not reads_need_token:
            return None
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else request.query_params.get("token")
        if not given or (mutating and not header.startswith("Bearer ")):
            return error(401, "this request needs Authorization: Bearer TOKEN (the token is in the page's URL)")
        if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected):
            return error(403, "wrong token")
        return None

    return check


def create_app(root: Path, token: str, host: str) -> Starlette:
    """The app for a server bound to `host`: it decides which Host names are answered and whether
    reads need the token."""
    check = token_check(token, reads_need_token=not is_loopback(host))

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            refused = check(request)
            return refused if refused is not None else await handler(request)

        return endpoint

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def runs(request: Request) -> Response:
        return await _answer(lambda: views.runs_view(root))

    async def curves(request: Request) -> Response:
        return await _answer(lambda: views.curves_view(root))

    async def events(request: Request) -> Response:
        return await _answer(lambda: views.events_view(root))

    async def run_page(request: Request) -> Response:
        return FileResponse(STATIC / "run.html")

    async def run_detail(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        return await _answer(lambda: views.run_view(root, run_id), run_id)

    async def run_config(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        return await _answer(lambda: views.run_config_view(root, run_id), run_id)

    async def samples(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        return await _answer(lambda: views.samples_view(root, run_id), run_id)

    async def control(request: Request) -> Response:
        run_id, action = request.path_params["run_id"], request.path_params["action"]
        return await _answer(lambda: views.request_control(root, action, run_id), run_id, 202)

    async def clone(request: Request) -> Response:
        body = await _json_object(request)
        run_id = request.path_params["run_id"]
        return await _answer(lambda: views.request_clone(root, run_id, body), run_id, 202)

    routes = [
        Route("/", guarded(page)),
        Route("/run/{run_id}", guarded(run_page)),
        Route("/api/runs/{run_id}", guarded(run_detail)),
        Route("/api/runs", guarded(runs)),
        Route("/api/curves", guarded(curves)),
        Route("/api/events", guarded(events)),
        Route("/api/runs/{run_id}/config", guarded(run_config)),
        Route("/api/runs/{run_id}/samples", guarded(samples)),
        Route("/api/runs/{run_id}/clone", guarded(clone), methods=["POST"]),
        Route("/api/runs/{run_id}/{action}", guarded(control), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    handlers = {Refused: _refused, ExperimentDamaged: _damaged, sqlite3.DatabaseError: _damaged}
    return Starlette(routes=routes, middleware=[Middleware(Guard, names=host_names(host))], exception_handlers=handlers)


async def _answer(produce: Callable[[], Any], run_id: str | None = None, status: int = 200) -> Response:
    """Run a view off the event loop (it reads SQLite); an unknown run is 404, a rejected request 422."""
    try:
        return FiniteJSON(await run_in_threadpool(produce), status)
    except KeyError as missing:
        if run_id is None or missing.args != (run_id,):
            raise
        return error(404, f"no run {run_id}")
    except views.RequestRejected as rejected:
        return JSONResponse({"problems": [{"path": path, "message": message} for path, message in rejected.problems]}, 422)


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return error(exc.status, str(exc))


async def _damaged(request: Request, exc: Exception) -> Response:
    if isinstance(exc, sqlite3.DatabaseError):
        what = "cannot be used" if isinstance(exc, sqlite3.OperationalError) else "is damaged"
        return error(503, f"the experiment's state store (state.db) {what}: {exc}")
    return error(503, str(exc))


async def _json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object (400 if it is not one, 413 past `MAX_BODY`)."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise Refused(413, f"the body is larger than {MAX_BODY} bytes")
    try:
        body = json.loads(bytes(raw))
    except RecursionError:
        raise Refused(400, "the body is nested too deeply") from None
    except ValueError as invalid:
        raise Refused(400, f"the body is not JSON ({invalid}); send an object like {EXAMPLE_BODY}") from None
    if not isinstance(body, dict):
        raise Refused(400, f"the body is a JSON {JSON_TYPES.get(type(body), 'value')}, not an object like {EXAMPLE_BODY}")
    return body


class CannotServe(OSError):
    """The address cannot be served (the port is taken, the host is unknown); the message says what to do."""


def listening_socket(host: str, port: int) -> Any:
    """A socket bound to (host, port) and listening; a port in use or an unknown host is `CannotServe`."""
    import errno
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog from now on, not refused while uvicorn starts
    except OSError as problem:
        sock.close()
        if problem.errno == errno.EADDRINUSE:
            raise CannotServe(f"port {port} on {host} is in use (another dashboard?): pass --port with another "
                              "number, or --port 0 for a free one") from None
        reason = problem.strerror or str(problem)
        raise CannotServe(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def serve(root: Path, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Serve until interrupted; `announce` gets the URL (with its token) once the port is known."""
    import uvicorn

    token = secrets.token_urlsafe(24)
    app = create_app(root, token, host)
    sock = listening_socket(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    announce(f"http://{shown_host}:{sock.getsockname()[1]}/?token={token}")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
