"""Every applied round of an fp32 swarm recomputed in float64 from the peers' dumps
(DILOCO_TEST_DUMP_DIR: each peer's delta, weight, contributors, theta before and after)."""

from __future__ import annotations

import glob

import numpy as np

from peer.net.validate import CLAIM_CAP, lower_median
from tests.swarm.harness import Swarm


def applied(weights: list[float]) -> list[float]:
    """The weights a roster applies: each claim at most CLAIM_CAP x the group's lower median. On a loaded
    machine one peer can get most of the CPU for a round (125 of 150 steps, the other two 11 and 14 in one
    CI run), and the cap then counts it at 4 x 14: by design, so the recomputation uses the rule too."""
    cap = CLAIM_CAP * lower_median(weights)
    return [min(w, cap) for w in weights]


def dumps(swarm: Swarm, r: int) -> dict[str, dict]:
    out = {}
    for path in glob.glob(str(swarm.dump_dir / f"*.r{r}.npz")):
        with np.load(path) as z:
            out[path.split("/")[-1].split(".r")[0]] = {k: z[k] for k in z.files}
    return out


def check_rounds(swarm: Swarm, rounds: int, min_applied: int, lr: float = 0.7, momentum_coef: float = 0.9) -> None:
    """Rounds 0 .. rounds-1: every peer that applied one starts from the same theta, its contributors are
    the peers that applied it, and its new theta is the float64 outer Nesterov step on the weighted mean
    of their deltas within 1e-6 (relative)."""
    momentum = None
    for r in range(rounds):
        held = {p: d for p, d in dumps(swarm, r).items() if bool(d["applied"])}
        assert len(held) >= min_applied, f"round {r}: only {len(held)} peers applied it"
        thetas = [d["theta"] for d in held.values()]
        assert all(np.array_equal(thetas[0], t) for t in thetas), f"round {r}: peers start from different theta"
        contributors = sorted(held[next(iter(held))]["contributors"].tolist())
        assert contributors == sorted(held), f"round {r}: contributors {contributors} != members {sorted(held)}"
        w = np.array(applied([float(held[p]["weight"]) for p in contributors]))
        deltas = np.stack([held[p]["delta"].astype(np.float64) for p in contributors])
        avg = (w[:, None] * deltas).sum(0) / w.sum()
        theta = thetas[0].astype(np.float64)
        momentum = avg if momentum is None else momentum_coef * momentum + avg
        expected = theta - lr * (avg + momentum_coef * momentum)
        for peer, d in held.items():
            err = np.abs(d["new_theta"].astype(np.float64) - expected).max() / np.abs(expected).max()
            assert err < 1e-6, f"round {r}: {peer} is {err:.2e} (relative) off the float64 recomputation"
