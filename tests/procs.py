"""Helpers for tests that run real processes: start with a log file, wait for a log line, find orphans.
Every wait here has a deadline and fails with the log tail or the survivors' command lines."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.05


def start_proc(
    args: list[str], env: dict[str, str] | None, log_path: str | os.PathLike, *, new_session: bool = False
) -> subprocess.Popen:
    """Start `args` in the repo root, stdout and stderr both into log_path (kept on the Popen as .log_path).

    env entries are added to (not substituted for) this process's environment. The child stays in our
    process group, so a Ctrl-C on the test run reaches it too; new_session=True gives it its own group
    (pgid == pid) for tests that signal a whole group, as a terminal's Ctrl-C does.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT,
                                start_new_session=new_session)
    proc.log_path = Path(log_path)  # type: ignore[attr-defined]
    return proc


def python_module(module: str, *args: str) -> list[str]:
    """argv for `python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def log_tail(path: str | os.PathLike, num_lines: int = 40) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(lines[-num_lines:])


def wait_for_line(path_or_popen: str | os.PathLike | subprocess.Popen, regex: str, timeout_s: float) -> re.Match:
    """Poll a log until `regex` matches a line (re.MULTILINE); raise with the log tail on timeout or exit."""
    proc = path_or_popen if isinstance(path_or_popen, subprocess.Popen) else None
    path = Path(proc.log_path if proc is not None else path_or_popen)  # type: ignore[attr-defined]
    pattern = re.compile(regex, re.MULTILINE)
    deadline = time.monotonic() + timeout_s
    while True:
        exited = proc is not None and proc.poll() is not None  # read the log *after* checking for an exit
        text = path.read_text(errors="replace") if path.exists() else ""
        match = pattern.search(text)
        if match:
            return match
        if exited:
            raise AssertionError(f"{path.name}: process exited ({proc.returncode}) before /{regex}/:\n{log_tail(path)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name}: no line matching /{regex}/ within {timeout_s} s:\n{log_tail(path)}")
        time.sleep(POLL_S)


def descendants(pid: int) -> list[psutil.Process]:
    """All living descendants of pid, captured now (capture them before a kill -9: they get reparented)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _as_processes(pids: Iterable[int | psutil.Process]) -> list[psutil.Process]:
    processes = []
    for pid in pids:
        if isinstance(pid, psutil.Process):
            processes.append(pid)
            continue
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return processes


def _is_gone(process: psutil.Process) -> bool:
    """Exited, a zombie, or its pid reused by a newer process (psutil compares start times)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def listening_ports(pids: Iterable[int | psutil.Process] | None = None) -> set[int]:
    """TCP/UDP ports in LISTEN state held by the given processes, or by anyone on this host if pids is None."""
    if pids is None:
        return {c.laddr.port for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    ports = set()
    for process in _as_processes(pids):
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        ports |= {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}
    return ports


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} ({process.status()}): {' '.join(process.cmdline())}"
    except psutil.Error:
        return f"{process.pid} (vanished)"


def assert_no_orphans(pids: Iterable[int | psutil.Process], timeout_s: float) -> None:
    """Wait until none of the processes exists (a zombie counts as gone); else name the survivors."""
    processes = _as_processes(pids)
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in processes if not _is_gone(p)]
        if not alive:
            return
        if time.monotonic() > deadline:
            survivors = "\n".join(_describe(p) for p in alive)
            raise AssertionError(f"{len(alive)} processes still alive {timeout_s} s later:\n{survivors}")
        time.sleep(POLL_S)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int:
    """Send sig and return the exit status; if the process outlives timeout_s, SIGKILL it and fail."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)
        tail = log_tail(proc.log_path) if hasattr(proc, "log_path") else ""
        raise AssertionError(
            f"pid {proc.pid} did not exit within {timeout_s} s of {signal.Signals(sig).name}; killed:\n{tail}"
        ) from None
