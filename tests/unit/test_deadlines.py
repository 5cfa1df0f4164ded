"""Deadlines follow the measured transfer rate, between the floor and the ceiling."""

import logging

from peer.net.deadlines import ASSUMED_RATE_BPS, Deadlines


def test_deadline_follows_measurements_within_floor_and_ceiling(caplog):
    d = Deadlines(floor_s=5, ceiling_s=100)
    with caplog.at_level(logging.INFO):
        unmeasured = d.transfer_s(60_000_000)
    assert unmeasured == 100  # 60 MB at the assumed 2 MB/s would take longer than the ceiling
    assert "nothing measured yet" in caplog.text
    assert d.transfer_s(2_000_000) == 4 * 2_000_000 / ASSUMED_RATE_BPS + 2
    d.observe(50_000_000, 1.0)  # 50 MB/s measured
    assert d.transfer_s(40_000_000) == 4 * 40_000_000 / 50e6 + 2
    d.observe(1000, 1.0)  # too small to say anything about the rate
    assert d.rate_bps == 50e6
    for _ in range(20):
        d.observe(10_000_000, 0.001)  # very fast link: the floor holds
    assert d.transfer_s(1_000_000) == 5
    caplog.clear()
    with caplog.at_level(logging.INFO):
        d.transfer_s(1_000_000)
    assert caplog.text == ""  # logged only when the value changes


def test_join_window_follows_the_slowest_step_within_its_bounds(caplog):
    d = Deadlines(5.0, 300.0)
    with caplog.at_level(logging.INFO, logger="peer.net.deadlines"):
        assert d.join_window_s(0.01, 30.0) == 3.0          # fast steps: the floor
        assert d.join_window_s(5.0, 30.0) == 12.0          # 2 s + 2 steps of the slowest peer
        assert d.join_window_s(60.0, 30.0) == 30.0         # never past --join-window-s
        assert d.join_window_s(0.01, 2.0) == 2.0           # a smaller --join-window-s wins over the floor
    said = [r.getMessage() for r in caplog.records if "join window is now" in r.getMessage()]
    assert len(said) == 4 and "12.0 s" in said[1]
