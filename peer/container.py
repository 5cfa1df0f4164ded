"""The container's entrypoint (docker/Dockerfile): runs `peer` or `bootstrap` as its child, forwards
SIGTERM/SIGINT to it, reaps orphans when it is PID 1, and, with DILOCO_RESTART_SAFE=1, turns the
exit statuses a restart cannot fix (2, 3, 4) into 0 so that `restart: on-failure` does not loop on
a bad flag. Crashes (1) and deaths by a signal stay nonzero. Imports nothing heavy; never trains."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Mapping

from peer.config import EXIT_AUTH, EXIT_CONFIG, EXIT_INCOMPATIBLE
from peer.logs import LOG_FORMAT

log = logging.getLogger("peer.container")

RESTART_SAFE_ENV = "DILOCO_RESTART_SAFE"
FORWARDED = (signal.SIGTERM, signal.SIGINT)

# statuses a restart cannot fix: (what they mean, what to do)
FINAL: dict[int, tuple[str, str]] = {
    EXIT_CONFIG: ("configuration error", "fix the flag above and start the container again"),
    EXIT_AUTH: ("authentication failed", "fix the run's credentials above and start the container again"),
    EXIT_INCOMPATIBLE: ("incompatible run", "the line above says why (another protocol version, or a link "
                                            "too slow for the run); fix that and start the container again"),
}


def container_status(returncode: int, restart_safe: bool) -> int:
    """The container's exit status for a child that ended with `returncode` (negative: killed by
    that signal, as in subprocess). A signal gives 128 + its number, as a shell does."""
    if returncode < 0:
        return 128 - returncode
    if restart_safe and returncode in FINAL:
        return 0
    return returncode


def final_line(name: str, returncode: int, restart_safe: bool) -> str:
    """The last line the container logs about its child's end ("" for a clean exit)."""
    if returncode < 0:
        return (f"{name} was killed by {signal.Signals(-returncode).name}: container exit "
                f"{container_status(returncode, restart_safe)}, a restart policy restarts it")
    if returncode in FINAL:
        meaning, fix = FINAL[returncode]
        if restart_safe:
            return f"{name} exited with status {returncode} ({meaning}): not restarting; {fix}"
        return f"{name} exited with status {returncode} ({meaning}); {RESTART_SAFE_ENV}=0: container exit " \
               f"{returncode}, so a restart policy restarts it"
    if returncode:
        return f"{name} exited with status {returncode} (crash): a restart policy restarts it"
    return ""


def _restart_safe(env: Mapping[str, str]) -> bool:
    raw = env.get(RESTART_SAFE_ENV, "1")
    if raw not in ("0", "1"):
        raise ValueError(f"{RESTART_SAFE_ENV}: {raw!r} is not valid; expected 1 (statuses 2, 3 and 4 exit 0) "
                         "or 0 (the child's status as it is)")
    return raw == "1"


class _Child:
    """The one child; a stop signal that arrives before it exists is passed on once it does."""

    pid = 0
    pending: list[int] = []

    @classmethod
    def forward(cls, signum: int, _frame: object) -> None:
        if cls.pid:
            try:
                os.kill(cls.pid, signum)
            except ProcessLookupError:  # it has just exited; waitpid reports it
                pass
        else:
            cls.pending.append(signum)


def _wait_for(pid: int) -> int:
    """Waits for `pid`, reaping any other process that ends meanwhile (orphans handed to PID 1)."""
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:  # nobody left to wait for: our child was reaped elsewhere
            return 1
        if done == pid:
            return os.waitstatus_to_exitcode(status)


def run(argv: list[str]) -> int:
    """Runs argv[0] with its arguments and returns the container's exit status."""
    try:
        restart_safe = _restart_safe(os.environ)
    except ValueError as e:
        log.error("%s: not starting %s; fix it and start the container again", e, argv[0] if argv else "anything")
        return 0
    if not argv:
        log.error("no command: give `peer ...` or `bootstrap ...` (see README, Docker)")
        return container_status(EXIT_CONFIG, restart_safe)
    name = os.path.basename(argv[0])
    for signum in FORWARDED:
        signal.signal(signum, _Child.forward)
    try:
        _Child.pid = os.posix_spawnp(argv[0], argv, os.environ)
    except OSError as e:
        log.error("cannot run %r: %s; the image's commands are peer and bootstrap", argv[0], e.strerror)
        return container_status(EXIT_CONFIG, restart_safe)
    for signum in _Child.pending:
        _Child.forward(signum, None)
    returncode = _wait_for(_Child.pid)
    if returncode:
        log.error("%s", final_line(name, returncode, restart_safe))
    return container_status(returncode, restart_safe)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    return run(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
