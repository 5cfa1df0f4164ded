"""The peer process from start to exit: DHT first (it forks), then the network node, the run
spec, and the trainer; signals and failures become exit statuses, children are stopped."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from peer.dht import ChildSafeDHT
    from peer.net.node import Node
    from peer.trainer import Trainer

log = logging.getLogger(__name__)


STOP_DEADLINE_S = 20.0  # from the start of stopping to the end of the process, whatever hangs


class Interrupted(BaseException):
    """SIGINT or SIGTERM: leave the swarm and exit 0."""


class StopRequest:
    """Set by SIGINT/SIGTERM. The signal interrupts a network wait at once; inside a critical
    section (an inner step, applying a round, a checkpoint) it is raised when the section ends.
    It is raised once: a signal while leaving (the same one sent to the whole process group,
    a second Ctrl-C) must not cut the goodbye short."""

    requested = ""
    critical = 0
    raised = False

    @classmethod
    def check(cls) -> None:
        if cls.requested and not cls.critical and not cls.raised:
            cls.raised = True
            raise Interrupted(cls.requested)


def _on_signal(signum, frame):  # noqa: ARG001
    if not StopRequest.requested:
        StopRequest.requested = signal.Signals(signum).name
    StopRequest.check()


def _exit_if_stuck(code: int, after_s: float) -> None:
    """The last resort: if stopping, or the interpreter's exit after it (joining threads, atexit
    handlers), still runs `after_s` from now, say so and end the process with `code` at once."""
    def _hard_exit() -> None:
        others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        log.error("stopping took more than %.0f s (threads still running: %s): exiting now", after_s,
                  ", ".join(others) or "none")
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(after_s, _hard_exit)
    timer.daemon = True
    timer.start()


class _Parts:
    """What `run` started, stopped in the reverse order; every step is bounded."""

    dht: ChildSafeDHT | None = None
    node: Node | None = None
    trainer: Trainer | None = None

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
        if self.dht is not None:
            self.dht.shutdown()
        stuck = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
        if stuck:
            log.warning("threads that will hold up the exit: %s", ", ".join(stuck))


def run(cfg: PeerConfig, explicit: set[str]) -> int:
    setup_logging(cfg.log_level)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    parts, code = _Parts(), EXIT_CRASH
    try:
        try:
            code = _start_and_train(cfg, explicit, parts)
        finally:
            StopRequest.raised = True  # from here on a signal changes nothing: we are leaving
    except Interrupted as e:
        log.info("%s received: leaving the swarm", e)
        if parts.node is not None:
            parts.node.drain(timeout_s=parts.node.core.transfer_timeout_s())
        if parts.trainer is not None:
            parts.trainer.save_checkpoint("on exit")
        code = EXIT_OK
    except RuntimeError as e:
        log.error("%s", e)
    except Exception:
        log.exception("peer crashed")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _exit_if_stuck(code, STOP_DEADLINE_S)
        parts.stop()
        logging.shutdown()
        sys.stdout.flush()
    return code


def _start_and_train(cfg: PeerConfig, explicit: set[str], parts: _Parts) -> int:
    from peer.dht import DHTStartError, create_dht, join_addresses

    try:  # hivemind forks its DHT process: before any thread, gRPC object or CUDA context
        parts.dht = dht = create_dht(
            initial_peers=list(cfg.initial_peers), host_maddrs=list(cfg.dht_host_maddrs),
            announce_maddrs=list(cfg.dht_announce_maddrs) or None, client_mode=cfg.client_mode)
    except ValueError as e:
        log.error("bad address: %s", e)
        return EXIT_CONFIG
    except DHTStartError as e:
        log.error("%s", e)
        return EXIT_CRASH
    from peer.net.node import Node
    from peer.trainer import Trainer

    parts.node = node = Node(cfg, dht)
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
    parts.trainer = Trainer(cfg, spec, node, StopRequest)
    return parts.trainer.run()
