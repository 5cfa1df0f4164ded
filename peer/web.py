"""The HTTP side of a peer or a bootstrap node (`--http-port`): `/status` (JSON) and whatever
else a caller registers (`/metrics`, the swarm page), served by aiohttp on an asyncio loop that
already runs: the network loop in a peer, a loop thread of its own in the bootstrap node.

Handlers run on that loop, so they read the loop's own state directly and never block it:
each one must return quickly (a DHT read goes through `swarm.read` under its deadline). It
listens where the gRPC server does (`--host`); nothing it serves changes the run."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)
HANDLER_TIMEOUT_S = 10.0   # a handler that takes longer answers 503 with the reason


def jsonable(value: Any) -> Any:
    """Plain JSON (NaN and infinities become null, which browsers and `jq` parse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class WebServer:
    """An aiohttp application with routes added before `start`, run on the current loop."""

    def __init__(self) -> None:
        self.app = web.Application()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def add_json(self, path: str, fn: Callable[[web.Request], Awaitable[Any]]) -> None:
        """GET `path` answers `await fn(request)` as JSON."""
        async def handler(request: web.Request) -> web.Response:
            body = await self._bounded(path, fn(request))
            if isinstance(body, web.Response):
                return body
            return web.Response(text=json.dumps(jsonable(body), allow_nan=False), content_type="application/json",
                                headers={"Cache-Control": "no-store"})
        self.app.router.add_get(path, handler)

    def add_text(self, path: str, fn: Callable[[web.Request], Awaitable[str]], content_type: str) -> None:
        """GET `path` answers `await fn(request)` with this content type (e.g. Prometheus text, HTML)."""
        async def handler(request: web.Request) -> web.Response:
            body = await self._bounded(path, fn(request))
            if isinstance(body, web.Response):
                return body
            return web.Response(body=body.encode(), headers={"Content-Type": content_type,
                                                             "Cache-Control": "no-store"})
        self.app.router.add_get(path, handler)

    async def _bounded(self, path: str, coro: Awaitable[Any]) -> Any:
        try:
            return await asyncio.wait_for(coro, HANDLER_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("HTTP %s did not answer within %.0f s", path, HANDLER_TIMEOUT_S)
            return web.Response(status=503, text=f"{path} did not answer within {HANDLER_TIMEOUT_S:.0f} s")

    async def start(self, host: str, port: int) -> int:
        """Listens on host:port (0 picks a free port); returns the port. A port in use raises OSError."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1] if sockets else port
        paths = dict.fromkeys(r.resource.canonical for r in self.app.router.routes() if r.resource is not None)
        log.info("HTTP server on http://%s:%d (%s)", host, self.port, ", ".join(paths))   # GET and HEAD: once
        return self.port

    async def stop(self, timeout_s: float = 3.0) -> None:
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        try:
            await asyncio.wait_for(runner.cleanup(), timeout_s)
        except (asyncio.TimeoutError, Exception) as e:  # leaving anyway
            log.warning("stopping the HTTP server: %s", str(e) or type(e).__name__)
