"""`finetune dashboard EXP`: one web page for an experiment, live while it trains and afterwards.

Starlette on uvicorn. The page and its script ship with the package (no CDN: it works offline).
Every mutating request needs `Authorization: Bearer TOKEN` (401 without it, 403 with another);
bound to anything but loopback, reads need the token too. The page takes the token from its
URL (`?token=...`) and sends it with each request.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from pathlib import Path
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from finetune.dashboard import views

STATIC = Path(__file__).resolve().parent / "static"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def token_check(token: str, reads_need_token: bool) -> Callable[[Request], Response | None]:
    def check(request: Request) -> Response | None:
        mutating = request.method not in ("GET", "HEAD")
        if not mutating and not reads_need_token:
            return None
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else request.query_params.get("token")
        if not given or (mutating and not header.startswith("Bearer ")):
            return JSONResponse({"error": "this request needs Authorization: Bearer TOKEN (the token is in the page's URL)"}, 401)
        if not hmac.compare_digest(given, token):
            return JSONResponse({"error": "wrong token"}, 403)
        return None

    return check


def create_app(root: Path, token: str, reads_need_token: bool = False) -> Starlette:
    check = token_check(token, reads_need_token)

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            refused = check(request)
            return refused if refused is not None else await handler(request)

        return endpoint

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def runs(request: Request) -> Response:
        return JSONResponse(views.runs_view(root))

    async def curves(request: Request) -> Response:
        return JSONResponse(views.curves_view(root))

    async def events(request: Request) -> Response:
        return JSONResponse(views.events_view(root))

    async def run_config(request: Request) -> Response:
        return _answer(lambda: views.run_config_view(root, request.path_params["run_id"]))

    async def control(request: Request) -> Response:
        run_id, action = request.path_params["run_id"], request.path_params["action"]
        return _answer(lambda: views.request_control(root, action, run_id), 202)

    async def clone(request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body.get("set", {}), dict):
            return JSONResponse({"problems": [{"path": "set", "message": "set must map config keys to values"}]}, 422)
        run_id = request.path_params["run_id"]
        return _answer(lambda: views.request_clone(root, run_id, body.get("set", {}), bool(body.get("warm_start"))), 202)

    routes = [
        Route("/", guarded(page)),
        Route("/api/runs", guarded(runs)),
        Route("/api/curves", guarded(curves)),
        Route("/api/events", guarded(events)),
        Route("/api/runs/{run_id}/config", guarded(run_config)),
        Route("/api/runs/{run_id}/clone", guarded(clone), methods=["POST"]),
        Route("/api/runs/{run_id}/{action}", guarded(control), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    return Starlette(routes=routes)


def _answer(produce: Callable[[], Any], status: int = 200) -> Response:
    try:
        return JSONResponse(produce(), status)
    except KeyError as missing:
        return JSONResponse({"error": f"no run {missing.args[0]}"}, 404)
    except views.RequestRejected as rejected:
        return JSONResponse({"problems": [{"path": path, "message": message} for path, message in rejected.problems]}, 422)


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def serve(root: Path, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Serve until interrupted; `announce` gets the URL (with its token) once the port is known."""
    import socket

    import uvicorn

    token = secrets.token_urlsafe(24)
    app = create_app(root, token, reads_need_token=not is_loopback(host))
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections wait in the backlog from now on, not refused while uvicorn starts
    shown_host = f"[{host}]" if ":" in host else host
    announce(f"http://{shown_host}:{sock.getsockname()[1]}/?token={token}")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
