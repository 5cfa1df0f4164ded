"""The peer process from start to exit: DHT first (it forks), then the network node, the run
spec, and the trainer; signals and failures become exit statuses, children are stopped."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from peer.config import (
    EXIT_AUTH,
    EXIT_CONFIG,
    EXIT_CRASH,
    EXIT_INCOMPATIBLE,
    EXIT_OK,
    ConfigError,
    IncompatibleRunError,
    PeerConfig,
    read_initial_peers_file,
    validate_peer,
)
from peer.identity import KEY_FILE_NAME, Identity, IdentityError
from peer.logs import setup_logging
from peer.progress import wants_bar

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
    section (an inner step: the optimizer state a checkpoint keeps) it is raised when the section
    ends; a round's next state is decided on the network loop, never half-way. Once `run` is
    leaving (`leaving`), a signal (the group's, a second Ctrl-C) changes nothing."""

    requested = ""
    critical = 0
    leaving = False

    @classmethod
    def check(cls) -> None:
        if cls.requested and not cls.critical and not cls.leaving:
            raise Interrupted(cls.requested)


# An exception raised inside these would leave a lock held that other threads need: logging's (every
# log line, the network loop's too), tqdm's (log lines while a progress bar shows) or an import's;
# there the signal is tried again a little later.
_DEFER_INSIDE = ("logging", "tqdm", "importlib")
_RETRY_S = 0.05


def _on_signal(signum, frame):
    if not StopRequest.requested:
        StopRequest.requested = signal.Signals(signum).name
    while frame is not None:
        if frame.f_globals.get("__name__", "").split(".")[0] in _DEFER_INSIDE:
            retry = threading.Timer(_RETRY_S, signal.pthread_kill, (threading.main_thread().ident, signum))
            retry.daemon = True
            retry.start()
            return
        frame = frame.f_back
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
        started = time.monotonic()
        if self.node is not None:
            self.node.stop()
        if self.dht is not None:
            self.dht.shutdown()
            log.info("network side and DHT process stopped in %.1f s", time.monotonic() - started)
        stuck = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
        if stuck:
            log.warning("threads that will hold up the exit: %s", ", ".join(stuck))


def _catch_stop_signals() -> None:
    """Our handler for SIGTERM and SIGINT, with SA_RESTART: torch spins forever (holding the GIL) on
    a read() that a signal interrupts while it starts its torch_shm_manager (the first shared tensor,
    made by hivemind's DHT). Python's own waits still wake up at once: sem_timedwait, poll and
    nanosleep are never restarted."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)
        signal.siginterrupt(signum, False)


def run(cfg: PeerConfig, explicit: set[str]) -> int:
    _catch_stop_signals()  # first: a signal during the heavy imports below already means "exit 0"
    parts, code = _Parts(), EXIT_CRASH
    try:
        try:
            setup_logging(cfg.log_level, progress_bar=wants_bar(cfg.progress, cfg.log_level))
            code = _start_and_train(cfg, explicit, parts)
        finally:
            StopRequest.leaving = True  # from here on a signal changes nothing
    except Interrupted as e:
        log.info("%s received: leaving the swarm", e)
        if parts.node is not None:
            parts.node.drain()
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


def versions() -> str:
    """The versions a bug report needs, read from the installed packages (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "(not installed)"

    names = ("torch", "grpcio", "protobuf", "hivemind", "transformers", "datasets")
    return f"diloco-p2p peer {of('diloco-p2p')}; python {sys.version.split()[0]}, " + ", ".join(
        f"{n} {of(n)}" for n in names)


def with_initial_peers_file(cfg: PeerConfig) -> PeerConfig:
    """`cfg` with the multiaddrs of --initial-peers-file added to --initial-peers (waited for)."""
    if not os.path.exists(cfg.initial_peers_file):
        log.info("waiting up to %g s for --initial-peers-file %s", cfg.initial_peers_file_wait_s,
                 cfg.initial_peers_file)
    found = read_initial_peers_file(cfg.initial_peers_file, cfg.initial_peers_file_wait_s)
    log.info("initial peers from %s: %s", cfg.initial_peers_file, " ".join(found))
    cfg = dataclasses.replace(cfg, initial_peers=(*cfg.initial_peers, *found))
    validate_peer(cfg)  # the checks that depend on where the initial peers are (config._check_reach)
    return cfg


def load_identity(cfg: PeerConfig) -> Identity:
    """The key in --identity-file, else in <checkpoint-dir>/identity.key (made when missing), else a new
    key that lives as long as this process; its hash is this peer's id."""
    path = cfg.identity_file or (os.path.join(cfg.checkpoint_dir, KEY_FILE_NAME) if cfg.checkpoint_dir else "")
    if path and cfg.checkpoint_dir and not cfg.identity_file:
        os.makedirs(cfg.checkpoint_dir, exist_ok=True)
    if not path:
        identity = Identity.generate()
        log.info("peer id %s: a new key, not kept (--identity-file or --checkpoint-dir keeps one id across "
                 "restarts)", identity.peer_id)
        return identity
    existed = os.path.exists(path)
    identity = Identity.load_or_create(path)
    log.info("peer id %s: key file %s%s", identity.peer_id, path, "" if existed else " (new)")
    return identity


def _start_and_train(cfg: PeerConfig, explicit: set[str], parts: _Parts) -> int:
    from peer.dht import DHTStartError, DuplicateIdentity, create_dht, join_addresses
    from peer.hostmem import use_huge_pages

    log.info("%s", versions())
    log.debug("%s", use_huge_pages(cfg.huge_pages))
    if cfg.initial_peers_file:
        try:
            cfg = with_initial_peers_file(cfg)
        except ConfigError as e:
            log.error("%s", e)
            return EXIT_CONFIG
    try:
        identity = load_identity(cfg)
    except IdentityError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    try:  # hivemind forks its DHT process: before any thread, gRPC object or CUDA context
        parts.dht = dht = create_dht(
            initial_peers=list(cfg.initial_peers), host_maddrs=list(cfg.dht_host_maddrs),
            announce_maddrs=list(cfg.dht_announce_maddrs) or None, client_mode=cfg.client_mode, identity=identity)
    except ValueError as e:
        log.error("bad address: %s", e)
        return EXIT_CONFIG
    except DuplicateIdentity as e:
        log.error("%s", e)
        return EXIT_AUTH
    except DHTStartError as e:
        log.error("%s", e)
        return EXIT_CRASH
    from peer.net.auth import AuthRefused, derived_key
    from peer.net.node import CannotKeepUp, Node
    from peer.tasks import TaskError
    from peer.trainer import Trainer

    dht.member_key = derived_key(cfg.run_secret, "member")   # a private run's records (peer.records)
    parts.node = node = Node(cfg, dht, identity)
    try:
        node.start()
        spec = node.resolve_spec(cfg.spec, explicit)
    except (AuthRefused, DuplicateIdentity) as e:
        log.error("%s", e)
        return EXIT_AUTH
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    except IncompatibleRunError as e:
        log.error("%s", e)
        return EXIT_INCOMPATIBLE
    joins = [] if cfg.client_mode else join_addresses(dht, initial_peers=cfg.initial_peers)
    for addr in joins:  # nobody can join through a client-mode peer: it accepts no connections
        print(f"Join through: {addr}", flush=True)
    if not joins and not cfg.client_mode:
        log.warning("no Join through: address to print: the DHT listens on loopback only (%s) and the swarm is "
                    "elsewhere; use --dht-host-maddrs /ip4/0.0.0.0/tcp/PORT", " ".join(cfg.dht_host_maddrs))
    try:
        parts.trainer = Trainer(cfg, spec, node, StopRequest)
    except (ConfigError, ValueError) as e:  # a per-peer setting this machine cannot honour (--device, --data)
        log.error("%s", e)
        return EXIT_CONFIG
    try:
        return parts.trainer.run()
    except AuthRefused as e:   # another peer refused our run secret (peer.net.auth)
        log.error("%s", e)
        return EXIT_AUTH
    except CannotKeepUp as e:
        log.error("%s", e)
        return EXIT_INCOMPATIBLE
    except TaskError as e:  # bad data met while streaming: what is trained so far is kept
        log.error("%s", e)
        parts.trainer.save_checkpoint("before stopping on bad data")
        return EXIT_CONFIG
