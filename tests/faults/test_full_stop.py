"""Checkpoints under crashes and a full stop: a peer killed (SIGKILL) in the middle of writing
a checkpoint leaves a cut-off temp file that is never loaded and resumes from the swarm; after
every peer stopped, the restarted peers agree on the newest checkpoint most of them hold, and
one whose checkpoint differs takes the agreed state instead of its own."""

from __future__ import annotations

import json
import re
import signal

import pytest

from peer.checkpoint import checkpoint_path, latest, load, save
from tests.swarm.harness import Swarm

RUN = ["--model", "tiny", "--codec", "int8", "--target-steps", "120", "--max-round-seconds", "30",
       "--min-peers", "3", "--batch-size", "4", "--eval-batches", "1", "--join-window-s", "4",
       "--checkpoint-every", "1", "--run-id", "restart"]
pytestmark = pytest.mark.timeout(300)


def test_kill_during_checkpoint_write_then_full_stop_and_agreed_restart(tmp_path):
    s = Swarm(tmp_path, RUN)
    dirs = {n: tmp_path / f"ckpt-{n}" for n in "abc"}

    def start(name: str, owner: str, env: dict | None = None):
        return s.start_peer(name, ["--checkpoint-dir", str(dirs[owner])], env=env)

    try:
        s.start_bootstrap()
        start("a", "a")
        start("b", "b")
        start("c", "c", env={"DILOCO_FAULTS": json.dumps([{"point": "checkpoint_write", "action": "kill", "skip": 2}])})
        assert s.procs["c"].wait(timeout=150) == -9, s.log("c")[-3000:]
        cut_round = int(re.search(r"kill to myself at checkpoint_write of round (\d+)", s.log("c")).group(1))
        stray = list(dirs["c"].glob(".round-*.tmp"))
        assert stray, "the cut-off write should have left its temp file"
        assert not checkpoint_path(dirs["c"], cut_round).exists()
        assert latest(dirs["c"], "restart").state.round == cut_round - 1  # the newest intact one

        start("c-again", "c")  # resumes: the swarm is newer than its checkpoint
        s.wait_rounds("c-again", 2, 120)
        assert "Traceback" not in s.log("c-again")
        # (a save in progress has a temp file of its own: only the cut-off one must be gone)
        assert not [p for p in stray if p.exists()], "the next save should delete the stray temp file"
        rows = {n: s.by_round(n) for n in ("a", "b", "c-again")}
        common = max(set.intersection(*(set(r) for r in rows.values())))
        assert len({rows[n][common]["digest"] for n in rows}) == 1

        for name in ("a", "b", "c-again"):  # the full stop: every peer, each writes a checkpoint
            s.procs[name].send_signal(signal.SIGTERM)
        for name in ("a", "b", "c-again"):
            assert s.procs[name].wait(timeout=60) == 0, s.log(name)[-3000:]
        # the same newest round everywhere (a later one is dropped), and a's state altered
        newest = min(latest(d, "restart").state.round for d in dirs.values())
        for d in dirs.values():
            for path in d.glob("round-*.ckpt"):
                if int(path.stem.split("-")[1]) > newest:
                    path.unlink()
        odd = load(checkpoint_path(dirs["a"], newest))
        odd.state.theta.add_(0.01)
        save(checkpoint_path(dirs["a"], newest), odd)
        agreed = latest(dirs["b"], "restart").state.digest()
        assert latest(dirs["c"], "restart").state.digest() == agreed != odd.state.digest()

        for name in "abc":
            start(f"{name}-restarted", name)
        first = {n: s.wait_rounds(f"{n}-restarted", 1, 120)[0] for n in "abc"}
        assert {r["round"] for r in first.values()} == {newest}, first
        assert len({r["digest"] for r in first.values()}) == 1
        assert "is not the one the restarting peers agree on" in s.log("a-restarted")
        assert f"resuming from our checkpoint of round {newest}" in s.log("b-restarted")
        assert first["b"]["eval_loss"] < s.metrics("a")[0]["eval_loss"] - 0.3, "the run resumed, not restarted"
        assert all("Traceback" not in s.log(f"{n}-restarted") for n in "abc")
        s.assert_one_digest_per_round()
    finally:
        s.stop_all()
