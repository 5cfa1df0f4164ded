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
