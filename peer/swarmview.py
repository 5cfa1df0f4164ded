"""The swarm as the DHT tells it: `collect` reads a run's spec, peer records and history records
under one deadline and joins them into one plain dict, the view that `GET /api/swarm`, the swarm
page (`GET /`) and `peer status` all show. Runs on an asyncio loop (the network loop, the
bootstrap's web loop or `peer status`'s own); never blocks it. Everything read comes from
strangers: malformed records are counted and skipped, strings are cut to a bound, and the page
escapes what it shows."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peer.config import RUN_ID, RUN_ID_RULE, IncompatibleRunError, RunSpec
from peer.net import swarm

if TYPE_CHECKING:
    import hivemind

    from peer.web import WebServer

READ_TIMEOUT_S = 5.0   # each of the three DHT reads; they run together
MAX_DROPS = 50         # drop entries in a view (the newest rounds first)
MAX_ADDR_CHARS = 100
PAGE = Path(__file__).with_name("swarm_page.html")


async def collect(dht: hivemind.DHT, run_id: str, timeout_s: float = READ_TIMEOUT_S) -> dict[str, Any]:
    """The view of run `run_id`: `{run_id, time, spec, spec_error, peers, history, drops, summary,
    skipped, errors}`. A read that fails or times out leaves its part empty and says why in
    `errors` (all three failing: the DHT did not answer). Takes at most about timeout_s."""
    keys = {"spec": swarm.spec_key(run_id), "peers": swarm.peers_key(run_id), "history": swarm.history_key(run_id)}
    got = await asyncio.gather(*(swarm.read_counted(dht, key, timeout_s) for key in keys.values()),
                               return_exceptions=True)
    raw: dict[str, dict[str, Any]] = {}
    errors, unsigned = [], 0
    for (name, key), value in zip(keys.items(), got, strict=True):
        if isinstance(value, asyncio.CancelledError):
            raise value
        if isinstance(value, BaseException):
            errors.append(f"reading {key} from the DHT: {str(value) or type(value).__name__}")
            value = {}, 0
        raw[name] = value[0]
        unsigned += value[1]   # subkeys nobody signed as a peer
    spec, spec_error = spec_summary(raw["spec"])
    history, bad_history = _histories(raw["history"])
    peers, bad_peers = _peers(raw["peers"], history, spec)
    return {"run_id": run_id, "time": time.time(), "spec": spec, "spec_error": spec_error, "peers": peers,
            "history": {p: h["rows"] for p, h in history.items()}, "drops": _drops(history),
            "summary": _summary(peers, history), "skipped": bad_peers + bad_history + unsigned, "errors": errors}


def spec_summary(proposals: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The run's spec fields (without the model's config JSON) with its hash, origin and creation
    time, or None and why not ("" when the run has no spec record at all)."""
    winner = swarm.winning_spec(proposals)
    if winner is None:
        return None, "the run's spec records are malformed" if proposals else ""
    try:
        spec = RunSpec.from_record(winner["spec"])
    except (IncompatibleRunError, KeyError) as e:
        return None, f"the run's spec cannot be read: {e}"
    fields = {k: v for k, v in spec.to_record().items() if k != "model_config"}
    return {**fields, "hash": spec.hash(), "origin": winner["origin"][:swarm.MAX_ID_CHARS],
            "created": float(winner["created"])}, ""


def _histories(raw: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], int]:
    out, bad = {}, 0
    for pid, value in raw.items():
        parsed = swarm.parse_history(pid, value) if 0 < len(pid) <= swarm.MAX_ID_CHARS else None
        if parsed is None:
            bad += 1
        else:
            out[pid] = parsed
    return dict(sorted(out.items())), bad


def _peers(raw: dict[str, Any], history: dict[str, dict[str, Any]],
           spec: dict[str, Any] | None) -> tuple[list[dict[str, Any]], int]:
    peers, bad = [], 0
    for pid, value in sorted(raw.items()):
        rec = swarm.PeerRecord.parse(pid, value) if 0 < len(pid) <= swarm.MAX_ID_CHARS else None
        if rec is None:
            bad += 1
            continue
        rows = history.get(pid, {}).get("rows") or [{}]
        last = rows[-1]
        left = not rec.addr and not rec.client   # a stopping peer's last record has no address
        peers.append({
            "peer_id": pid, "addr": rec.addr[:MAX_ADDR_CHARS], "client": rec.client, "phase": rec.phase,
            "round": rec.round, "state_round": rec.state_round, "steps": rec.steps, "samples": rec.samples,
            "steps_per_s": rec.rate, "age_s": max(0.0, rec.age_s()), "live": rec.fresh() and not left,
            "left": left, "spec_ok": spec is None or rec.spec == spec["hash"],
            "samples_per_s": last.get("samples_per_s"), "weight": last.get("weight"), "loss": last.get("loss"),
            "eval_loss": last.get("eval_loss"), "last_round": last.get("round"), "outcome": last.get("outcome"),
        })
    peers.sort(key=lambda p: (not p["live"], p["peer_id"]))
    return peers, bad


def _drops(history: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Who was dropped in the peers' recent rounds and why, one entry per (round, dropped peer,
    reason) with the peers that reported it; newest rounds first."""
    seen: dict[tuple[int, str, str], list[str]] = {}
    for reporter, h in history.items():
        for d in h["drops"]:
            seen.setdefault((d["round"], d["peer"], d["reason"]), []).append(reporter)
    ordered = sorted(seen.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2]))
    return [{"round": r, "peer": p, "reason": why, "seen_by": sorted(by)} for (r, p, why), by in ordered[:MAX_DROPS]]


def _summary(peers: list[dict[str, Any]], history: dict[str, dict[str, Any]]) -> dict[str, Any]:
    live = [p for p in peers if p["live"] and p["spec_ok"]]
    last_rows = [h["rows"][-1] for h in history.values() if h["rows"]]
    return {"live_peers": len(live), "serving": sum(1 for p in live if not p["client"]),
            "round": max((max(p["round"], p["state_round"]) for p in live), default=None),
            "global_samples": max((r["global_samples"] for r in last_rows), default=None),
            "samples_per_s": sum(p["samples_per_s"] or 0.0 for p in live if p["phase"] != swarm.SYNC)}


def add_routes(web: WebServer, dht: hivemind.DHT, default_run: str) -> None:
    """`GET /` (the page) and `GET /api/swarm?run=R` (the view of run R, else `default_run`)."""
    from aiohttp import web as aio

    page = PAGE.read_text()

    async def index(_request: aio.Request) -> str:
        return page

    async def api(request: aio.Request) -> Any:
        run_id = request.query.get("run") or default_run
        if RUN_ID.fullmatch(run_id) is None:
            return aio.json_response({"error": f"run {run_id[:80]!r} is not a run id: {RUN_ID_RULE}"}, status=400)
        view = await collect(dht, run_id)
        return {**view, "default_run": default_run}

    web.add_text("/", index, "text/html; charset=utf-8")
    web.add_json("/api/swarm", api)
