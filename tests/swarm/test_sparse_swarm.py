"""3 peers train the tiny model with the sparse codec: every round applies with all three, every peer
holds one state per round, the loss falls, and each peer sends exactly the sparse bytes the butterfly
needs (its contributions to the two other owners, then its own reduced shard to each of them): about
141 x fewer than the same round in fp32."""

from __future__ import annotations

import pytest

from peer.codecs import get_codec
from peer.config import RunSpec, wire_codec
from peer.net.round import shard_bounds
from peer.outer import num_params
from peer.tasks.gpt import build_model
from tests.swarm.harness import Swarm

RUN = ["--model", "tiny", "--codec", "sparse", "--target-steps", "90", "--max-round-seconds", "30",
       "--min-peers", "3", "--batch-size", "4", "--eval-batches", "2", "--join-window-s", "4",
       "--run-id", "sparse-run"]
ROUNDS = 5
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("sparse"), RUN)
    try:
        s.start_bootstrap()
        for name in ("a", "b", "c"):
            s.start_peer(name, ["--max-rounds", str(ROUNDS)])
        for name in ("a", "b", "c"):
            s.wait_rounds(name, ROUNDS, 240)
        yield s
        s.assert_one_digest_per_round()
    finally:
        s.stop_all()


def test_every_round_applies_with_everyone_and_the_loss_falls(swarm):
    for name in ("a", "b", "c"):
        rows = swarm.metrics(name)[:ROUNDS]
        assert [r["outcome"] for r in rows] == ["applied"] * ROUNDS, [r["outcome"] for r in rows]
        assert all(len(r["contributors"]) == 3 for r in rows)
    rows = swarm.metrics("a")[:ROUNDS]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"], [r["eval_loss"] for r in rows]


def test_each_peer_sends_the_sparse_bytes_of_its_shards(swarm):
    codec = get_codec(wire_codec(RunSpec(codec="sparse")))
    numel = num_params(build_model("tiny", 0))
    b = shard_bounds(numel, 3)
    sizes = [codec.encoded_size(b[j + 1] - b[j]) for j in range(3)]
    fp32_round = 2 * 4 * numel * 2 // 3  # 2/3 of the model out as contributions, 2/3 as results
    for name in ("a", "b", "c"):
        for row in swarm.metrics(name)[:ROUNDS]:
            mine = row["owners"].index(row["peer_id"])
            expected = sum(s for j, s in enumerate(sizes) if j != mine) + 2 * sizes[mine]
            assert row["bytes_sent"] == expected, (name, row["round"], row["bytes_sent"], expected)
            assert fp32_round / row["bytes_sent"] > 100
