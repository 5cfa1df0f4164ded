"""2 peers train a GPT-2-shaped model (tied lm_head and wte): digests agree, the eval loss falls,
the tied tensor travels once (theta's size is the unique parameters') and the export loads
tied, with the eval loss the peer reported."""

from __future__ import annotations

import pytest

from tests.swarm.hf_helpers import assert_same_states, export_and_eval, start_hf_run

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def gpt2(files, tmp_path_factory):
    s, peer = start_hf_run(tmp_path_factory.mktemp("hf-gpt2"), files, "gpt2", min_peers=2)
    try:
        s.start_peer("b", peer)
        for name in ("a", "b"):
            s.wait_rounds(name, 3, 240)
        yield s
        s.assert_one_digest_per_round()
    finally:
        s.stop_all()


def test_gpt2_tied_weights_travel_once_and_come_back_tied(gpt2, files):
    from peer.checkpoint import latest

    assert_same_states(gpt2, ["a", "b"])
    evals = [r["eval_loss"] for r in gpt2.metrics("a")[:3]]
    assert evals[2] < evals[0] - 0.05, evals
    model, loss, reported = export_and_eval(gpt2, gpt2.root / "ckpt-a", files, "a")
    assert loss == pytest.approx(reported, abs=1e-4)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    unique = sum(p.numel() for p in model.parameters())  # parameters() lists the tied tensor once
    assert latest(gpt2.root / "ckpt-a").state.theta.numel() == unique
    assert unique < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
