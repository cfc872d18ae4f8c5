"""Test servers on 127.0.0.1: a static file server with HTTP range requests (Starlette StaticFiles) and a
STAC API over a static catalogue (stac-fastapi.static), each a uvicorn server on a thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import uvicorn


class CountingApp:
    """An ASGI wrapper that logs each request (method, path, Range header, body bytes sent) and can slow
    every request down (to kill a fetch mid-way)."""

    def __init__(self, app):
        self.app, self.log, self.delay = app, [], 0.0
        self.fail_once, self.failed = False, set()  # answer the first GET or POST of each path 503 (retries)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.delay:
            await asyncio.sleep(self.delay)
        byte_range = dict(scope["headers"]).get(b"range", b"").decode()
        if self.fail_once and scope["method"] != "HEAD" and scope["path"] not in self.failed:
            self.failed.add(scope["path"])
            await send({"type": "http.response.start", "status": 503, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            self.log.append((scope["method"], scope["path"], byte_range, 0, 503))
            return
        sent, status = 0, None

        async def counting_send(message):
            nonlocal sent, status
            if message["type"] == "http.response.start":
                status = message["status"]
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, counting_send)
        self.log.append((scope["method"], scope["path"], byte_range, sent, status))

    def bytes_for(self, prefix: str = "") -> int:
        return sum(entry[3] for entry in self.log if entry[1].startswith(prefix))


class Server:
    """A uvicorn server on a free port of 127.0.0.1, on a daemon thread."""

    def __init__(self, app):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


def file_server(directory: Path) -> tuple[Server, CountingApp]:
    """Files of a directory under /files/, with HTTP range requests (GDAL /vsicurl/ needs them)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    app = CountingApp(Starlette(routes=[Mount("/files", app=StaticFiles(directory=str(directory)))]))
    return Server(app), app


def stac_server(catalog_json: Path) -> tuple[Server, CountingApp]:
    """stac-fastapi.static serving a static catalogue as a STAC API (item search: bbox, datetime, CQL2)."""
    from stac_fastapi.static.api import Settings, make_api

    settings = Settings(catalog_href=Path(catalog_json).resolve().as_uri(), reload=False, log_level="warning",
                        environment="production")
    app = CountingApp(make_api(settings).app)
    return Server(app), app


def garbage_server() -> Server:
    """A server that answers every request with an HTML page (a catalogue that answers garbage)."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    async def page(request):
        return HTMLResponse("<html><body>Maintenance</body></html>")

    return Server(Starlette(routes=[Route("/{path:path}", page)]))
