"""`peer status --initial-peers X [--run-id R] [--json]`: the swarm of a run as a table, read from
the DHT (`swarmview.collect`, the same view as the swarm page). Joins the DHT as a client (no
inbound connections, no records written), reads, prints, leaves. Exit status: 0 printed (also
for a run nobody is in, which it says), 1 the DHT could not be reached or did not answer,
2 a bad flag."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from peer import argtypes
from peer.config import EXIT_CONFIG, EXIT_CRASH, EXIT_OK, MADDR

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_CONFIG, f"peer status: error: {message} (see peer status --help)\n")


def _maddr(value: str) -> str:
    """Checked as `peer` checks its flags, before anything heavy is imported (create_dht parses it)."""
    if MADDR.match(value) is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a multiaddr; expected something like "
                                         "/ip4/203.0.113.1/tcp/31337/p2p/<peer id>")
    if "/p2p/" not in value:
        raise argparse.ArgumentTypeError(f"{value!r} has no /p2p/<peer id> part; expected something like "
                                         "/ip4/203.0.113.1/tcp/31337/p2p/<peer id>")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="peer status", description=__doc__.split("\n\n")[0])
    p.add_argument("--initial-peers", nargs="+", type=_maddr, default=None,
                   help="multiaddrs of a bootstrap node or any peer of the run (env DILOCO_INITIAL_PEERS)")
    p.add_argument("--run-id", type=argtypes.run_id, default=os.environ.get("DILOCO_RUN_ID", "diloco"),
                   help="the run to show (default: diloco, as peers; env DILOCO_RUN_ID)")
    p.add_argument("--json", action="store_true", help="print the raw view (the page's /api/swarm) as JSON")
    p.add_argument("--timeout-s", type=argtypes.seconds(600), default=15.0,
                   help="give up joining the DHT after this many seconds (default: 15); each read then gets 5 s")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


# ---- the table ------------------------------------------------------------------------------
def _num(x: Any, digits: int = 0) -> str:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or x != x:
        return "-"
    return f"{x:,.{digits}f}"


def _ago(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    return f"{s:.1f} s" if s < 60 else f"{s / 60:.0f} min" if s < 3600 else f"{s / 3600:.1f} h"


def table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Plain aligned text: columns as wide as their widest cell, those in `right` right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = []
    for row in [headers, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _clean(text: Any) -> str:
    """A stranger's string made safe for a terminal: no control characters (escape sequences)."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))


def format_view(view: dict[str, Any]) -> str:
    """The view as `peer status` prints it."""
    run, spec, summary = _clean(view["run_id"]), view.get("spec"), view.get("summary") or {}
    lines = []
    if spec:
        model = f"hf {spec['model_hash']}" if spec["model"] == "hf" else spec["model"]
        lines.append(f"run {run}: model {_clean(model)}, codec {_clean(spec['codec'])}, "
                     f"{spec['target_steps']} target steps, max round {spec['max_round_seconds']:g} s, weighting "
                     f"{_clean(spec['weighting'])}"
                     + (f", aggregator {_clean(spec['aggregator'])}" if spec.get("aggregator", "mean") != "mean" else "")
                     + f" (spec {spec['hash']}, started by {_clean(spec['origin'])[-6:]})")
    else:
        lines.append(f"run {run}: {_clean(view.get('spec_error') or 'no spec in the DHT')}")
    for error in view.get("errors") or []:
        lines.append(f"warning: {_clean(error)}")
    peers = view.get("peers") or []
    if not peers and not spec and not view.get("errors"):
        lines.append(f"nobody is in run {run}: no spec and no peer record in the DHT; check --run-id "
                     "(each peer logs its run when it starts)")
        return "\n".join(lines)
    gone = sum(1 for p in peers if not p["live"])
    lines.append(f"{summary.get('live_peers', 0)} live peers ({summary.get('serving', 0)} serving"
                 f"{f', {gone} gone' if gone else ''}), swarm round {_num(summary.get('round'))}, "
                 f"{_num(summary.get('global_samples'))} global samples, {_num(summary.get('samples_per_s'), 1)} "
                 "samples/s")
    if view.get("skipped"):
        lines.append(f"({view['skipped']} records in the DHT ignored: malformed, unsigned, or not of this private run)")
    if peers:
        rows = [[_clean(p["peer_id"])[-6:], "left" if p["left"] else p["phase"] if p["live"] else "gone",
                 _num(p["round"]), _num(p["state_round"]), _num(p["steps_per_s"], 1), _num(p["samples_per_s"], 1),
                 _num(p["weight"]), _num(p["loss"], 4), _num(p["eval_loss"], 4),
                 ("client" if p["client"] else "serving") + ("" if p["spec_ok"] else " (other spec)"),
                 _clean(p["addr"]) or "-", _ago(p["age_s"])] for p in peers]
        lines += ["", *table(["PEER", "PHASE", "ROUND", "STATE", "STEPS/S", "SAMPLES/S", "WEIGHT", "LOSS", "EVAL",
                              "ROLE", "ADDRESS", "SEEN"], rows, {2, 3, 4, 5, 6, 7, 8, 11})]
    drops = view.get("drops") or []
    if drops:
        lines += ["", "dropped in recent rounds:"]
        lines += ["  " + line for line in table(
            ["ROUND", "PEER", "WHY", "REPORTED BY"],
            [[str(d["round"]), _clean(d["peer"])[-6:], _clean(d["reason"]),
              ", ".join(_clean(p)[-6:] for p in d["seen_by"])] for d in drops], {0})]
    return "\n".join(lines)


# ---- the command ----------------------------------------------------------------------------
def read_view(initial_peers: list[str], run_id: str, timeout_s: float) -> dict[str, Any]:
    """Joins the DHT as a client, collects the view, leaves. DHTStartError when it cannot join."""
    from peer.dht import create_dht
    from peer.net.loop import NetLoop
    from peer.swarmview import READ_TIMEOUT_S, collect

    dht = create_dht(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=True,
                     startup_timeout_s=timeout_s)
    loop = NetLoop("status")
    try:
        loop.start()
        return loop.call(collect(dht, run_id, READ_TIMEOUT_S), READ_TIMEOUT_S + 5)
    finally:
        loop.stop()
        dht.shutdown()


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags, checked (a bad one exits 2 naming it); --initial-peers may come from the env."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.initial_peers is None:
        try:
            args.initial_peers = [_maddr(a) for a in os.environ.get("DILOCO_INITIAL_PEERS", "").split()]
        except argparse.ArgumentTypeError as e:
            parser.error(f"DILOCO_INITIAL_PEERS: {e}")
    if not args.initial_peers:
        parser.error("--initial-peers is required: the multiaddr of a bootstrap node or of any peer of the run "
                     "(each prints it in its 'Join through:' lines)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from peer.dht import DHTStartError
    from peer.logs import setup_logging
    from peer.web import jsonable

    setup_logging(args.log_level)
    started = time.monotonic()
    try:
        view = read_view(args.initial_peers, args.run_id, args.timeout_s)
    except DHTStartError as e:
        print(f"peer status: cannot reach the DHT: {e}", file=sys.stderr)
        return EXIT_CRASH
    except ValueError as e:  # flags that parse but do not work together
        print(f"peer status: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    log.info("read the view of run %s in %.1f s", args.run_id, time.monotonic() - started)
    print(json.dumps(jsonable(view), indent=1) if args.json else format_view(view), flush=True)
    if view["errors"]:
        print(f"peer status: the DHT did not answer every read: {'; '.join(view['errors'])}", file=sys.stderr)
        return EXIT_CRASH
    return EXIT_OK
