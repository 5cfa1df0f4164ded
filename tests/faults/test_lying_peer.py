"""A peer that sends -1000 x its pseudo-gradient every round (the fault plan's `scale` fault) among
three honest ones, in a run with --aggregator trimmed-mean: the run still learns (eval loss below
the start; the same run under the mean ends at an eval loss of about 12000), and every peer, the
liar too, holds one state per round."""

from __future__ import annotations

import json
import math
import re

import pytest

from tests.swarm.harness import Swarm

RUN = ["--model", "tiny", "--codec", "fp32", "--aggregator", "trimmed-mean", "--trim-fraction", "0.25",
       "--weighting", "equal", "--target-steps", "40", "--min-peers", "4", "--max-rounds", "3",
       "--warmup-samples", "160", "--total-samples", "480", "--batch-size", "4", "--eval-batches", "4",
       "--join-window-s", "4", "--run-id", "liar-run"]
LIAR = {"DILOCO_FAULTS": json.dumps([{"point": "pseudo_gradient", "action": "scale", "factor": -1000.0}])}
pytestmark = pytest.mark.timeout(300)


def test_trimmed_mean_outvotes_a_peer_that_sends_garbage(tmp_path):
    s = Swarm(tmp_path, RUN)
    names = ["a", "b", "c", "liar"]
    s.run_to_end({name: (["--seed", str(len(name))], LIAR if name == "liar" else None) for name in names},
                 240)
    assert "fault plan: sending -1000 x the pseudo-gradient" in s.log("liar")
    rows = s.metrics("a")
    assert [r["outcome"] for r in rows] == ["applied"] * 3 and all(r["group_size"] == 4 for r in rows), rows
    start = float(re.search(r"eval loss at the start: ([0-9.]+)", s.log("a")).group(1))
    final = rows[-1]["eval_loss"]
    assert math.isfinite(final) and final < start - 0.05, (start, final)
