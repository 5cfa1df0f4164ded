"""`--http-port` on real processes: a bootstrap node and two peers serve `/status`, the peers
`/metrics` (Prometheus text whose counters match their metrics files); a port already in use
is a configuration error (exit 2) that names it."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peer.net.round import DROP_REASONS
from tests.procs import python_module, start_proc, stop, wait_for_line
from tests.swarm.harness import LOCAL, Swarm

RUN = ["--model", "tiny", "--target-steps", "40", "--max-round-seconds", "20", "--min-peers", "2",
       "--batch-size", "4", "--eval-batches", "1", "--join-window-s", "4", "--run-id", "http-run"]
pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port: int, path: str = "/status", timeout_s: float = 5.0) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as r:
        assert r.headers["Content-Type"].startswith("application/json")
        return json.loads(r.read())


def wait_json(port: int, ok, timeout_s: float, path: str = "/status") -> dict:
    """Polls until ok(answer) holds; the last answer or error is in the failure."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            last = get_json(port, path)
            if ok(last):
                return last
        except (urllib.error.URLError, ConnectionError) as e:
            last = e
        time.sleep(0.3)
    raise AssertionError(f"{path} on port {port} did not get there within {timeout_s} s; last: {last!r}")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("http"), RUN)
    s.http = {name: free_port() for name in ("a", "b")}
    try:
        s.start_bootstrap()
        for name, port in s.http.items():
            s.start_peer(name, ["--http-port", str(port)])
        s.wait_rounds("b", 2, 120)
        yield s
        s.assert_one_digest_per_round()
    finally:
        s.stop_all()


def test_peer_status_matches_its_metrics_file(swarm):
    for name, port in swarm.http.items():
        status = wait_json(port, lambda st: st["last_round"] is not None and st["last_round"]["round"] >= 1, 60)
        rows = swarm.by_round(name)
        last = status["last_round"]
        assert last == json.loads(json.dumps(rows[last["round"]])), "the last round in /status is the file's row"
        assert status["run_id"] == "http-run" and status["address"].startswith("127.0.0.1:")
        assert status["phase"] in ("sync", "wait", "train", "average")
        assert status["peers_in_view"] >= 1
        assert status["deadlines"]["join_window_s"] >= 3 and status["deadlines"]["transfer_timeout_s"] >= 5
        upto = [r for r in rows.values() if r["round"] <= last["round"]]
        assert sum(status["rounds"].values()) >= len(upto)
        assert status["bytes_sent"] >= sum(r["bytes_sent"] for r in upto) > 0


def scrape(port: int) -> tuple[dict[str, str], dict[tuple, float]]:
    """/metrics parsed: {family: type} and {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    types, samples = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"{key} twice in /metrics"
            samples[key] = s.value
    return types, samples


def scrape_with_rows(swarm: Swarm, name: str, port: int, timeout_s: float = 60) -> tuple[dict, dict, list[dict]]:
    """/metrics and the metrics file at one moment: the file holds the same rows before and after
    the scrape, and they are the rounds the scrape counted (the row reaches the loop and the file
    one after the other, so a round boundary in between is tried again)."""
    deadline = time.monotonic() + timeout_s
    while True:
        before = swarm.metrics(name)
        types, samples = scrape(port)
        after = swarm.metrics(name)
        counted = sum(v for (n, _), v in samples.items() if n == "diloco_rounds_total")
        if before and len(before) == len(after) == counted:
            return types, samples, after
        assert time.monotonic() < deadline, f"{name}: /metrics counted {counted} rounds, the file {len(after)}"
        time.sleep(0.2)


def test_peer_metrics_match_its_metrics_file(swarm):
    downloads = 0
    for name, port in swarm.http.items():
        types, m, rows = scrape_with_rows(swarm, name, port)
        one = {n: v for (n, labels), v in m.items() if not labels}
        by = {}
        for (n, labels), v in m.items():
            by.setdefault(n, {})[labels] = v
        assert types["diloco_rounds"] == "counter" and types["diloco_round_seconds"] == "histogram"
        assert not [n for n in types if n.startswith(("python_", "process_"))], "the default registry leaked in"
        outcomes = {o: sum(r["outcome"] == o for r in rows) for o in ("applied", "aborted", "excluded")}
        assert {dict(k)["outcome"]: v for k, v in by["diloco_rounds_total"].items()} == outcomes
        assert outcomes["applied"] >= 1
        assert one["diloco_sent_bytes_total"] == sum(r["bytes_sent"] for r in rows) > 0
        assert one["diloco_received_bytes_total"] == sum(r["bytes_received"] for r in rows) > 0
        assert one["diloco_trained_samples_total"] == sum(r["samples"] for r in rows)
        assert one["diloco_trained_tokens_total"] == sum(r["tokens"] for r in rows)
        assert one["diloco_divergences_total"] == rows[-1]["divergences"]
        reasons = [why for r in rows for why in r["drop_reasons"].values()]
        assert {dict(k)["reason"]: v for k, v in by["diloco_drops_total"].items()} == {
            w: reasons.count(w) for w in DROP_REASONS}
        assert one["diloco_round_seconds_count"] == len(rows)
        assert math.isclose(one["diloco_round_seconds_sum"], sum(r["round_seconds"] for r in rows), rel_tol=1e-9)
        assert math.isclose(one["diloco_average_seconds_sum"], sum(r["average_seconds"] for r in rows), rel_tol=1e-9)
        last = rows[-1]
        assert one["diloco_last_round"] == last["round"] and one["diloco_group_size"] == last["group_size"]
        assert math.isclose(one["diloco_loss"], last["loss"]) and math.isclose(one["diloco_eval_loss"], last["eval_loss"])
        assert math.isclose(one["diloco_samples_per_second"], last["samples_per_s"])
        assert math.isclose(one["diloco_round_last_seconds"], last["round_seconds"])
        # live: read from the core at the scrape
        assert one["diloco_round"] >= last["round"] and one["diloco_state_round"] >= last["state_round"]
        assert one["diloco_join_window_seconds"] >= 3 and one["diloco_transfer_timeout_seconds"] >= 5
        assert one["diloco_peers_in_view"] >= 1
        assert sorted(by["diloco_phase"].values()) == [0, 0, 0, 1]
        (info,) = by["diloco_peer_info"]
        assert dict(info)["peer_id"] == last["peer_id"] and dict(info)["run_id"] == "http-run"
        got = by["diloco_state_downloads_total"][(("method", "download"),)]
        logged = len(re.findall(r"downloaded the state of round", swarm.log(name)))
        assert got == logged, f"{name}: {got} downloads counted, {logged} logged"
        if got:
            assert by["diloco_state_download_bytes_total"][(("method", "download"),)] > 0
        downloads += got
    assert downloads >= 1, "the peer that joined second downloaded the state"


def test_bootstrap_status(tmp_path):
    port = free_port()
    proc = start_proc(python_module("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--http-port", str(port),
                                    "--refresh-period-s", "0.5"), None, tmp_path / "bootstrap.log")
    try:
        join = wait_for_line(proc, r"^Join through: (\S+)", 60).group(1)
        status = wait_json(port, lambda st: True, 30)
        assert status["role"] == "bootstrap" and join in status["join"]
        assert status["peer_id"] in join
    finally:
        assert stop(proc) == 0


def test_http_port_in_use_exits_2(swarm, tmp_path):
    taken = swarm.http["a"]
    p = subprocess.run([sys.executable, "-m", "peer.cli", *LOCAL, *RUN, "--http-port", str(taken),
                        "--initial-peers", swarm.bootstrap_addr], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"--http-port {taken}: cannot listen on it" in p.stderr
