"""The swarm view in-process over a real hivemind DHT: history records written by `Monitor`
and read back, strangers' malformed records skipped, drops merged, the spec summarised, the
`peer status` table, and the page served by a real aiohttp server rendered in headless
Chromium with hostile strings in the DHT."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from hivemind.utils import get_dht_time

from peer.config import RunSpec
from peer.dht import create_dht
from peer.monitor import Monitor
from peer.net import swarm
from peer.net.loop import NetLoop
from peer.status import format_view, table
from peer.swarmview import add_routes, collect
from peer.web import WebServer
from tests import chromium
from tests.fixtures import identity, store_as

RUN = "sv-run"
# the test's peers: real keys (records are signed), all published through one DHT node (store_as)
KEYS = {name: identity() for name in ("A", "B", "C", "stale", "bad", "evil", "junk", "huge")}
A, B, C = KEYS["A"].peer_id, KEYS["B"].peer_id, KEYS["C"].peer_id
EVIL = '<img src=x onerror="document.title=1">'
SPEC = RunSpec(model="tiny", codec="fp32", target_steps=40)


def metrics_row(r: int, loss: float, dropped=(), reasons=None) -> dict:
    row = {"round": r, "peer_id": A, "outcome": "applied", "group_size": 3, "weight": 13.0, "loss": loss,
           "eval_loss": loss + 0.1, "samples_per_s": 52.5, "global_samples": 160 * (r + 1), "time": 1000.0 + r,
           "dropped": list(dropped)}
    if reasons is not None:
        row["drop_reasons"] = reasons
    return row


def record(addr: str, round_: int, phase: str, *, client=False, t=None, spec=None) -> dict:
    return swarm.PeerRecord("x", addr, round_, 7, 28, 3.5 if phase == swarm.TRAIN else 0.0, phase == swarm.TRAIN,
                            client, round_, spec or SPEC.hash(), t or get_dht_time(), phase).to_value()


@pytest.fixture(scope="module")
def dht_loop():
    dht = create_dht(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"])   # it forks: before the loop's thread
    loop = NetLoop("test-swarmview")
    loop.start()
    try:
        yield dht, loop
    finally:
        loop.stop()
        dht.shutdown()


def store_all(dht, key: str, values: dict) -> None:
    """Each value signed by the test peer KEYS[name]; a name that is not in KEYS is stored as an
    unprotected subkey (no owner: readers skip it)."""
    for name, value in values.items():
        if name in KEYS:
            assert store_as(dht, KEYS[name], key, value)
        else:
            assert store_as(dht, KEYS["A"], key, value, subkey=name)


@pytest.fixture
def swarm_in_dht(dht_loop):
    """Run RUN in the DHT: A trains (serving), B is a client, C left, a stale peer, a malformed
    record, a hostile one and an unsigned one (an earlier spec too: nobody signed it); histories
    of A and B (written by Monitor), two malformed ones. Stored again for every test: records
    expire RECORD_TTL_S after they are stored."""
    dht, loop = dht_loop
    now = get_dht_time()
    store_all(dht, swarm.spec_key(RUN), {
        "A": {"spec": SPEC.to_record(), "created": now - 50, "origin": A},
        "B": {"spec": RunSpec(model="small").to_record(), "created": now - 10, "origin": B},  # later: loses
        A: {"spec": RunSpec(model="small").to_record(), "created": now - 90, "origin": A},  # earlier, unsigned
    })
    store_all(dht, swarm.peers_key(RUN), {
        "A": record("127.0.0.1:7001", 4, swarm.TRAIN), "B": record("", 4, swarm.WAIT, client=True),
        "C": record("", 3, swarm.WAIT), "stale": record("127.0.0.1:7009", 1, swarm.TRAIN, t=now - 20),
        "bad": {**record("127.0.0.1:1", 1, swarm.TRAIN), "phase": "dancing"},
        "evil": record(EVIL + "<script>document.title='pwned'</script>", 4, swarm.TRAIN, spec="0000000000000000"),
        "unsigned-peer": record("127.0.0.1:7002", 4, swarm.TRAIN),
    })
    histories = {}
    for name, drops, slope in (("A", {C: "sent nothing within 12 s"}, 0.5), ("B", None, 0.25)):
        m = Monitor()
        for r in range(5):
            m.observe(metrics_row(r, 5.0 - slope * r, dropped=[C] if r == 3 else (), reasons=drops if r == 3 else None))
        histories[name] = m.history()
    store_all(dht, swarm.history_key(RUN), {
        **histories, "junk": {"rows": [["one", "applied"]], "drops": [], "t": 1.0},
        "huge": {**histories["A"], "rows": histories["A"]["rows"] * 13},
    })
    return dht, loop


def test_collect_joins_records_and_skips_malformed_ones(swarm_in_dht):
    dht, loop = swarm_in_dht
    view = loop.call(collect(dht, RUN, 5.0), 20)
    assert view["errors"] == [] and view["spec_error"] == ""
    assert view["spec"]["model"] == "tiny" and view["spec"]["hash"] == SPEC.hash() and view["spec"]["origin"] == A
    assert "model_config" not in view["spec"]
    peers = {p["peer_id"]: p for p in view["peers"]}
    stale, evil = KEYS["stale"].peer_id, KEYS["evil"].peer_id
    assert set(peers) == {A, B, C, stale, evil}, "the record with an unknown phase and the unsigned one are skipped"
    assert [p["peer_id"] for p in view["peers"]][:3] == sorted([A, B, evil]), "live peers first, by id"
    assert peers[A]["live"] and peers[A]["steps_per_s"] == 3.5 and peers[A]["samples_per_s"] == 52.5
    assert peers[A]["weight"] == 13.0 and peers[A]["last_round"] == 4 and peers[A]["loss"] == 3.0
    assert peers[B]["live"] and peers[B]["client"] and peers[B]["addr"] == ""
    assert peers[C]["left"] and not peers[C]["live"]
    assert not peers[stale]["live"] and peers[stale]["age_s"] > 15
    assert peers[evil]["live"] and not peers[evil]["spec_ok"]
    assert view["skipped"] == 5, "two peer records (malformed, unsigned), two history records, one unsigned spec"
    assert set(view["history"]) == {A, B} and [r["round"] for r in view["history"][A]] == [0, 1, 2, 3, 4]
    assert view["history"][B][2] == {"round": 2, "outcome": "applied", "loss": 4.5, "eval_loss": 4.6, "weight": 13.0,
                                     "samples_per_s": 52.5, "group_size": 3, "global_samples": 480, "time": 1002.0}
    assert view["drops"] == [
        {"round": 3, "peer": C, "reason": "sent nothing within 12 s", "seen_by": [A]},
        {"round": 3, "peer": C, "reason": "unknown", "seen_by": [B]},   # no drop_reasons in B's rows yet
    ]
    assert view["summary"] == {"live_peers": 2, "serving": 1, "round": 4, "global_samples": 800,
                               "samples_per_s": 105.0}, "the peer of another spec does not count"
    json.dumps(view, allow_nan=False)


def test_a_run_nobody_is_in_is_empty_and_says_so(swarm_in_dht):
    dht, loop = swarm_in_dht
    view = loop.call(collect(dht, "nobody-here", 5.0), 20)
    assert (view["spec"], view["peers"], view["history"], view["drops"], view["errors"]) == (None, [], {}, [], [])
    assert "nobody is in run nobody-here" in format_view(view)


def test_a_dht_that_does_not_answer_is_an_error_in_the_view(swarm_in_dht):
    dht, loop = swarm_in_dht

    os.kill(dht.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        view = loop.call(collect(dht, RUN, 1.0), 20)
    finally:
        os.kill(dht.pid, signal.SIGCONT)
    assert time.monotonic() - started < 5, "the three reads run together under one deadline"
    assert len(view["errors"]) == 3 and all("did not answer within 1.0 s" in e for e in view["errors"])
    assert "warning: reading sv-run.peers from the DHT" in format_view(view)


# ---- the history record ------------------------------------------------------------------------
def good_history() -> dict:
    m = Monitor()
    for r in range(3):
        m.observe(metrics_row(r, 4.0, dropped=[C] if r == 1 else ()))
    return m.history()


def test_monitor_keeps_the_last_rounds_and_drops_bounded():
    m = Monitor()
    for r in range(swarm.HISTORY_ROUNDS + 15):
        reasons = {f"peer{i}": "x" * 500 for i in range(40)} if r % 2 else None
        m.observe(metrics_row(r, float("nan") if r == 70 else 1.0, reasons=reasons))
    value = m.history()
    assert len(value["rows"]) == swarm.HISTORY_ROUNDS and value["rows"][0][0] == 15
    assert value["rows"][70 - 15][2] is None, "a NaN loss is published as null"
    assert len(value["drops"]) == swarm.DROP_ROUNDS and value["drops"][-1][0] == 73
    assert all(len(d) == swarm.MAX_DROPS_PER_ROUND and all(len(w) == swarm.MAX_REASON_CHARS for w in d.values())
               for _, d in value["drops"])
    assert swarm.parse_history(A, value) is not None
    assert len(json.dumps(value)) < 64 * 1024, "the record stays small"


def test_round_drops_use_the_reasons_when_the_row_has_them():
    assert swarm.round_drops({"dropped": [C, A]}) == {A: "unknown", C: "unknown"}
    assert swarm.round_drops({"dropped": [C], "drop_reasons": {C: "timeout"}}) == {C: "timeout"}
    assert swarm.round_drops({"dropped": []}) == {}


def _with(path: str, value):
    v = good_history()
    if path == "rows.0.0":
        v["rows"][0][0] = value
    elif path.startswith("rows.0."):
        v["rows"][0][int(path.split(".")[-1])] = value
    elif path == "drops.0.1":
        v["drops"][0][1] = value
    else:
        v[path] = value
    return v


@pytest.mark.parametrize("value", [
    None, 7, "rows", [], {"rows": []}, {"rows": [], "drops": []},
    _with("rows", "not a list"), _with("rows", [[1, 2, 3]]), _with("rows.0.0", -1), _with("rows.0.0", True),
    _with("rows.0.0", 1.5), _with("rows.0.1", "won"), _with("rows.0.1", ["applied"]), _with("rows.0.2", math.nan),
    _with("rows.0.3", "4.0"), _with("rows.0.4", -1.0), _with("rows.0.5", math.inf), _with("rows.0.6", None),
    _with("rows.0.8", "noon"), _with("rows", good_history()["rows"] * 21), _with("t", "now"),
    _with("drops", [[1, {C: "x"}]] * (swarm.DROP_ROUNDS + 1)), _with("drops", [[1]]), _with("drops.0.1", [C]),
    _with("drops.0.1", {C: "x" * (swarm.MAX_REASON_CHARS + 1)}), _with("drops.0.1", {"": "x"}),
    _with("drops.0.1", {C: 3}), _with("drops.0.1", {f"p{i}": "x" for i in range(swarm.MAX_DROPS_PER_ROUND + 1)}),
])
def test_a_malformed_history_record_is_skipped(value):
    assert swarm.parse_history("stranger", value) is None


def test_a_good_history_record_reads_back():
    parsed = swarm.parse_history(A, good_history())
    assert [r["round"] for r in parsed["rows"]] == [0, 1, 2]
    assert parsed["drops"] == [{"round": 1, "peer": C, "reason": "unknown"}]


# ---- the table ------------------------------------------------------------------------------
def test_table_aligns_columns():
    lines = table(["A", "NUMBER", "Z"], [["long cell", "1", "z"], ["x", "12,345", ""]], {1})
    assert lines == ["A          NUMBER  Z", "long cell       1  z", "x          12,345"]


def test_format_view_lists_peers_rounds_and_drops(swarm_in_dht):
    dht, loop = swarm_in_dht
    view = loop.call(collect(dht, RUN, 5.0), 20)
    text = format_view(view)
    lines = text.splitlines()
    assert lines[0].startswith(f"run {RUN}: model tiny, codec fp32, 40 target steps") and SPEC.hash() in lines[0]
    assert "2 live peers (1 serving, 2 gone), swarm round 4, 800 global samples" in lines[1]
    assert "(5 records in the DHT ignored: malformed, unsigned, or not of this private run)" in text
    header = next(line for line in lines if line.startswith("PEER"))
    row_a = next(line for line in lines if line.startswith(A[-6:]))
    assert re.split(r"\s{2,}", row_a)[:7] == [A[-6:], "train", "4", "4", "3.5", "52.5", "13"]
    assert header.index("ROUND") + len("ROUND") == row_a.index(" 4 ") + 2, "numbers right-aligned under the header"
    assert "client" in next(line for line in lines if line.startswith(B[-6:]))
    assert "left" in next(line for line in lines if line.startswith(C[-6:]))
    assert "(other spec)" in text and "\x1b" not in text
    drops = lines[lines.index("dropped in recent rounds:") + 1:]
    assert drops[1].split(None, 2)[:2] == ["3", C[-6:]] and "sent nothing within 12 s" in drops[1]


def test_format_view_removes_control_characters():
    view = {"run_id": "r", "spec": None, "spec_error": "", "errors": [], "skipped": 0, "drops": [],
            "summary": {"live_peers": 1, "serving": 1, "round": 1, "global_samples": 1, "samples_per_s": 1.0},
            "peers": [{"peer_id": "p\x1b[2J1234", "live": True, "left": False, "phase": "train", "round": 1,
                       "state_round": 1, "steps_per_s": 1.0, "samples_per_s": None, "weight": None, "loss": None,
                       "eval_loss": None, "client": False, "addr": "\x1b]0;title\x07h:1", "age_s": 0.5,
                       "spec_ok": True}]}
    text = format_view(view)
    assert "\x1b" not in text and "\x07" not in text and "?]0;title?h:1" in text


# ---- the page, served in-process -----------------------------------------------------------------
@pytest.fixture(scope="module")
def page(dht_loop):
    dht, loop = dht_loop
    web = WebServer()
    add_routes(web, dht, RUN)
    port = loop.call(web.start("127.0.0.1", 0), 10)
    yield f"http://127.0.0.1:{port}"
    loop.call(web.stop(), 10)


def test_api_swarm_is_the_view_and_refuses_a_bad_run_id(page, swarm_in_dht):
    with urllib.request.urlopen(f"{page}/api/swarm", timeout=20) as r:
        view = json.loads(r.read())
    assert view["run_id"] == RUN and view["default_run"] == RUN and len(view["peers"]) == 5
    with urllib.request.urlopen(f"{page}/api/swarm?run=nobody-here", timeout=20) as r:
        assert json.loads(r.read())["peers"] == []
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{page}/api/swarm?run=a%2Fb", timeout=20)
    assert e.value.code == 400 and "is not a run id" in json.loads(e.value.read())["error"]
    with urllib.request.urlopen(page, timeout=20) as r:
        html = r.read().decode()
    assert r.headers["Content-Type"].startswith("text/html")
    assert not re.search(r"(src|href)=\"?(https?:)?//", html), "the page loads nothing from elsewhere"


def test_the_page_shows_the_peers_and_escapes_strangers_strings(page, swarm_in_dht):
    dom = chromium.dump_dom(page + "/")
    assert "Nobody is in run" not in dom
    for pid in (A, B, C):
        assert f'title="{pid}"' in dom, f"{pid} is not in the peers table"
    assert "<img" not in dom and "<script>document" not in dom, "a string from the DHT became markup"
    assert "&lt;img src=x onerror=" in dom and "&lt;script&gt;document.title='pwned'" in dom
    assert "<title>sv-run · diloco-p2p swarm</title>" in dom
    assert set(chromium.line_colors(dom)) == {A, B}, "one loss line per peer with a history"
    assert "sent nothing within 12 s" in dom and "5 record(s) in the DHT were ignored (malformed" in dom
    empty = chromium.dump_dom(page + "/?run=nobody-here")
    assert "Nobody is in run \"nobody-here\"" in empty or "Nobody is in run &quot;nobody-here&quot;" in empty


def test_the_page_screenshot_shows_a_line_per_peer(page, swarm_in_dht, tmp_path):
    dom = chromium.dump_dom(page + "/")
    png = chromium.screenshot(page + "/", tmp_path / "page.png")
    counts = chromium.check_screenshot(png, dom)
    assert set(counts) == {A, B}


# ---- peer status: flags and an unreachable DHT -------------------------------------------------
SOME_PEER_ID = "QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"


def peer_status(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peer.cli", "status", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, env, needle", [
    ([], {}, "--initial-peers is required"),
    (["--initial-peers", "not-an-address"], {}, "argument --initial-peers: 'not-an-address' is not a multiaddr"),
    (["--initial-peers", "/ip4/127.0.0.1/tcp/1"], {}, "has no /p2p/<peer id> part"),
    ([], {"DILOCO_INITIAL_PEERS": "/ip4/127.0.0.1/tcp/1"}, "DILOCO_INITIAL_PEERS: '/ip4/127.0.0.1/tcp/1' has no"),
    ([f"--initial-peers=/ip4/127.0.0.1/tcp/1/p2p/{SOME_PEER_ID}", "--run-id", "a/b"], {},
     "argument --run-id: 'a/b' is not a run id"),
    ([f"--initial-peers=/ip4/127.0.0.1/tcp/1/p2p/{SOME_PEER_ID}", "--timeout-s", "0"], {},
     "argument --timeout-s: '0' is not a number of seconds"),
    ([f"--initial-peers=/ip4/127.0.0.1/tcp/1/p2p/{SOME_PEER_ID}", "--jsn"], {}, "unrecognized arguments: --jsn"),
])
def test_peer_status_bad_flags_exit_2_naming_the_flag(args, env, needle):
    p = peer_status(*args, env={"DILOCO_INITIAL_PEERS": "", **env})
    assert p.returncode == 2 and needle in p.stderr and p.stdout == "", p.stderr


def test_peer_status_says_when_the_dht_cannot_be_reached():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # closed once the block ends: nothing listens there
    p = peer_status("--initial-peers", f"/ip4/127.0.0.1/tcp/{port}/p2p/{SOME_PEER_ID}", "--timeout-s", "3")
    assert p.returncode == 1, p.stderr[-2000:]
    assert "peer status: cannot reach the DHT" in p.stderr and f"connection refused at 127.0.0.1:{port}" in p.stderr
