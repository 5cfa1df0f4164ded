"""--overlap: a solo peer (the real CLI: its own DHT, gRPC server and rounds) on a task with one
fixed data seed, so runs can be compared byte for byte. When each round's result arrives before
the next step would start (a test fault sleeps before every step taken while a round averages),
the states of an overlapping run are the blocking run's, round by round; without that sleep the
peer trains steps of the next round while one averages (and while the next round's start barrier
waits) and the run still trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]


class SoloRun:
    """One solo peer started now (its own DHT: runs started together never meet), finished by `result`."""

    def __init__(self, tmp_path: Path, name: str, *extra: str, faults: list | None = None):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), str(ROOT)]),
               "OMP_NUM_THREADS": "1"}
        if faults:
            env["DILOCO_FAULTS"] = json.dumps(faults)
        self.metrics = tmp_path / f"{name}.jsonl"
        cmd = [sys.executable, "-m", "peer.cli", "--task", "tests.overlap_task:build", "--target-steps", "40",
               "--max-rounds", "4", "--inner-lr", "3e-3", "--warmup-samples", "10", "--threads", "1",
               "--host", "127.0.0.1", "--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0", "--metrics-file",
               str(self.metrics), "--checkpoint-dir", str(tmp_path / f"{name}-ckpt"), "--run-id", "overlap", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=tmp_path)

    def result(self) -> tuple[list[dict], str]:
        _, err = self.proc.communicate(timeout=200)
        assert self.proc.returncode == 0, err[-3000:]
        return [json.loads(line) for line in self.metrics.read_text().splitlines()], err


def test_a_result_before_the_next_step_gives_the_blocking_bytes_and_overlap_trains_on(tmp_path):
    late_step = [{"point": "overlap_step", "action": "sleep", "seconds": 3.0}]
    runs = [SoloRun(tmp_path, "blocking"), SoloRun(tmp_path, "waited", "--overlap", faults=late_step),
            SoloRun(tmp_path, "overlapped", "--overlap")]   # at once: each waits on sleeps and its DHT
    try:
        (blocking, _), (waited, _), (overlapped, log) = [run.result() for run in runs]
    finally:   # one that failed or hung leaves none of them running
        for run in runs:
            run.proc.kill()
            run.proc.wait(10)
    assert [r["outcome"] for r in blocking] == ["applied"] * 4
    assert [r["steps_ahead"] for r in waited] == [0] * 4, "every result came before the next step"
    assert [r["steps_at_barrier"] for r in waited] == [0] * 4, "every barrier ended before the next step"
    assert [(r["state_round"], r["digest"]) for r in waited] == [(r["state_round"], r["digest"]) for r in blocking]

    assert [r["outcome"] for r in overlapped] == ["applied"] * 4
    ahead = [r["steps_ahead"] for r in overlapped]
    assert ahead[0] == 0 and any(a > 0 for a in ahead[1:]), ahead
    early = [r["steps_ahead"] + r["steps_at_barrier"] for r in overlapped]   # trained before the round began
    assert all(a <= r["steps"] for a, r in zip(early[1:], overlapped, strict=False)), "one round in flight at most"
    assert f"{max(ahead)} ahead" in log
    assert overlapped[-1]["digest"] != blocking[-1]["digest"], "the steps trained ahead are in the state"
    assert overlapped[-1]["eval_loss"] < overlapped[0]["eval_loss"], [r["eval_loss"] for r in overlapped]
