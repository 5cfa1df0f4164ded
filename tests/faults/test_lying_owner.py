"""A peer that lies as an owner (the fault plan's `reduced_shard` fault: it serves -1000 x every shard
it reduces as its owner) among three honest ones, in a run with --aggregator trimmed-mean, which turns
--verify-shards on: each shard is reduced by its owner and its backup, members compare the two
headers, so no member ever applies the lie. The round the liar owns a shard is not applied; every
member then suspects the liar and its backup as reducers (peer.net.verify), the next leaders give
neither a shard, and the run goes on and learns, with one state per round on every peer. With
--trusted-owners (no second reduction) a liar outside the list owns nothing."""

from __future__ import annotations

import json
import math
import re

import pytest

from peer.identity import Identity
from tests.swarm.harness import Swarm

RUN = ["--model", "tiny", "--codec", "fp32", "--aggregator", "trimmed-mean", "--trim-fraction", "0.25",
       "--weighting", "equal", "--target-steps", "40", "--min-peers", "4", "--max-rounds", "4",
       "--warmup-samples", "160", "--total-samples", "640", "--batch-size", "4", "--eval-batches", "4",
       "--join-window-s", "4", "--run-id", "lying-owner-run"]
LIAR = {"DILOCO_FAULTS": json.dumps([{"point": "reduced_shard", "action": "scale", "factor": -1000.0}])}
pytestmark = pytest.mark.timeout(330)


def peer_id(log: str) -> str:
    return re.search(r"peer id (\S+):", log).group(1)


def test_a_lying_owner_is_caught_by_its_backup_and_never_applied(tmp_path):
    s = Swarm(tmp_path, RUN)
    names = ["a", "b", "c", "liar"]
    s.run_to_end({name: (["--seed", str(len(name))], LIAR if name == "liar" else None) for name in names},
                 270)
    liar = peer_id(s.log("liar"))[-6:]
    a = s.log("a")
    assert "reduced it differently" in a, a[-3000:]
    assert f"suspecting {liar} as a reducer" in a, a[-3000:]
    rows = s.metrics("a")
    outcomes = [r["outcome"] for r in rows]
    assert "applied" in outcomes and outcomes[-1] == "applied", outcomes
    start = float(re.search(r"eval loss at the start: ([0-9.]+)", a).group(1))
    final = rows[-1]["eval_loss"]   # under the lie (-1000 x a shard) the state would be ruined
    assert math.isfinite(final) and final < start - 0.05, (start, final, outcomes)


def test_with_trusted_owners_a_liar_owns_nothing_and_every_round_applies(tmp_path):
    keys = {name: tmp_path / f"{name}.key" for name in ("a", "b", "c", "liar")}
    ids = {name: Identity.load_or_create(str(path)).peer_id for name, path in keys.items()}
    trusted = ",".join(sorted((ids["a"], ids["b"])))
    s = Swarm(tmp_path, [*RUN[:-1], "lying-owner-trusted", "--max-rounds", "3", "--trusted-owners", trusted])
    s.run_to_end({name: (["--seed", str(len(name)), "--identity-file", str(keys[name])],
                         LIAR if name == "liar" else None) for name in keys}, 240)
    assert "reduced it differently" not in s.log("a"), "no second reduction runs with trusted owners"
    rows = s.metrics("a")
    assert [r["outcome"] for r in rows] == ["applied"] * 3 and all(r["group_size"] == 4 for r in rows), rows
    start = float(re.search(r"eval loss at the start: ([0-9.]+)", s.log("a")).group(1))
    assert math.isfinite(rows[-1]["eval_loss"]) and rows[-1]["eval_loss"] < start - 0.05
