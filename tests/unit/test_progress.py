"""The progress bar's arithmetic and when it shows (the bar itself, on a real terminal, is in
tests/swarm/test_progress.py)."""

from __future__ import annotations

import os
import pty

import pytest

from peer.progress import estimate, wants_bar


def test_alone_the_share_is_what_is_left_of_the_target():
    assert estimate(10, 10.0, 50, 0.0, 300.0) == (60, 5.0)


def test_with_others_the_share_follows_the_rates():
    total, eta_s = estimate(10, 10.0, 50, 30.0, 300.0)
    assert eta_s == pytest.approx(1.25) and total == 10 + 12


def test_the_round_time_limit_caps_both():
    assert estimate(10, 10.0, 50, 30.0, 0.5) == (15, 0.5)
    assert estimate(10, 10.0, 50, 0.0, -2.0) == (10, 0.0)


def test_closed_or_untimed():
    assert estimate(7, 10.0, 0, 5.0, 100.0) == (7, 0.0), "the leader closed the round: no step left"
    assert estimate(0, 0.0, 60, 5.0, 100.0) == (None, 12.0), "our own rate is unknown before the first step"


def test_a_bar_only_on_a_terminal_unless_asked():
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as tty, open(os.devnull, "w") as file:
            assert wants_bar("auto", "INFO", tty) and not wants_bar("auto", "INFO", file)
            assert not wants_bar("auto", "DEBUG", tty), "DEBUG lines come too fast for a bar"
            assert wants_bar("on", "INFO", file) and not wants_bar("off", "INFO", tty)
    finally:
        os.close(master)
        os.close(slave)
