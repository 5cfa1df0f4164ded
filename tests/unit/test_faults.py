"""The test-only fault plan's lying peer: a "scale" fault changes what is sent, only where planned."""

from __future__ import annotations

import json

import pytest
import torch

from peer.faults import FaultPlan

pytestmark = pytest.mark.timeout(30)


def test_scale_fault_sends_a_scaled_copy_in_its_round_only(monkeypatch) -> None:
    monkeypatch.setenv("DILOCO_FAULTS", json.dumps([{"point": "pseudo_gradient", "action": "scale",
                                                     "factor": -1.0, "round": 2}]))
    plan, delta = FaultPlan.from_env(), torch.arange(4.0)
    assert plan.sent_delta(1, delta) is delta
    sent = plan.sent_delta(2, delta)
    assert torch.equal(sent, -delta) and torch.equal(delta, torch.arange(4.0))   # the true delta is kept


@pytest.mark.parametrize("fault", [{"point": "inner_step", "action": "scale", "factor": 100},
                                   {"point": "pseudo_gradient", "action": "kill"}])
def test_scale_belongs_to_the_pseudo_gradient_point_only(monkeypatch, fault) -> None:
    monkeypatch.setenv("DILOCO_FAULTS", json.dumps([fault]))
    with pytest.raises(ValueError, match="bad fault"):
        FaultPlan.from_env()


def test_a_corrupt_fault_changes_the_part_after_encoding_and_keeps_its_hash_true(monkeypatch) -> None:
    from peer._proto import peer_pb2 as pb
    from peer.codecs import CodecError, get_codec
    from peer.faults import CORRUPTIONS
    from peer.net import allreduce as ar
    from peer.net.allreduce import payload_digest
    from peer.net.round import make_roster

    roster = make_roster(5, "a", [pb.Member(peer_id="a", address="a:1", weight=1, samples=1, upload_bps=1e6)],
                         "int8", 1024)
    payload = get_codec("int8").encode(torch.linspace(-1, 1, 1024))
    for mode in CORRUPTIONS:
        monkeypatch.setenv("DILOCO_FAULTS", json.dumps([{"point": "sent_part", "action": "corrupt", "mode": mode,
                                                         "round": 5}]))
        plan = FaultPlan.from_env()
        header = ar.contribution_header(roster, "a", 0, get_codec("int8"), payload)
        assert plan.sent_part(4, header, payload) == (header, payload), "only in its round"
        h, p = plan.sent_part(5, header, payload)
        assert h.sha256 == payload_digest(p) and h.num_bytes == len(p) and p != payload or h.round != 5
        why = ar.check_header(h, roster, get_codec("int8"), reduced=False)
        if mode in ("nan", "inf"):
            assert why is None
            with pytest.raises(CodecError, match="scale"):
                get_codec("int8").decode(p, h.numel)
        else:
            assert why is not None, mode
    with pytest.raises(ValueError, match="bad fault"):
        monkeypatch.setenv("DILOCO_FAULTS", json.dumps([{"point": "sent_part", "action": "corrupt", "mode": "x"}]))
        FaultPlan.from_env()
