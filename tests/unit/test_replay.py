"""Replaying kept updates gives exactly the state the swarm computed, and nothing else."""

import pytest
import torch

from peer.codecs import get_codec
from peer.net.replay import KEEP_ROUNDS, UpdateLog, apply_update
from peer.outer import GlobalState, outer_step

pytestmark = pytest.mark.timeout(60)


def _rounds(n: int, numel: int = 1000):
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(numel, generator=gen)
    state = GlobalState(theta, torch.zeros(numel), 0, 0)
    codec, bounds = get_codec("int8"), [0, 400, numel]
    log, states = UpdateLog(), [state]
    for r in range(n):
        spans = list(zip(bounds[:-1], bounds[1:], strict=True))
        payloads = [codec.encode(torch.randn(b - a, generator=gen) * 0.01) for a, b in spans]
        avg = torch.cat([codec.decode(p, b - a) for p, (a, b) in zip(payloads, spans, strict=True)])
        theta, mom = outer_step(state.theta, state.momentum, avg, 0.7, 0.9)
        state = GlobalState(theta, mom, r + 1, state.global_samples + 10)
        log.add(r, True, "int8", bounds, payloads, 10, state.digest())
        states.append(state)
    return log, states


def _replay(log: UpdateLog, state: GlobalState, to_round: int) -> GlobalState:
    chunks = log.chunks(state.round, to_round)
    assert chunks is not None
    groups = []
    for c in chunks:
        if c.HasField("header"):
            groups.append([c.header, bytearray()])
        groups[-1][1] += c.data
    for header, payload in groups:
        state = apply_update(state, header, bytes(payload), 0.7, 0.9)
    return state


def test_replay_reaches_the_same_bytes():
    log, states = _rounds(6)
    assert log.chunks(0, 6) is None, f"only the last {KEEP_ROUNDS} rounds are kept"
    start = states[6 - KEEP_ROUNDS]
    end = _replay(log, start, 6)
    assert end.digest() == states[6].digest() and torch.equal(end.theta, states[6].theta)
    assert end.global_samples == states[6].global_samples


def test_replay_refuses_a_wrong_base_or_tampered_bytes():
    log, states = _rounds(3)
    wrong = GlobalState(states[1].theta + 1e-3, states[1].momentum, 1, states[1].global_samples)
    with pytest.raises(ValueError, match="replayed digest"):
        _replay(log, wrong, 3)
    chunk = log.chunks(2, 3)[0]
    tampered = bytes([chunk.data[0] ^ 1]) + chunk.data[1:]
    with pytest.raises(ValueError, match="does not match its header"):
        apply_update(states[2], chunk.header, tampered, 0.7, 0.9)
    with pytest.raises(ValueError, match="does not follow"):
        apply_update(states[1], chunk.header, chunk.data, 0.7, 0.9)


def test_a_broken_chain_is_dropped():
    log, _ = _rounds(3)
    log.add(7, False, "int8", [0, 1000], [], 0, "x")
    assert log.chunks(1, 3) is None and log.span() == "rounds 7..7"
