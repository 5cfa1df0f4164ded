"""Reading containers of the real engine from a test: state, logs, files; waits with deadlines that
fail with the container's log tail."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import time

from tests.docker.images import docker

POLL_S = 0.5


def inspect(container: str) -> dict:
    return json.loads(docker("inspect", container).stdout)[0]


def logs(container: str) -> str:
    p = docker("logs", container, timeout_s=30)
    return p.stdout + p.stderr  # the container's stdout and stderr, in that order (enough for searching)


def log_lines(container: str) -> list[str]:
    """Every log line, stdout and stderr interleaved by time (docker logs -t sorts them)."""
    p = docker("logs", "-t", container, timeout_s=30)
    stamped = sorted((p.stdout + p.stderr).splitlines())
    return [line.split(" ", 1)[1] if " " in line else "" for line in stamped]


def tail(container: str, num_lines: int = 40) -> str:
    return "\n".join(log_lines(container)[-num_lines:])


def wait_until(container: str, what: str, predicate, timeout_s: float):
    """Polls predicate(inspect(container)) until it returns a true value, which is returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = predicate(inspect(container))
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{container}: not {what} after {timeout_s} s; state "
                                 f"{inspect(container)['State']}\n{tail(container)}")
        time.sleep(POLL_S)


def wait_exited(container: str, timeout_s: float) -> dict:
    """The container's State once it has exited and no restart is pending."""
    return wait_until(container, "exited", lambda c: c["State"] if c["State"]["Status"] == "exited" else None,
                      timeout_s)


def read_file(container: str, path: str) -> tuple[bytes, tarfile.TarInfo]:
    """A file of a container, running or stopped (docker cp), with its owner and mode."""
    p = docker("cp", f"{container}:{path}", "-", text=False, timeout_s=60)
    with tarfile.open(fileobj=io.BytesIO(p.stdout)) as tar:
        member = tar.getmembers()[0]
        return tar.extractfile(member).read(), member  # type: ignore[union-attr]


def metrics(container: str, path: str = "/data/metrics.jsonl") -> list[dict]:
    data, _ = read_file(container, path)
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def free_port_block(first: int = 310, last: int = 327, size: int = 40) -> int:
    """A prefix p such that ports p*100 .. p*100+size-1 are all free on this machine (docker/compose.yaml's
    SWARM_PORTS; below Linux's ephemeral range, so no port-0 socket of another test takes them)."""
    for prefix in range(first, last + 1):
        socks = []
        try:
            for port in range(prefix * 100, prefix * 100 + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", port))
            return prefix
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no block of {size} free ports from {first}00 to {last}99")
