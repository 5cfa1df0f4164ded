"""Three peers on the small preset (13 MB of fp32) with their uploads capped at 100 Mbit/s: the
announced rates make every roster cut each owner's range into pieces (peer.net.round.pieces), so
real peer processes send, reduce, serve and apply them. Every round applies on all three, each
piece's bytes go over the wire once each way, and every round is recomputed in float64 from the
peers' dumps."""

from __future__ import annotations

import pytest

from tests.swarm.harness import Swarm
from tests.swarm.recompute import check_rounds

ROUNDS = 4
NAMES = ("a", "b", "c")
RUN = ["--model", "small", "--codec", "fp32", "--target-steps", "12", "--max-round-seconds", "60",
       "--min-peers", "3", "--batch-size", "2", "--eval-batches", "1", "--outer-lr", "0.7",
       "--outer-momentum", "0.9", "--max-upload-mbit", "100", "--max-rounds", str(ROUNDS)]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("pieces")
    s = Swarm(root, RUN)
    s.dump_dir = root / "dump"
    s.dump_dir.mkdir()
    s.run_to_end({name: ([], {"DILOCO_TEST_DUMP_DIR": str(s.dump_dir)}) for name in NAMES}, 240)
    return s


def test_every_roster_has_pieces_and_every_round_applies_everywhere(swarm):
    for name in NAMES:
        rows = swarm.metrics(name)
        assert [row["round"] for row in rows] == list(range(ROUNDS)), rows
        for row in rows:
            owners = row["owners"]
            assert row["outcome"] == "applied" and row["group_size"] == 3, row
            assert len(set(owners)) == 3 and len(owners) >= 6, f"round {row['round']}: no pieces: {owners}"
            runs = [o for i, o in enumerate(owners) if i == 0 or owners[i - 1] != o]
            assert len(runs) == 3, f"an owner's pieces are next to each other: {owners}"


def test_each_piece_crosses_the_wire_once_each_way(swarm):
    for name in NAMES:
        for row in swarm.metrics(name):
            b, owners = row["shard_bounds"], row["owners"]
            mine = [j for j, o in enumerate(owners) if o == row["peer_id"]]
            others = [j for j in range(len(owners)) if j not in mine]
            ours, theirs = (sum(b[j + 1] - b[j] for j in js) for js in (mine, others))   # values
            # our parts of the others' pieces go out, and each of our pieces to the 2 other members
            assert row["bytes_sent"] == 4 * (theirs + 2 * ours), (name, row["round"])
            assert row["bytes_received"] == 4 * (2 * ours + theirs), (name, row["round"])


def test_every_round_recomputed_in_float64(swarm):
    check_rounds(swarm, ROUNDS, min_applied=3)
