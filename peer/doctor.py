"""`peer doctor --initial-peers X [--run-id R] [--port P ...]`: can this machine join the run?

It starts what a peer starts (a DHT node, a gRPC server on the ports the peer would use) but
joins no round and publishes no record. Then it checks, each check one line with what to do
when it fails:
  DHT       joined through the initial peers, and how many DHT peers it sees
  run       the run's spec in the DHT (protocol, model, codec, target) and its live peers
  gRPC port another peer dials our announced gRPC address back (DialBack)
  DHT port  ... and connects to our DHT port
  clock     skew against the swarm's peers (Health's clock, at the midpoint of the call)
  link      download and upload rate to one peer, against one round's update of the run
  secret    (only when it fails) a private run's peers refused our calls: no secret, or another
and prints a verdict. Exit status 0 when nothing failed, 1 when a check failed, 2 for a bad flag."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass

from peer import argtypes
from peer.config import EXIT_CONFIG, EXIT_CRASH, EXIT_OK

log = logging.getLogger(__name__)
SKEW_WARN_S, SKEW_FAIL_S = 1.0, 3.0   # hivemind assumes clocks within 3 s; records are fresh for 6 s
LINK_TEST_S = 3.0                      # each direction streams for at most this long ...
LINK_TEST_BYTES = 32 << 20             # ... or this many bytes
DIAL_PEERS = 3                         # ask up to this many peers to dial us back
PASS, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"


@dataclass
class Check:
    name: str
    status: str      # PASS, WARN, FAIL or SKIP
    line: str        # what was seen
    fix: str = ""    # what to do (FAIL and WARN)

    def render(self) -> str:
        text = f"[{self.status:>4}] {self.name:<9} {self.line}"
        return text + (f"\n{'':17}fix: {self.fix}" if self.fix else "")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peer doctor", description="Check that this machine can join a run: DHT, "
                                "the run's spec, our ports from outside, clock skew, link rate; prints a verdict.")
    p.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of a bootstrap node or any peer")
    p.add_argument("--run-id", default="diloco", help="the run to check against (default diloco)")
    p.add_argument("--host", default="0.0.0.0", help="interface the gRPC server would listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=0, help="the gRPC port the peer would use (0: any free port)")
    p.add_argument("--announce-addr", default="", help="host:port the peer would announce for gRPC")
    p.add_argument("--dht-host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"],
                   help="where the peer's DHT node would listen")
    p.add_argument("--dht-announce-maddrs", nargs="+", default=[], help="the DHT addresses the peer would announce")
    p.add_argument("--client-mode", action="store_true", help="check as a client-mode peer (no inbound needed)")
    p.add_argument("--timeout-s", type=argtypes.seconds(600), default=30.0,
                   help="how long joining the DHT may take (default 30)")
    p.add_argument("--run-secret-file", default="", help="a private run: its secret's file, as the peer's "
                   "(or DILOCO_RUN_SECRET); without it a private run's peers refuse the doctor's calls")
    for name, text in (("cert", "this peer's certificate"), ("key", "its key"), ("ca", "the run's CA certificate")):
        p.add_argument(f"--tls-{name}", default="", help=f"a TLS run: {text} (as the peer's --tls-{name})")
    return p


def main(argv: list[str]) -> int:
    parser = _parser()
    parser.exit = lambda status=0, message=None: (sys.stderr.write(message or ""), sys.exit(  # type: ignore
        EXIT_CONFIG if status else 0))
    args = parser.parse_args(argv)
    from peer.cli import _read_secret_file
    from peer.config import ConfigError, PeerConfig, validate_peer

    try:
        secret = os.environ.get("DILOCO_RUN_SECRET", "")
        if args.run_secret_file:
            secret = _read_secret_file(args.run_secret_file, bool(secret))
        cfg = PeerConfig(run_id=args.run_id, initial_peers=tuple(args.initial_peers), host=args.host, port=args.port,
                         announce_addr=args.announce_addr, dht_host_maddrs=tuple(args.dht_host_maddrs),
                         dht_announce_maddrs=tuple(args.dht_announce_maddrs), client_mode=args.client_mode,
                         tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, run_secret=secret)
        validate_peer(cfg)
        if cfg.tls_ca:   # checked as the peer checks them; the gRPC server and channels then speak TLS
            from peer.tlsfiles import load

            load(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
    except ConfigError as e:
        print(f"peer doctor: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from peer.logs import setup_logging

    setup_logging("WARNING")
    checks = run(cfg, args.timeout_s)
    for c in checks:
        print(c.render(), flush=True)
    print(verdict(checks, cfg), flush=True)
    return EXIT_CRASH if any(c.status == FAIL for c in checks) else EXIT_OK


def verdict(checks: list[Check], cfg) -> str:
    failed = [c for c in checks if c.status == FAIL]
    if not failed:
        role = "a client-mode peer" if cfg.client_mode else "a serving peer"
        warned = [c.name for c in checks if c.status == WARN]
        return f"verdict: OK, this machine can join run {cfg.run_id} as {role}" + (
            f" (see the warnings: {', '.join(warned)})" if warned else "")
    if all(c.name in ("gRPC port", "DHT port") for c in failed) and not cfg.client_mode:
        return ("verdict: NOT REACHABLE from outside: open the port(s) named above, or join with --client-mode "
                "(sends and fetches, owns no shard; a peer that finds itself unreachable switches to it anyway)")
    return f"verdict: FAIL ({', '.join(c.name for c in failed)}): fix the lines marked FAIL above"


def run(cfg, timeout_s: float) -> list[Check]:
    """All checks, in order; a check that cannot run says why (SKIP) and the rest still run."""
    from peer.dht import DHTStartError, count_dht_peers, create_dht

    checks: list[Check] = []
    t = time.monotonic()
    from peer.identity import Identity

    identity = Identity.generate()   # the doctor is not the peer: a key of its own, so it never takes the peer's id
    try:
        dht = create_dht(initial_peers=list(cfg.initial_peers), host_maddrs=list(cfg.dht_host_maddrs),
                         announce_maddrs=list(cfg.dht_announce_maddrs) or None, client_mode=cfg.client_mode,
                         startup_timeout_s=timeout_s, identity=identity)
    except (ValueError, DHTStartError) as e:
        return [Check("DHT", FAIL, str(e), "check the address (the bootstrap prints its `Join through:` lines), "
                      "that it runs, and that this machine reaches its TCP port")]
    try:
        try:
            n = count_dht_peers(dht, 5.0, refresh=True)
        except Exception:  # the count is only a detail
            n = -1
        from peer.net.auth import AuthRefused, derived_key

        dht.member_key = derived_key(cfg.run_secret, "member")   # reads a private run's members' records only
        checks.append(Check("DHT", PASS, f"joined in {time.monotonic() - t:.1f} s"
                            + (f"; {n} other DHT peer(s) in the routing table" if n >= 0 else "")))
        from peer.net.node import Node

        node = Node(cfg, dht, identity)   # the gRPC server and the address a peer with these flags would announce
        try:
            node.start()
            checks += node.net.call(_network_checks(node), 120)
        except AuthRefused as e:   # a private run's peer refused our calls: no secret, or another
            checks.append(Check("secret", FAIL, str(e), "pass the run's secret: --run-secret-file PATH or "
                                "DILOCO_RUN_SECRET"))
        finally:
            node.stop()
    finally:
        dht.shutdown()
    return checks


async def _network_checks(node) -> list[Check]:
    from peer.config import PROTOCOL_VERSION, RunSpec, tls_conflict
    from peer.net import reach, swarm

    core, cfg, dht = node.core, node.cfg, node.dht
    checks: list[Check] = []
    spec = None
    try:
        proposals = await swarm.read(dht, swarm.spec_key(cfg.run_id), 10.0)
    except TimeoutError as e:
        proposals = {}
        checks.append(Check("run", FAIL, f"reading the run's spec: {e}", "the DHT is slow or partitioned; try again"))
    valid = [v for v in proposals.values() if isinstance(v, dict) and isinstance(v.get("created"), (int, float))]
    if valid:
        record = min(valid, key=lambda v: (v["created"], str(v.get("origin"))))
        try:
            spec = RunSpec.from_record(record.get("spec"))
        except Exception as e:
            checks.append(Check("run", FAIL, f"run {cfg.run_id}: {e}",
                                f"install the diloco-p2p version the run uses (this one speaks protocol "
                                f"{PROTOCOL_VERSION}) or pick another --run-id"))
    elif not checks:
        checks.append(Check("run", WARN, f"no run named {cfg.run_id!r} in the DHT",
                            "a peer started with this --run-id starts the run; check the name if you meant to join one"))
    try:
        view = await swarm.read_peers(dht, cfg.run_id, 5.0)
    except TimeoutError:
        view = {}
    live = [r for r in view.values() if r.fresh() and r.peer_id != core.peer_id
            and (spec is None or r.spec == spec.hash())]
    serving = reach.others_first([r for r in live if r.addr and not r.client], core.address)
    tls = spec and tls_conflict(spec, RunSpec(tls_ca=core.tls.ca_sha256 if core.tls else ""))
    if tls:   # every call below would fail at the TLS handshake
        checks.append(Check("run", FAIL, f"{cfg.run_id}: {tls[1]}", "pass the --tls-* files a peer of the run "
                            "uses (or none for a run without TLS)"))
        return checks + [Check(name, SKIP, "the run's TLS does not fit") for name in ("gRPC port", "DHT port",
                                                                                    "clock", "link")]
    if spec is not None:
        model = spec.model if spec.model != "hf" else f"hf {spec.model_hash}"
        checks.append(Check("run", PASS, f"{cfg.run_id}: model {model}, codec {spec.codec}, target {spec.target_steps} "
                            f"steps, {len(live)} live peer(s) ({len(serving)} serving)"))
    if not serving:
        for name in ("gRPC port", "DHT port", "clock", "link"):
            checks.append(Check(name, SKIP, "no serving peer of the run to check against"))
        return checks
    if cfg.client_mode:
        checks.append(Check("gRPC port", SKIP, "client mode: no inbound connections needed"))
        checks.append(Check("DHT port", SKIP, "client mode: the DHT node accepts no inbound connections"))
    elif not core.address:
        checks.append(Check("gRPC port", FAIL, "no address of this machine routes to the initial peers",
                            "pass --announce-addr PUBLIC_IP:PORT, or use --client-mode"))
    else:
        checks += await _dial_back(core, serving, [core.dht_address] if core.dht_address else [])
    checks.append(await _clock(core, serving))
    checks.append(await _link(core, serving[0], spec))
    return checks


async def _dial_back(core, serving, dht_addresses: list[str]) -> list[Check]:
    import grpc

    from peer.net import reach
    from peer.net.client import describe_rpc_error

    asked: list[str] = []
    for rec in serving[:DIAL_PEERS]:
        try:
            reply = await reach.ask(core.channels, rec.addr, core.peer_id, core.address, dht_addresses)
        except grpc.aio.AioRpcError as e:
            asked.append(f"{rec.peer_id[-6:]}: {describe_rpc_error(e)}")
            continue
        return [_dial_check(r, rec.peer_id, reply.caller_host) for r in reply.results]
    return [Check("gRPC port", FAIL, "no peer answered our dial-back request: " + "; ".join(asked),
                  "the peers may run an older version; try again, or ask the run's operator")]


def _dial_check(result, by: str, seen_as: str) -> Check:
    from peer._proto import peer_pb2 as pb

    name = "gRPC port" if result.grpc else "DHT port"
    port = result.address.rsplit(":", 1)[-1]
    if result.status == pb.DialResult.OK:
        return Check(name, PASS, f"{result.address} reachable from peer {by[-6:]} ({result.ms:.0f} ms)")
    status = pb.DialResult.Status.Name(result.status).lower().replace("_", " ")
    what = f"{result.address} is not reachable from peer {by[-6:]}: {status}" + (
        f" ({result.detail})" if result.detail else "")
    if result.status == pb.DialResult.NOT_CALLER:
        fix = (f"the peer sees this machine as {seen_as}: announce that host ("
               + ("--announce-addr" if result.grpc else "--dht-announce-maddrs") + ")")
    elif result.grpc:
        fix = (f"open TCP port {port} inbound (firewall, router port forward, `-p {port}:{port}` in Docker) and "
               f"start the peer with --port {port} --announce-addr PUBLIC_IP:{port}; or use --client-mode")
    else:
        fix = (f"open TCP port {port} inbound and pass --dht-host-maddrs /ip4/0.0.0.0/tcp/{port} "
               f"--dht-announce-maddrs /ip4/PUBLIC_IP/tcp/{port}; or use --client-mode")
    return Check(name, FAIL, what, fix)


async def _clock(core, serving) -> Check:
    from peer.net import reach

    offsets = []
    for rec in serving[:5]:
        try:
            sample = await reach.clock_sample(core.channels.stub(rec.addr), 3.0)
        except Exception:  # a peer that does not answer says nothing about clocks
            continue
        if sample is not None:
            offsets.append(sample.offset_s)
    if not offsets:
        return Check("clock", SKIP, "no peer reported its clock (older versions do not)")
    skew = statistics.median(offsets)
    line = f"{skew:+.2f} s against {len(offsets)} peer(s) (median; hivemind assumes clocks within {SKEW_FAIL_S:.0f} s)"
    fix = "synchronise this machine's clock (`timedatectl set-ntp true`, chrony or ntpd)"
    if abs(skew) >= SKEW_FAIL_S:
        return Check("clock", FAIL, line, fix)
    if abs(skew) >= SKEW_WARN_S:
        return Check("clock", WARN, line, fix)
    return Check("clock", PASS, line)


async def _link(core, rec, spec) -> Check:
    """Download (GetState byte ranges of the peer's real state) and upload (LinkTest) rates to one peer."""
    from peer._proto import peer_pb2 as pb

    stub = core.channels.stub(rec.addr)
    try:
        down_bytes, down_s, header = await _download(stub, pb)
        up_bytes, up_s = await _upload(stub, pb)
    except Exception as e:
        detail = e.details() if hasattr(e, "details") else str(e)
        return Check("link", WARN, f"could not measure the link to peer {rec.peer_id[-6:]}: {detail}")
    down, up = down_bytes * 8 / max(down_s, 1e-6) / 1e6, up_bytes * 8 / max(up_s, 1e-6) / 1e6
    line = (f"to peer {rec.peer_id[-6:]}: down {down:.1f} Mbit/s ({down_bytes / 1e6:.1f} MB), up {up:.1f} Mbit/s "
            f"({up_bytes / 1e6:.1f} MB)")
    if spec is None or header is None:
        return Check("link", PASS, line)
    from peer.codecs import get_codec
    from peer.config import wire_codec

    update = get_codec(wire_codec(spec)).encoded_size(header.numel)
    # a round moves about one update each way per member (reduce-scatter up, all-gather down)
    each_s = max(update * 8 / max(up, 1e-6) / 1e6, update * 8 / max(down, 1e-6) / 1e6)
    took = f"{each_s:.1f} s" if each_s >= 1 else f"{each_s * 1000:.0f} ms"
    line += f"; one round's update ({spec.codec}, {update / 1e6:.2f} MB) takes about {took} each way"
    if each_s > spec.max_round_seconds:
        return Check("link", WARN, line, "this link moves one update slower than a round lasts: the peer will say it "
                     "cannot keep up (exit 4); use a faster link or a run with a smaller model / stronger codec")
    return Check("link", PASS, line)


async def _download(stub, pb):
    """Streams the peer's state (again and again, if it is small) for at most LINK_TEST_S or
    LINK_TEST_BYTES; (payload bytes, seconds, header). A state the peer replaced meanwhile (a
    short round) is followed to the one it holds now."""
    import grpc

    from peer.net.limits import PEER_RATE

    header, pinned, got, busy = None, "", 0, 0.0
    t0 = started = time.monotonic()
    while got < LINK_TEST_BYTES and time.monotonic() - t0 < LINK_TEST_S:
        # a small state is fetched many times: at most half the calls a second a peer allows one caller
        # (peer.net.limits), and only the seconds inside calls count, so the pauses lower no figure
        await asyncio.sleep(max(0.0, started + 2 / PEER_RATE - time.monotonic()))
        started = time.monotonic()
        call = stub.GetState(pb.StateRequest(min_round=0, requester="doctor", sha256=pinned), timeout=LINK_TEST_S + 10)
        try:
            async for chunk in call:
                if chunk.HasField("header"):
                    header, pinned = chunk.header, chunk.header.sha256
                got += len(chunk.data)
                if got >= LINK_TEST_BYTES or time.monotonic() - t0 > LINK_TEST_S:
                    break
        except grpc.aio.AioRpcError as e:
            if got and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                break   # the peer's limit for one caller: what was measured stands
            if not pinned or e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            pinned = ""  # the peer moved on to a newer state ("not held here any more"): measure on that one
        finally:
            call.cancel()
            busy += time.monotonic() - started
    return got, busy, header


async def _upload(stub, pb):
    """Streams random bytes to the peer's LinkTest for at most LINK_TEST_S; (bytes it got, its seconds)."""
    from peer.net.client import CHUNK_BYTES

    block = os.urandom(CHUNK_BYTES)
    t_end = time.monotonic() + LINK_TEST_S

    async def chunks():
        sent = 0
        while sent < LINK_TEST_BYTES and time.monotonic() < t_end:
            yield pb.LinkChunk(data=block)
            sent += len(block)
            await asyncio.sleep(0)

    reply = await stub.LinkTest(chunks(), timeout=LINK_TEST_S + 20)
    return reply.bytes, reply.seconds
