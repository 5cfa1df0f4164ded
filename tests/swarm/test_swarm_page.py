"""Seeing the swarm, on real processes: three peers and a bootstrap node with `--http-port`;
`peer status` lists every live peer with its round, and the swarm page, served by a peer and by
the bootstrap node, renders in headless Chromium with every peer and one loss line per peer."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.request

import pytest

from peer.net.swarm import PHASES
from tests import chromium
from tests.procs import python_module, wait_for_line
from tests.swarm.harness import Swarm

RUN_ID = "page-run"
RUN = ["--model", "tiny", "--target-steps", "30", "--max-round-seconds", "20", "--min-peers", "3",
       "--batch-size", "4", "--eval-batches", "1", "--join-window-s", "4", "--run-id", RUN_ID]
NAMES = ("a", "b", "c")
pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("page"), RUN)
    s.http = {"a": free_port(), "bootstrap": free_port()}
    try:
        proc = s.launch("bootstrap", python_module(
            "bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--http-port", str(s.http["bootstrap"]),
            "--run-id", RUN_ID, "--refresh-period-s", "1"), None)
        s.bootstrap_addr = wait_for_line(proc, r"^Join through: (\S+)", 60).group(1)
        for name in NAMES:
            s.start_peer(name, ["--http-port", str(s.http["a"])] if name == "a" else [])
        for name in NAMES:
            s.wait_rounds(name, 3, 180)
        s.ids = {name: s.metrics(name)[0]["peer_id"] for name in NAMES}
        yield s
        s.assert_one_digest_per_round()
    finally:
        s.stop_all()


def peer_status(swarm, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peer.cli", "status", "--initial-peers", swarm.bootstrap_addr,
                           *args], capture_output=True, text=True, timeout=120)


def test_peer_status_lists_every_live_peer_and_its_round(swarm):
    reported = {name: max(swarm.by_round(name)) for name in NAMES}   # before: the rounds only grow
    p = peer_status(swarm, "--run-id", RUN_ID)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"run {RUN_ID}: model tiny, codec int8, 30 target steps"), p.stdout
    assert "3 live peers (3 serving)" in lines[1], p.stdout
    header = next(line for line in lines if line.startswith("PEER"))
    assert re.split(r"\s{2,}", header)[:4] == ["PEER", "PHASE", "ROUND", "STATE"]
    for name, pid in swarm.ids.items():
        row = next((line for line in lines if line.startswith(pid[-6:])), None)
        assert row is not None, f"{name} ({pid}) is not listed:\n{p.stdout}"
        cells = re.split(r"\s{2,}", row)
        assert cells[1] in PHASES and int(cells[2]) >= reported[name], (name, row)
        assert "serving" in row and "127.0.0.1:" in row


def test_peer_status_json_is_the_view_with_each_peers_rounds(swarm):
    p = peer_status(swarm, "--run-id", RUN_ID, "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    view = json.loads(p.stdout)
    assert view["run_id"] == RUN_ID and view["errors"] == [] and view["spec"]["target_steps"] == 30
    live = {q["peer_id"] for q in view["peers"] if q["live"]}
    assert set(swarm.ids.values()) <= live, f"live peers {live}, expected {swarm.ids}"
    for name, pid in swarm.ids.items():
        rows = swarm.by_round(name)
        history = view["history"][pid]
        assert len(history) >= 3
        for h in history:   # what the peer published is what it wrote to its metrics file
            row = rows[h["round"]]
            assert (h["outcome"], h["loss"], h["global_samples"]) == (row["outcome"], row["loss"],
                                                                      row["global_samples"]), (name, h, row)


def test_peer_status_of_a_run_nobody_is_in_says_so(swarm):
    p = peer_status(swarm, "--run-id", "nobody-runs-this")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "nobody is in run nobody-runs-this" in p.stdout and "check --run-id" in p.stdout


@pytest.mark.parametrize("server", ["a", "bootstrap"])
def test_the_swarm_page_renders_every_peer_and_a_loss_line_each(swarm, server, tmp_path):
    url = f"http://127.0.0.1:{swarm.http[server]}/"
    dom = chromium.dump_dom(url)
    ids = set(swarm.ids.values())
    for pid in ids:
        assert f'<tr class="live" data-peer="{pid}">' in dom, f"{pid} is not a live row of the peers table"
    assert set(chromium.line_colors(dom)) == ids, "one loss line per peer"
    assert f"<title>{RUN_ID} · diloco-p2p swarm</title>" in dom
    png = chromium.screenshot(url, tmp_path / f"page-{server}.png")
    counts = chromium.check_screenshot(png, dom)
    assert set(counts) == ids


def test_the_bootstrap_page_takes_the_run_from_its_url(swarm):
    base = f"http://127.0.0.1:{swarm.http['bootstrap']}"
    with urllib.request.urlopen(f"{base}/api/swarm?run=nobody-runs-this", timeout=30) as r:
        other = json.loads(r.read())
    assert other["run_id"] == "nobody-runs-this" and other["peers"] == [] and other["default_run"] == RUN_ID
    with urllib.request.urlopen(f"{base}/api/swarm?run={RUN_ID}", timeout=30) as r:
        assert set(swarm.ids.values()) <= {q["peer_id"] for q in json.loads(r.read())["peers"]}
