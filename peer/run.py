"""The peer process from start to exit: DHT first (it forks), then the network node, the run
spec, and the trainer; signals and failures become exit statuses, children are stopped."""

from __future__ import annotations

import logging
import signal
import sys

from peer.config import (
    EXIT_CONFIG,
    EXIT_CRASH,
    EXIT_INCOMPATIBLE,
    EXIT_OK,
    ConfigError,
    IncompatibleRunError,
    PeerConfig,
)
from peer.logs import setup_logging

log = logging.getLogger(__name__)


class Interrupted(BaseException):
    """SIGINT or SIGTERM: leave the swarm and exit 0."""


class StopRequest:
    """Set by SIGINT/SIGTERM. The signal interrupts a network wait at once; inside a critical
    section (an inner step: the optimizer state a checkpoint keeps) it is raised when the
    section ends. A round's next state is decided on the network loop, never half-way."""

    requested = ""
    critical = 0

    @classmethod
    def check(cls) -> None:
        if cls.requested and not cls.critical:
            raise Interrupted(cls.requested)


def _on_signal(signum, frame):  # noqa: ARG001
    StopRequest.requested = signal.Signals(signum).name
    StopRequest.check()


def run(cfg: PeerConfig, explicit: set[str]) -> int:
    setup_logging(cfg.log_level)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    from peer.dht import DHTStartError, create_dht, join_addresses

    dht = node = trainer = None
    try:
        try:  # hivemind forks its DHT process: before any thread, gRPC object or CUDA context
            dht = create_dht(initial_peers=list(cfg.initial_peers), host_maddrs=list(cfg.dht_host_maddrs),
                             announce_maddrs=list(cfg.dht_announce_maddrs) or None, client_mode=cfg.client_mode)
        except ValueError as e:
            log.error("bad address: %s", e)
            return EXIT_CONFIG
        except DHTStartError as e:
            log.error("%s", e)
            return EXIT_CRASH
        from peer.net.node import CannotKeepUp, Node
        from peer.trainer import Trainer

        node = Node(cfg, dht)
        node.start()
        try:
            spec = node.resolve_spec(cfg.spec, explicit)
        except ConfigError as e:
            log.error("%s", e)
            return EXIT_CONFIG
        except IncompatibleRunError as e:
            log.error("%s", e)
            return EXIT_INCOMPATIBLE
        for addr in join_addresses(dht):
            print(f"Join through: {addr}", flush=True)
        trainer = Trainer(cfg, spec, node, StopRequest)
        try:
            return trainer.run()
        except CannotKeepUp as e:
            log.error("%s", e)
            return EXIT_INCOMPATIBLE
    except Interrupted as e:
        log.info("%s received: leaving the swarm", e)
        if node is not None:
            node.drain(timeout_s=node.core.transfer_timeout_s())
        if trainer is not None:
            trainer.save_checkpoint("on exit")
        return EXIT_OK
    except RuntimeError as e:
        log.error("%s", e)
        return EXIT_CRASH
    except Exception:
        log.exception("peer crashed")
        return EXIT_CRASH
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if node is not None:
            node.stop()
        if dht is not None:
            dht.shutdown()
        logging.shutdown()
        sys.stdout.flush()

