"""`peer plot` draws the eval loss of every peer in metrics files (rows as `--metrics-file` writes
them, two peers in two files) into a PNG; bad files get one line naming the file and line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peer.plot import read_curves


def rows(peer: str, n: int, t0: float) -> list[str]:
    return [json.dumps({"round": r, "peer_id": peer, "global_samples": 400 * (r + 1), "time": t0 + 30 * r,
                        "eval_loss": 5.0 / (r + 1), "digest": "d"}) for r in range(n)]


def run_plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peer.cli", "plot", *args], capture_output=True, text=True,
                          timeout=120)


def test_plot_writes_a_png_with_a_line_per_peer(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(rows("peer-aaaaaa", 5, 1000.0)) + "\n")
    b.write_text("\n".join(rows("peer-bbbbbb", 3, 1060.0) + [json.dumps({"round": 9, "peer_id": "peer-bbbbbb",
                 "global_samples": 9, "time": 1.0, "eval_loss": None})]) + "\n")  # no eval: skipped
    out = tmp_path / "loss.png"
    p = run_plot(str(a), str(b), "-o", str(out))
    assert p.returncode == 0 and "2 peer(s), 8 rounds" in p.stdout, p.stderr[-2000:]
    import matplotlib.image

    image = matplotlib.image.imread(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 300 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # lines and text, not a blank canvas
    assert {k: len(v) for k, v in read_curves([str(a), str(b)]).items()} == {"peer-aaaaaa": 5, "peer-bbbbbb": 3}


@pytest.mark.parametrize("content, needle", [
    ("not json\n", "line 1: not a metrics row"),
    (json.dumps({"round": 0}) + "\n", "line 1: not a metrics row"),
    (json.dumps({"round": 0, "peer_id": "p", "global_samples": 1, "time": 1, "eval_loss": None}) + "\n",
     "no eval loss in"),
])
def test_bad_metrics_files_say_what_is_wrong(tmp_path: Path, content: str, needle: str) -> None:
    f = tmp_path / "m.jsonl"
    f.write_text(content)
    p = run_plot(str(f), "-o", str(tmp_path / "x.png"))
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "x.png").exists()


def test_missing_file_is_named(tmp_path: Path) -> None:
    p = run_plot(str(tmp_path / "none.jsonl"))
    assert p.returncode == 2 and "none.jsonl: cannot read it" in p.stderr
