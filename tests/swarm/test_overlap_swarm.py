"""3 peers with --overlap on rounds shorter than their averaging (4 inner steps a peer): each peer
begins a round holding steps it trained while the last one averaged and while this one's start
barrier waited, enough to fill the round's target at once. Every round still applies with every
peer in it (the leader hears of those steps before anyone stops and joins: Node.report_ahead;
without that it refused the claims it had not seen, and most rounds went on without most peers),
and every peer holds one state per round."""

from __future__ import annotations

import pytest

from tests.swarm.harness import Swarm

RUN = ["--model", "tiny", "--codec", "fp32", "--target-steps", "12", "--min-peers", "3", "--batch-size", "4",
       "--eval-batches", "0", "--join-window-s", "3", "--overlap", "--run-id", "overlap-run"]
ROUNDS = 10
pytestmark = pytest.mark.timeout(300)


def test_short_rounds_with_steps_trained_ahead_apply_with_every_peer(tmp_path):
    swarm = Swarm(tmp_path, RUN)
    names = ("a", "b", "c")
    swarm.run_to_end({name: (["--max-rounds", str(ROUNDS)], None) for name in names}, 240)
    rows = {name: swarm.metrics(name) for name in names}
    for name in names:
        outcomes = [(row["round"], row["outcome"], len(row["contributors"])) for row in rows[name]]
        assert all(kind == "applied" and n == 3 for _, kind, n in outcomes), (name, outcomes)
    ahead = [row["steps_ahead"] + row["steps_at_barrier"] for name in names for row in rows[name]]
    assert sum(ahead) > 0, "steps were trained while rounds averaged"
    assert all(row["steps_ahead"] + row["steps_at_barrier"] <= prev["steps"]
               for name in names for prev, row in zip(rows[name], rows[name][1:], strict=False)), \
        "one round in flight at most"
