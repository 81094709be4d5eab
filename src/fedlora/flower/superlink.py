"""``flower-superlink`` with the node-facing address limited to the Fleet API.

Flower 1.41's SuperLink serves its Fleet API (SuperNodes), its Control API (``flwr run``,
``flwr ls``, ``flwr supernode register``, ...) and its Runtime API (the ServerApp process) on
one ``--host:--port``, and in the open-source build the Control API asks for no credentials
(account authentication is OIDC, Flower Enterprise only). With ``--enable-supernode-auth`` anyone
who reaches that port can register a key of their own and bring a SuperNode online, or start a
run (an app of their choosing, executed by the SuperLink and every node).

This launcher runs the same SuperLink (Flower's own argument parsing, FastAPI app and lifespan)
on two sockets::

    python -m fedlora.flower.superlink --fleet-address 0.0.0.0:9092 \\
        --host 127.0.0.1 --port 9093 --ssl-... --enable-supernode-auth

* ``--host:--port``, the operator address: every API (Control for the operator's ``flwr``, the
  Runtime API for the ServerApp process). Bind it where only the operator reaches (loopback,
  or an operator-only interface).
* ``--fleet-address``, the node-facing address: ``/v1/fleet/*`` and ``/health`` only; any other
  request is refused with 403 before Flower sees it. SuperNodes connect here.

What it does not close: a SuperNode with a registered key is trusted by the SuperLink as Flower
makes it; the operator address must be kept from strangers (it is the whole SuperLink); it
relies on Flower 1.41's internals (``_parse_superlink_lifespan_config``, ``SuperLinkLifespan``,
``create_app``: the ``flwr==1.41.0`` pin).
"""

from __future__ import annotations

import argparse
import importlib
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from logging import INFO
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FLEET_PATHS = ("/v1/fleet/",)
OPEN_PATHS = ("/health",)
REFUSAL = b"fedlora: only the Fleet API is served on this address (the operator address serves the rest)\n"


def fleet_only_path(path: str) -> bool:
    """Whether ``path`` may be served on the node-facing address."""
    return path.startswith(FLEET_PATHS) or path in OPEN_PATHS


class FleetOnly:
    """ASGI middleware: requests that arrive on a socket whose local port is in ``fleet_ports``
    reach the app only for :func:`fleet_only_path` paths; others get 403 (HTTP) or a closed
    WebSocket. Requests on any other socket, and lifespan events, pass through."""

    def __init__(self, app: ASGIApp, fleet_ports: set[int]) -> None:
        self.app = app
        self.fleet_ports = set(fleet_ports)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            server = scope.get("server") or (None, None)
            if server[1] in self.fleet_ports and not fleet_only_path(scope.get("path", "")):
                if scope["type"] == "http":
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 403,
                            "headers": [
                                (b"content-type", b"text/plain"),
                                (b"content-length", str(len(REFUSAL)).encode()),
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": REFUSAL})
                else:
                    await receive()
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--fleet-address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="flower-superlink with the node-facing address limited to the Fleet API "
        "(all other arguments are flower-superlink's; --host/--port is the operator address)",
        add_help=False,
    )
    parser.add_argument("--fleet-address", required=True, help="HOST:PORT the SuperNodes connect to")
    ours, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    fleet_host, fleet_port = split_address(ours.fleet_address)

    import uvicorn
    from flwr.supercore import log
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    # the module, not the function flwr.superlink.cli exports under the same name
    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
    sys.argv = ["flower-superlink", *rest]  # Flower parses sys.argv itself
    config = fs._parse_superlink_lifespan_config()
    if fleet_port == config.port:
        raise SystemExit("--fleet-address needs a port other than --port (the operator address)")
    app = FleetOnly(create_app(config, fs.SuperLinkLifespan), {fleet_port})
    sockets = [_listen(config.host, config.port), _listen(fleet_host, fleet_port)]
    scheme = "https" if config.ssl_certfile else "http"
    log(
        INFO,
        "fedlora: SuperLink operator address %s://%s:%s (all APIs), node-facing address %s://%s:%s (Fleet API only)",
        scheme,
        config.host,
        config.port,
        scheme,
        fleet_host,
        fleet_port,
    )
    uvicorn.Server(
        uvicorn.Config(
            app=app,
            host=config.host,
            port=config.port,
            reload=False,
            access_log=True,
            log_config=get_uvicorn_log_config(console_handler.level),
            ssl_keyfile=config.ssl_keyfile,
            ssl_certfile=config.ssl_certfile,
            workers=1,
        )
    ).run(sockets=sockets)


if __name__ == "__main__":
    main()
