"""``flower-superlink`` with its operator APIs answering the SuperLink's own machine only.

Since flwr 1.41 one HTTP(S) server on ``--host:--port`` serves three APIs: Fleet (``/v1/fleet``,
what SuperNodes dial), Control (``/v1/control``: register SuperNode keys, start and stop runs) and
Runtime (``/v1/runtime``: what the ServerApp process pulls and pushes messages through). Flower
has no separate address for Control any more (``--control-api-address`` is deprecated and only
moves an unused gRPC server), and account authentication for Control is an enterprise plugin.
So without this guard, any machine that can reach the Fleet port and holds the public ``ca.crt``
can ``flwr supernode register`` a key of its own and join, which defeats SuperNode auth.

``python -m fedge.superlink_guard <flower-superlink args>`` starts Flower's own SuperLink with one
ASGI middleware in front of everything: a request for any path but the Fleet API and ``/health``
is answered ``403`` unless its TCP peer is a loopback address. The operator registers keys and
submits runs on the SuperLink machine (or through an SSH tunnel to it, which also arrives from
loopback); SuperNodes elsewhere reach only the Fleet API, where node authentication applies.
``fedge deploy superlink --expose-control-api`` runs the plain ``flower-superlink`` instead.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

PUBLIC_PREFIXES = ("/v1/fleet/", "/health")  # SuperNodes' API and the liveness probe
REFUSAL = (
    "this SuperLink answers its Control and Runtime APIs on loopback only: register SuperNode "
    "keys and submit runs on the SuperLink machine (or through an SSH tunnel to it), or restart "
    "it with `fedge deploy superlink --expose-control-api` to open them to the network"
)


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on dual-stack sockets
    return (mapped or address).is_loopback


def is_public_path(path: str) -> bool:
    return any(path == p.rstrip("/") or path.startswith(p) for p in PUBLIC_PREFIXES)


class LoopbackOnlyOperatorApis:
    """ASGI middleware: non-loopback peers may reach the Fleet API and ``/health`` only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope.get("type") not in ("http", "websocket") or is_public_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        if is_loopback(client[0] if client else None):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": REFUSAL}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def install() -> None:
    """Put the guard outermost in Flower's SuperLink middleware stack (flwr 1.41/1.42:
    ``flwr.superlink.main._get_middleware``, read by ``create_app`` when the app is built)."""
    from flwr.superlink import main as superlink_main
    from starlette.middleware import Middleware

    flower_middleware = superlink_main._get_middleware
    if getattr(flower_middleware, "fedge_guard", False):
        return

    def guarded() -> list[Middleware]:
        return [Middleware(LoopbackOnlyOperatorApis), *flower_middleware()]

    guarded.fedge_guard = True  # type: ignore[attr-defined]
    superlink_main._get_middleware = guarded


def main(argv: list[str] | None = None) -> int | None:
    """Run ``flower-superlink`` (same arguments) with the guard installed."""
    from flwr.superlink.cli import flower_superlink

    # The legacy gRPC Control API would be a second, unguarded door: keep it closed.
    os.environ.pop("FLWR_INTERNAL_GRPC_CONTROL_API", None)
    install()
    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    return flower_superlink()


if __name__ == "__main__":
    sys.exit(main())
