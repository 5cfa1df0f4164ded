"""The progress bar, for real: a peer whose stderr is a pseudo-terminal draws one bar per round
(steps, loss, samples/s, ETA) and its log lines still come out whole; the same peer with
stderr in a file (tests, Docker, a pipe) writes the plain log lines and no bar."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from tests.procs import REPO_ROOT, python_module
from tests.swarm.harness import LOCAL

pytestmark = pytest.mark.timeout(300)
RUN = ["--model", "tiny", "--max-rounds", "2", "--target-steps", "60", "--batch-size", "4", "--eval-batches", "1"]
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: .*")
ROUND_LINE = re.compile(LOG_LINE.pattern[:-2] + r"round (\d+): applied, 1 peers, loss \d+\.\d{4}, eval \d+\.\d{4}, "
                        r"\d+ samples/s, \d+ tokens/s, sent [\d.]+ MB, [\d.]+ s \(train [\d.]+ s, \d+ steps; "
                        r"average [\d.]+ s\)")
BAR_START = re.compile(r"round (\d+) \|.*\| \d+/(\d+|\?) steps")   # before the first step: no figures yet
BAR = re.compile(BAR_START.pattern + r", loss \d+\.\d{4}, \d+ samples/s, ETA \d+ s(; averaging)?")


def peer_argv(tmp_path, run_id: str) -> list[str]:
    data = tmp_path / "data.txt"
    if not data.exists():   # small: the peer is ready in a second, not after reading the stdlib corpus
        data.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n"
                                for i in range(4000)))
    return python_module("peer.cli", *LOCAL, *RUN, "--run-id", run_id, "--data", str(data))


def run_on_terminal(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """Runs argv with stderr on a 120-column pseudo-terminal; returns its status and what it drew."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, cwd=REPO_ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    out, deadline = bytearray(), time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:   # EIO: the child closed the terminal
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


def segments(text: str) -> list[str]:
    """What stays readable between carriage returns and newlines (a bar redraws after `\\r`)."""
    return [s for s in re.split(r"[\r\n]", text) if s.strip()]


def test_a_bar_per_round_on_a_terminal_and_whole_log_lines(tmp_path):
    code, text = run_on_terminal(peer_argv(tmp_path, "progress-tty"), 240)
    assert code == 0, text[-3000:]
    parts = segments(text)
    bars = [m for m in map(BAR.fullmatch, parts) if m]
    assert {m.group(1) for m in bars} == {"0", "1"}, f"no bar for each round:\n{text[-3000:]}"
    assert any(m.group(2) != "?" for m in bars), "the bar never knew how many steps it would take"
    assert any(m.group(3) for m in bars), "the bar does not say the round averages"
    assert sorted(m.group(2) for m in map(ROUND_LINE.fullmatch, parts) if m) == ["0", "1"], text[-3000:]
    lines = [p for p in parts if not BAR_START.match(p)]
    torn = [p for p in lines if not LOG_LINE.fullmatch(p) or " steps, loss " in p]
    assert not torn, f"log lines mixed with the bar: {torn[:5]}"


def test_no_bar_when_stderr_is_not_a_terminal(tmp_path):
    log = tmp_path / "peer.log"
    with open(log, "wb") as f:
        code = subprocess.run(peer_argv(tmp_path, "progress-file"), stdout=subprocess.DEVNULL, stderr=f,
                              cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240).returncode
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "\r" not in text and not BAR_START.search(text), "a bar went into a file"
    assert len(ROUND_LINE.findall(text)) == 2
    assert all(LOG_LINE.fullmatch(line) or line.startswith((" ", "Traceback")) for line in text.splitlines())
