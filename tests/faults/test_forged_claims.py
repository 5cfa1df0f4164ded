"""A peer that forges its claims (the fault plan's `claim` fault: 10^13 x its weight and samples,
about 10^15 samples a round, and the same factor on the steps and samples its signed DHT record
publishes, so the forged claim is backed by forged progress) among two honest ones: its claim counts
at most validate.CLAIM_CAP times the group's lower median, so it neither outweighs the swarm nor
moves the global sample count (and with it every peer's inner learning rate) by more than a few
rounds' worth; the rounds apply and every peer holds one state per round."""

from __future__ import annotations

import json

import pytest

from peer.net.validate import CLAIM_CAP
from tests.swarm.harness import Swarm

RUN = ["--model", "tiny", "--codec", "fp32", "--target-steps", "60", "--min-peers", "3", "--max-rounds", "4",
       "--batch-size", "4", "--eval-batches", "1", "--join-window-s", "4", "--run-id", "forger-run"]
FORGER = {"DILOCO_FAULTS": json.dumps([{"point": "claim", "action": "scale", "factor": 1e13}])}
pytestmark = pytest.mark.timeout(300)


def test_a_forged_weight_and_sample_count_are_capped(tmp_path):
    s = Swarm(tmp_path, RUN)
    names = ["a", "b", "forger"]
    s.run_to_end({name: (["--seed", str(len(name))], FORGER if name == "forger" else None) for name in names},
                 240)
    a, b = s.by_round("a"), s.by_round("b")
    applied = [r for r in sorted(a) if a[r]["outcome"] == "applied" and a[r]["group_size"] == 3]
    assert applied, a
    for r in applied:   # the forger counts at most CLAIM_CAP x the lower median: here at most 4 x an honest claim
        w = (a[r]["weight"], b[r]["weight"])
        assert a[r]["total_weight"] <= sum(w) + CLAIM_CAP * max(w), f"round {r}: {a[r]['total_weight']} vs {w}"
    rounds = sorted(a)
    for r, nxt in zip(rounds, rounds[1:], strict=False):
        added = a[nxt]["global_samples"] - a[r]["global_samples"]
        n = (a[nxt]["samples"], b[nxt]["samples"])
        assert 0 <= added <= sum(n) + CLAIM_CAP * max(n), f"round {nxt} added {added} samples (honest {n})"
    assert a[rounds[-1]]["global_samples"] < 1e7, "the forged 10^15 samples never reached the count"
