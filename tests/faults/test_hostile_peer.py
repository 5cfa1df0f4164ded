"""A hostile member among three honest peers, in one swarm of real processes: round 0 it behaves; in
each of rounds 1-6 the fault plan's `corrupt` fault changes every part it sends to another owner after
encoding (the header's sha256 recomputed, so the hash alone catches nothing): NaN, infinity, a shard of
the wrong length, 1 MiB too many bytes, the round before, the round after. Meanwhile fake members (32
fresh keys, no record in the DHT) flood every peer with Joins for the round it is in. Each bad part is
refused or dropped by its owner with a log line naming the liar, the round and the cause; no fake member
is admitted; every round applies on the honest peers with the liar not among its contributors; the
global sample count (which sets every peer's inner learning rate) grows by at most the honest
contributors' samples; every peer holds one state per round."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import Counter

import grpc
import pytest

from peer._proto import peer_pb2 as pb
from peer.faults import CORRUPTIONS
from tests.fixtures import channels, identity
from tests.procs import wait_for_line
from tests.swarm.harness import Swarm

RUN = ["--model", "tiny", "--target-steps", "40", "--min-peers", "4", "--max-rounds", "7", "--batch-size", "4",
       "--eval-batches", "1", "--join-window-s", "4", "--run-id", "hostile-run"]
MODES = {1: "nan", 2: "inf", 3: "short", 4: "oversized", 5: "stale", 6: "future"}
LIAR = {"DILOCO_FAULTS": json.dumps([{"point": "sent_part", "action": "corrupt", "mode": m, "round": r}
                                     for r, m in MODES.items()])}
# what an owner's log says of each lie (owner.handle_contribute), after "round {r}: "
PART = r"{liar}'s part of shard \d+"
SEEN = {"nan": "dropped " + PART + r": int8 payload: block 0 has scale nan",
        "inf": "dropped " + PART + r": int8 payload: block 0 has scale inf",
        "short": "refused " + PART + r": shard \d+ announces \d+ bytes, expected \d+",
        "oversized": "refused " + PART + r": shard \d+ announces \d+ bytes, expected \d+",
        "stale": "refused " + PART + r" \(its header names round {before}\): roster \w+ is not ours",
        "future": "refused " + PART + r" \(its header names round {after}\): round {after} is ahead of this peer"}
HONEST = ("a", "b", "c")
pytestmark = pytest.mark.timeout(330)


class Flood:
    """Fake members: FAKES fresh identities with no signed record Join, over and over, the round each
    peer says (Health) it is in, claiming to serve; every answer's status is counted."""

    FAKES = 32

    def __init__(self, addresses: list[str]):
        self.addresses, self.statuses = addresses, Counter()
        self.stop, self.errors = threading.Event(), Counter()
        self.thread = threading.Thread(target=lambda: asyncio.run(self.main()), daemon=True)

    async def main(self) -> None:
        fakes = [identity() for _ in range(self.FAKES)]
        chans = [channels(f) for f in fakes]
        loop = asyncio.get_running_loop()
        try:
            while not self.stop.is_set():
                await asyncio.gather(*(self.flood(address, fakes, chans) for address in self.addresses))
                await loop.run_in_executor(None, self.stop.wait, 0.5)   # a pass every half second at most
        finally:
            for c in chans:
                await c.close()

    async def flood(self, address: str, fakes, chans) -> None:
        try:
            h = await chans[0].stub(address).Health(pb.HealthRequest(), timeout=3)
        except grpc.aio.AioRpcError as e:
            self.errors[e.code().name] += 1   # the peer has left (the run is over)
            return

        async def join(fake, chan) -> None:
            req = pb.JoinRequest(run_id=h.run_id, round=max(h.round, 0), spec_hash=h.spec_hash, member=pb.Member(
                peer_id=fake.peer_id, address="127.0.0.1:9", weight=10.0, samples=40, carried_round=-1))
            try:
                reply = await chan.stub(address).Join(req, timeout=5)
                self.statuses[pb.JoinReply.Status.Name(reply.status)] += 1
            except grpc.aio.AioRpcError as e:
                self.errors[e.code().name] += 1

        await asyncio.gather(*(join(f, c) for f, c in zip(fakes, chans, strict=True)))


def test_a_hostile_member_and_fake_joiners_are_refused_and_every_round_applies(tmp_path):
    s = Swarm(tmp_path, RUN)
    flood: list[Flood] = []

    def attack() -> None:
        ports = [wait_for_line(s.procs[n], r"gRPC server listens on \S+:(\d+)", 120).group(1) for n in HONEST]
        flood.append(Flood([f"127.0.0.1:{p}" for p in ports]))
        flood[0].thread.start()

    try:
        s.run_to_end({name: (["--seed", str(i)], LIAR if name == "liar" else None)
                      for i, name in enumerate([*HONEST, "liar"])}, 300, during=attack)
    finally:
        if flood:
            flood[0].stop.set()
            flood[0].thread.join(30)
    liar = re.search(r"peer id (\S+):", s.log("liar")).group(1)
    rows = {n: s.by_round(n) for n in HONEST}
    logs = "\n".join(s.log(n) for n in HONEST)
    for r, mode in MODES.items():
        for n in HONEST:
            row = rows[n][r]
            assert row["outcome"] == "applied" and liar not in row["contributors"], (n, r, mode, row)
        assert re.search(f"round {r}: " + SEEN[mode].format(liar=liar[-6:], before=r - 1, after=r + 1), logs), (r, mode)
        assert f"fault plan: sending {mode}" in s.log("liar")
    name = {row["peer_id"]: n for n in HONEST for row in rows[n].values()}
    for n in HONEST:   # the global sample count grows by the honest contributors' samples at most: the LR holds
        for r in sorted(rows[n])[1:]:
            if rows[n][r]["outcome"] == "applied" and r - 1 in rows[n]:
                added = rows[n][r]["global_samples"] - rows[n][r - 1]["global_samples"]
                honest = sum(rows[name[p]][r]["samples"] for p in rows[n][r]["contributors"])
                # never more than the honest contributors did (the liar's part and claims add nothing); less
                # when the claim cap counted a fast one at 4 x the group's median (validate.cap_claims: a round
                # that closes fast after an uneven start can leave one peer with 34 steps and the rest 1-4)
                assert 0 < added <= honest, f"{n} round {r}: {added} samples added, contributors did {honest}"
    statuses, errors = flood[0].statuses, flood[0].errors
    print(f"fake Joins: {dict(statuses)}; failed calls: {dict(errors)}")
    assert statuses["REJECTED"] > 0 and statuses["OK"] == 0, (statuses, errors)
    assert "no fresh signed progress record" in logs
    assert all(row["group_size"] <= 4 for n in HONEST for row in rows[n].values())
    assert set(CORRUPTIONS) == set(MODES.values())
