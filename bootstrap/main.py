"""The `bootstrap` console script: a long-lived DHT node with a stable address that new peers join through.
Holds no model and no authority; prints its join addresses on stdout and logs how many peers it sees."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError

from peer import argtypes
from peer.dht import DHTStartError, count_dht_peers, create_dht, join_addresses, parse_maddr
from peer.identity import Identity
from peer.logs import setup_logging

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2 (configuration)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _maddr_type(**requirements: bool):
    def parse(value: str) -> str:
        try:
            return str(parse_maddr(value, **requirements))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _identity_path(value: str) -> str:
    if not os.path.isdir(os.path.dirname(os.path.abspath(value))):
        raise argparse.ArgumentTypeError(f"{value!r}: its directory does not exist (the key file is created there)")
    return value


def _join_file(value: str) -> str:
    if os.path.isdir(value) or not os.path.isdir(os.path.dirname(os.path.abspath(value))):
        raise argparse.ArgumentTypeError(f"{value!r}: expected a file path in a directory that exists")
    return value


def write_join_file(path: str, addresses: Sequence[str]) -> None:
    """All of `addresses` at `path`, one a line, or nothing at all: readers never see half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(f"{address}\n" for address in addresses))
    os.replace(tmp, path)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="bootstrap", description=__doc__.splitlines()[0])
    parser.add_argument("--host-maddrs", nargs="+", type=_maddr_type(), default=["/ip4/0.0.0.0/tcp/31337"],
                        help="multiaddrs to listen on (default: /ip4/0.0.0.0/tcp/31337)")
    parser.add_argument("--announce-maddrs", nargs="+", type=_maddr_type(need_port=True), default=None,
                        help="the public multiaddrs to announce, e.g. /ip4/203.0.113.1/tcp/31337 behind NAT")
    parser.add_argument("--identity-path", type=_identity_path, default=None,
                        help="private key file (created if missing): the same peer id after a restart")
    parser.add_argument("--join-file", type=_join_file, default=None,
                        help="write the Join through: multiaddrs here, one a line, atomically once the node is "
                             "up (peers read it with --initial-peers-file)")
    parser.add_argument("--initial-peers", nargs="*", type=_maddr_type(need_peer_id=True), default=[],
                        help="full multiaddrs (.../p2p/<id>) of other bootstrap nodes to join")
    parser.add_argument("--refresh-period-s", type=argtypes.seconds(), default=5.0,
                        help="seconds between two log lines with the number of peers seen (default: 5)")
    parser.add_argument("--startup-timeout-s", type=argtypes.seconds(), default=30.0,
                        help="give up joining the initial peers after this many seconds (default: 30)")
    parser.add_argument("--http-port", type=argtypes.port, default=argtypes.port(os.environ.get("DILOCO_HTTP_PORT", "0")),
                        help="serve /status (JSON) and the swarm page on this port (0 = off; env DILOCO_HTTP_PORT)")
    parser.add_argument("--run-id", type=argtypes.run_id, default=os.environ.get("DILOCO_RUN_ID", "diloco"),
                        help="the run the swarm page shows unless its URL says ?run=ID (default: diloco, as peers; "
                             "env DILOCO_RUN_ID)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def _serve(args: argparse.Namespace) -> int:
    if args.join_file and os.path.exists(args.join_file):
        os.remove(args.join_file)  # an old node's addresses: peers wait for ours instead
    # the same record validators as every peer (peer.records), so that it refuses forged records too;
    # its key signs nothing (the bootstrap writes no record) but names it: --identity-path keeps its id
    identity = Identity.load_or_create(args.identity_path) if args.identity_path else Identity.generate()
    dht = create_dht(initial_peers=args.initial_peers, host_maddrs=args.host_maddrs,
                     announce_maddrs=args.announce_maddrs, identity=identity,
                     startup_timeout_s=args.startup_timeout_s)
    stop = threading.Event()

    def on_signal(signal_number: int, _frame: object) -> None:
        logger.info("caught %s, shutting down", signal.Signals(signal_number).name)
        stop.set()

    # the DHT process ignores both (a signal to the whole group reaches it too): dht.shutdown stops it
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    web = None
    try:
        addresses = join_addresses(dht, initial_peers=args.initial_peers)
        for address in addresses:
            print(f"Join through: {address}", flush=True)
        status = {"role": "bootstrap", "peer_id": dht.peer_id.to_base58(), "join": addresses, "dht_peers": 0,
                  "started": time.time()}
        if args.join_file:
            write_join_file(args.join_file, addresses)
            logger.info("wrote %d join address(es) to %s", len(addresses), args.join_file)
        if args.http_port:
            web = _start_web(dht, status, args.http_port, args.run_id)
        while not stop.is_set():
            try:
                num_peers = count_dht_peers(dht, timeout_s=min(args.refresh_period_s, 5.0), refresh=True)
                status = {**status, "dht_peers": num_peers}   # replaced whole: the web loop reads it
                if web is not None:
                    web.status = status
                logger.info("%d other DHT peers in the routing table", num_peers)
            except FutureTimeoutError:
                logger.warning("the DHT process did not report its peer count within the refresh period")
            stop.wait(args.refresh_period_s)
    finally:
        if web is not None:
            web.stop()
        dht.shutdown()
        logger.info("DHT node shut down")
    return 0


class _Web:
    """The bootstrap's HTTP server on a loop thread of its own (the node has no other loop).
    The main thread replaces `status` whole; handlers on the loop only read it."""

    def __init__(self, dht, status: dict, run_id: str):
        from peer import swarmview
        from peer.net.loop import NetLoop
        from peer.web import WebServer

        self.dht, self.status = dht, status
        self.loop = NetLoop("web")
        self.server = WebServer()

        async def get_status(_request):
            return {**self.status, "uptime_s": time.time() - self.status["started"]}

        self.server.add_json("/status", get_status)
        swarmview.add_routes(self.server, dht, run_id)   # the swarm page: DHT reads on this loop

    def start(self, port: int) -> None:
        self.loop.start()
        self.loop.call(self.server.start("0.0.0.0", port), 10)

    def stop(self) -> None:
        try:
            self.loop.call(self.server.stop(), 5)
        except Exception as e:  # stopping anyway
            logger.warning("stopping the HTTP server: %s", e)
        self.loop.stop()


def _start_web(dht, status: dict, port: int, run_id: str) -> _Web:
    web = _Web(dht, status, run_id)
    try:
        web.start(port)
    except OSError as e:
        web.loop.stop()
        raise ValueError(f"--http-port {port}: cannot listen on it ({e.strerror or e}); pick a free port") from None
    return web


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bootstrap node until SIGINT/SIGTERM. Exit status: 0 stopped, 1 crashed, 2 bad flag."""
    args = _parse_args(argv)
    setup_logging(args.log_level)
    try:
        return _serve(args)
    except ValueError as e:  # flags that parse but do not fit together, e.g. a missing identity directory
        logger.error("configuration error: %s", e)
        return 2
    except DHTStartError as e:
        logger.error("%s", e)
        return 1
    except KeyboardInterrupt:  # SIGINT before the handlers were installed, i.e. during startup
        logger.info("interrupted during startup")
        return 0
    except Exception:
        logger.exception("bootstrap crashed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
