"""One validated configuration tree for a peer: the run spec (shared by the whole run) and
the per-peer settings. Frozen dataclasses; `ConfigError` for anything a user typed wrong."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

HUGE_PAGES = ("on", "off")   # --huge-pages (peer/hostmem.py)

# 2: signed calls and records, chunk and reply MACs in private runs, the spec's tls_ca, shard payload
# digests and state digests in BLAKE3-256 (were SHA-256): a peer of 1 cannot join a run of 2; it is
# told so, exit 4, instead of failing at its first call. 3: a roster lists an owner once per piece of
# its range (peer.net.shardmap.pieces), which a peer of 2 refuses as "owners are not distinct"
PROTOCOL_VERSION = 3
CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "sparse")
WEIGHTINGS = ("steps", "samples", "equal")
STALE_WORK = ("drop", "carry")
AGGREGATORS = ("mean", "trimmed-mean", "centered-clip")   # peer/aggregate.py
SHARD_SIZINGS = ("rate", "equal")   # peer/net/shardmap.py shard_plan: by measured upload rate, or equal
VERIFY_SHARDS = ("auto", "on", "off")   # auto: on with a robust aggregator and no trusted owners
PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,64}")   # a base58 libp2p peer id (peer/identity.py)
MODELS = ("tiny", "small", "base")  # built-in GPT presets; "hf" is a transformers causal LM from a config
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PROGRESS = ("auto", "on", "off")   # --progress: auto = a bar when stderr is a terminal
# --codec sparse changes these spec defaults (a flag, a config key or DILOCO_* still sets them): SparseLoCo's
# outer step, where the decayed error-feedback residual stands in for outer momentum. Nesterov's momentum
# on top of a residual that delivers each value rounds late overshoots (bench/codec_sim.py, ARCHITECTURE 8).
SPARSE_DEFAULTS = {"outer_lr": 2.0, "outer_momentum": 0.0, "ef_decay": 0.95}

EXIT_OK, EXIT_CRASH, EXIT_CONFIG, EXIT_AUTH, EXIT_INCOMPATIBLE = 0, 1, 2, 3, 4


class ConfigError(ValueError):
    """A bad flag, config key or run-spec conflict: the peer stops with exit status 2."""


class IncompatibleRunError(RuntimeError):
    """The run in the DHT speaks another protocol version: exit status 4."""


@dataclass(frozen=True)
class RunSpec:
    """What every peer of one run must share. Its hash travels in every Join."""

    protocol: int = PROTOCOL_VERSION
    model: str = "small"            # built-in GPT preset, or "hf": a transformers causal LM built from model_config
    model_config: str = ""          # "hf": canonical JSON of its config.json (every peer builds this shape)
    model_hash: str = ""            # "hf": sha256 of model_config (16 hex), what a log line and a conflict name
    model_seed: int = 0             # seed of the initial parameters
    task: str = ""                  # a user's task, module:callable ("" = the built-in or "hf" task above)
    tokenizer_hash: str = "bytes"   # "bytes" (byte-level) or the hash of the tokenizer files every peer uses
    seq_len: int = 0                # tokens per training window; 0 = the model's own (see peer/tasks)
    inner_lr: float = 1e-3          # AdamW peak learning rate
    weight_decay: float = 0.1
    warmup_samples: int = 20_000    # global samples of linear warmup
    total_samples: int = 2_000_000  # global samples at the end of the cosine schedule
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    codec: str = "int8"
    sparse_chunk: int = 4096        # sparse codec: values per chunk of the flat shard
    sparse_density: float = 1 / 64  # sparse codec: share of each chunk sent (top-k by magnitude)
    ef_decay: float = 1.0           # lossy codecs: a member's error-feedback residual x this each round it is added
    weighting: str = "steps"        # what a peer's weight counts: inner steps, samples, or 1
    aggregator: str = "mean"        # how an owner reduces a shard: weighted mean, or robust to lying peers
    trim_fraction: float = 0.2      # trimmed-mean: share of the total weight dropped at each end, per value
    clip_tau: float = 1.0           # centered-clip: the clipping radius, in median distances to the median
    clip_iters: int = 3             # centered-clip: clipping steps from the median
    verify_shards: str = "auto"     # each shard reduced by its owner and its backup, hashes compared (lying owners)
    shard_sizing: str = "rate"      # owners' shards sized by their measured upload rates, or all equal
    trusted_owners: str = ""        # comma-separated peer ids: only these own shards ("" = any serving member)
    stale_work: str = "drop"        # work of a round a peer missed: dropped, or carried into its next one
    target_steps: int = 200         # inner steps summed over the swarm that close a round
    max_round_seconds: float = 300.0  # a round closes after this much training regardless
    min_peers: int = 1              # round 0 waits until this many peers are in
    tls_ca: str = ""                # a TLS run: sha256 of its CA certificate (--tls-ca); "" = no TLS

    def hash(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Any) -> RunSpec:
        """Parses a spec read from the DHT; a malformed one is an incompatible run."""
        if not isinstance(record, dict):
            raise IncompatibleRunError(f"run spec in the DHT is not a mapping: {type(record).__name__}")
        if record.get("protocol") != PROTOCOL_VERSION:
            raise IncompatibleRunError(
                f"the run speaks protocol {record.get('protocol')!r}, this peer speaks {PROTOCOL_VERSION}; "
                "install the version the run uses or pick another --run-id")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(record) - names
        if unknown:
            raise IncompatibleRunError(f"run spec has unknown fields {sorted(unknown)}")
        try:
            spec = cls(**record)
            validate_spec(spec)
        except (TypeError, ConfigError) as e:
            raise IncompatibleRunError(f"run spec in the DHT is invalid: {e}") from e
        return spec


@dataclass(frozen=True)
class PeerConfig:
    """Per-peer settings: never shared, never checked against the run."""

    run_id: str = "diloco"
    initial_peers: tuple[str, ...] = ()
    initial_peers_file: str = ""     # more initial peers, one multiaddr a line (bootstrap --join-file writes it)
    initial_peers_file_wait_s: float = 120.0  # how long a missing or empty --initial-peers-file is waited for
    dht_host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    dht_announce_maddrs: tuple[str, ...] = ()
    host: str = "0.0.0.0"
    port: int = 0
    announce_addr: str = ""          # host:port others dial for gRPC; derived when empty
    http_port: int = 0               # /status, /metrics and the swarm page on this port; 0 = no HTTP server
    client_mode: bool = False        # no inbound connections: sends and fetches, owns nothing
    overlap: bool = False            # train on while the round averages (trainer.py: one round in flight)
    batch_size: int = 8
    data: str = ""                   # a file or folder of .txt/.jsonl/.json/.parquet; empty = built-in corpus
    eval_data: str = ""              # held-out data of the same kinds; empty = a fixed slice cut from --data
    text_field: str = "text"         # the field holding the text in .jsonl/.json/.parquet rows
    model_path: str = ""             # --model PATH: the local transformers model folder (config.json, weights)
    tokenizer: str = ""              # a local tokenizer folder; empty = byte-level (or the model folder's own)
    device: str = "auto"
    precision: str = "auto"          # fp32, bf16 (autocast), fp16 (autocast + grad scaler); auto: bf16 on a GPU
    grad_accum: int = 1              # micro-batches of --batch-size per inner step
    seed: int = 0                    # local randomness (data order); the model seed is in the spec
    threads: int = 0                 # torch CPU threads; 0 = torch's default
    huge_pages: str = "on"           # state-sized buffers on transparent huge pages (hostmem.py)
    metrics_file: str = ""
    max_rounds: int = 0              # 0 = run until stopped
    log_level: str = "INFO"
    progress: str = "auto"           # a progress bar per round: on, off, auto (when stderr is a terminal)
    eval_batches: int = 8
    eval_every: int = 1             # evaluate after every Nth round (and the last of --max-rounds); 0: never
    min_peers_timeout_s: float = 600.0
    join_window_s: float = 30.0      # the most a leader waits for the rest of the group (see deadlines.py)
    timeout_floor_s: float = 5.0     # no communication deadline is shorter ...
    timeout_ceiling_s: float = 300.0  # ... or longer than these, whatever was measured
    max_upload_mbit: float = 0.0     # cap on this peer's sending of shard and state bytes, Mbit/s (0 = none)
    checkpoint_dir: str = ""         # empty = no checkpoints
    checkpoint_every: int = 10       # rounds between checkpoints (and one on SIGINT/SIGTERM)
    export_every: int = 0            # rounds between exports of the global state as a model folder (0 = never)
    export_dir: str = ""             # where those exports go; empty = <checkpoint-dir>/export
    identity_file: str = ""          # the peer's key file (its id); empty = <checkpoint-dir>/identity.key, else a new key each start
    run_secret: str = field(default="", repr=False)  # a private run: only peers with this secret take part
    run_secret_file: str = ""        # the secret's first line is read from this file (instead of --run-secret)
    max_clock_skew_s: float = 30.0   # calls stamped further than this from our clock are refused (replays)
    tls_cert: str = ""               # TLS (all three or none): this peer's certificate, issued by the run's CA
    tls_key: str = ""                # ... its private key
    tls_ca: str = ""                 # ... the run's CA certificate (its sha256 is the run spec's tls_ca)
    spec: RunSpec = field(default_factory=RunSpec)


RUN_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")   # a run id, also in DHT keys and URLs
RUN_ID_RULE = "1 to 64 letters, digits, '.', '_' or '-'"
MADDR = re.compile(r"^/(ip4|ip6|dns|dns4|dns6)/[^/]+/(tcp|udp)/\d+(/.*)?$")
_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


def _check(ok: bool, flag: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"--{flag.replace('_', '-')}: {value!r} is not valid; expected {allowed}")


def validate_spec(s: RunSpec) -> None:
    _check(s.model in MODELS or s.model == "hf", "model", s.model,
           f"one of {', '.join(MODELS)} or a local folder holding a transformers config.json")
    if s.model == "hf":
        _check(s.model_hash == config_hash(s.model_config), "model_hash", s.model_hash,
               "the sha256 of the run's model config (the spec is inconsistent)")
    else:
        _check(s.model_config == "" and s.model_hash == "", "model_config", s.model_config[:40],
               "empty for a built-in preset")
    _check(s.task == "" or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", s.task) is not None, "task", s.task,
           "module:callable, e.g. my_task:build")
    _check(re.fullmatch(r"bytes|[0-9a-f]{16}", s.tokenizer_hash) is not None, "tokenizer_hash",
           s.tokenizer_hash, "'bytes' or 16 hex digits")
    _check(isinstance(s.seq_len, int) and 0 <= s.seq_len <= 1 << 20, "seq_len", s.seq_len,
           "an integer >= 0 (0 = the model's own)")
    _check(s.codec in CODECS, "codec", s.codec, f"one of {', '.join(CODECS)}")
    _check(isinstance(s.sparse_chunk, int) and 16 <= s.sparse_chunk <= 1 << 20, "sparse_chunk", s.sparse_chunk,
           "an integer in [16, 1048576]")
    _check(isinstance(s.sparse_density, (int, float)) and 0 < s.sparse_density <= 1
           and round(s.sparse_chunk * s.sparse_density) >= 1, "sparse_density", s.sparse_density,
           "a number in (0, 1] that keeps at least one value per --sparse-chunk")
    _check(isinstance(s.ef_decay, (int, float)) and 0 < s.ef_decay <= 1, "ef_decay", s.ef_decay,
           "a number in (0, 1] (1 = the residual is added whole)")
    _check(s.stale_work in STALE_WORK, "stale_work", s.stale_work, f"one of {', '.join(STALE_WORK)}")
    _check(s.aggregator in AGGREGATORS, "aggregator", s.aggregator,
           f"one of {', '.join(AGGREGATORS)} (see README: robust aggregation)")
    _check(isinstance(s.trim_fraction, (int, float)) and 0 <= s.trim_fraction <= 0.45, "trim_fraction",
           s.trim_fraction, "a number in [0, 0.45] (0.2 drops the lowest and the highest of 5 equal weights)")
    _check(isinstance(s.clip_tau, (int, float)) and 0 < s.clip_tau <= 1000, "clip_tau", s.clip_tau,
           "a number in (0, 1000] (1 = the median distance of a contribution to the median)")
    _check(isinstance(s.clip_iters, int) and 1 <= s.clip_iters <= 100, "clip_iters", s.clip_iters,
           "an integer from 1 to 100")
    _check(s.shard_sizing in SHARD_SIZINGS, "shard_sizing", s.shard_sizing,
           f"one of {', '.join(SHARD_SIZINGS)} (rate: shards proportional to upload rates; equal: one equal "
           "shard per serving member)")
    _check(s.verify_shards in VERIFY_SHARDS, "verify_shards", s.verify_shards,
           f"one of {', '.join(VERIFY_SHARDS)} (auto: on with a robust --aggregator and no --trusted-owners)")
    ids = trusted_owners(s)
    bad = [i for i in ids if PEER_ID.fullmatch(i) is None]
    _check(not bad and len(ids) == len(set(ids)) and s.trusted_owners == ",".join(ids), "trusted_owners",
           s.trusted_owners[:80], "distinct peer ids separated by commas, no spaces (each peer logs its id at start: "
           "'peer id Qm...')")
    _check(s.weighting in WEIGHTINGS, "weighting", s.weighting, f"one of {', '.join(WEIGHTINGS)}")
    for name in ("inner_lr", "outer_lr", "max_round_seconds"):
        v = getattr(s, name)
        _check(isinstance(v, (int, float)) and 0 < v < float("inf"), name, v, "a positive number")
    _check(0 <= s.outer_momentum < 1, "outer_momentum", s.outer_momentum, "a number in [0, 1)")
    _check(0 <= s.weight_decay < 1, "weight_decay", s.weight_decay, "a number in [0, 1)")
    _check(s.target_steps >= 1, "target_steps", s.target_steps, "an integer >= 1")
    _check(s.min_peers >= 1, "min_peers", s.min_peers, "an integer >= 1")
    _check(0 <= s.warmup_samples <= s.total_samples, "warmup_samples", s.warmup_samples,
           f"an integer between 0 and --total-samples ({s.total_samples})")
    _check(s.total_samples >= 1, "total_samples", s.total_samples, "an integer >= 1")
    _check(re.fullmatch(r"|[0-9a-f]{64}", s.tls_ca) is not None, "tls_ca", s.tls_ca[:80],
           "empty or the sha256 of the run's CA certificate (64 hex digits)")


def trusted_owners(s: RunSpec) -> list[str]:
    """The peer ids that alone may own shards (empty: any serving member)."""
    return s.trusted_owners.split(",") if s.trusted_owners else []


def verifies_shards(s: RunSpec) -> bool:
    """Whether each shard is reduced twice (owner and backup) and members compare the hashes."""
    return s.verify_shards == "on" or (s.verify_shards == "auto" and s.aggregator != "mean" and not s.trusted_owners)


def validate_peer(c: PeerConfig) -> None:
    _check(RUN_ID.fullmatch(c.run_id) is not None, "run_id", c.run_id, RUN_ID_RULE)
    for name in ("initial_peers", "dht_host_maddrs", "dht_announce_maddrs"):
        for addr in getattr(c, name):
            _check(MADDR.match(addr) is not None, name, addr,
                   "a multiaddr such as /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...")
    _check(c.initial_peers_file == "" or os.path.isdir(os.path.dirname(os.path.abspath(c.initial_peers_file))),
           "initial_peers_file", c.initial_peers_file, "a file in a directory that exists (the file may come later)")
    _check(c.initial_peers_file_wait_s > 0, "initial_peers_file_wait_s", c.initial_peers_file_wait_s,
           "a positive number of seconds")
    _check(0 <= c.port <= 65535, "port", c.port, "0 (pick a free port) to 65535")
    _check(0 <= c.http_port <= 65535, "http_port", c.http_port, "0 (no HTTP server) or a port up to 65535")
    _check(c.http_port == 0 or c.http_port != c.port, "http_port", c.http_port, "a port other than --port")
    _check(c.announce_addr == "" or _HOSTPORT.match(c.announce_addr) is not None, "announce_addr",
           c.announce_addr, "host:port, e.g. 203.0.113.5:7000")
    _check_reach(c)
    _check(c.batch_size >= 1, "batch_size", c.batch_size, "an integer >= 1")
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", c.device) is not None, "device", c.device,
           "auto, cpu, cuda or cuda:N")
    _check(c.threads >= 0, "threads", c.threads, "an integer >= 0")
    _check(c.huge_pages in HUGE_PAGES, "huge_pages", c.huge_pages, "on or off")
    _check(c.max_rounds >= 0, "max_rounds", c.max_rounds, "an integer >= 0 (0 = no limit)")
    _check(c.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level", c.log_level,
           "DEBUG, INFO, WARNING or ERROR")
    _check(c.progress in PROGRESS, "progress", c.progress, "auto (a bar on a terminal), on or off")
    _check(c.eval_batches >= 0, "eval_batches", c.eval_batches, "an integer >= 0")
    _check(isinstance(c.eval_every, int) and c.eval_every >= 0, "eval_every", c.eval_every,
           "an integer >= 0 (evaluate after every Nth round; 0 = never after a round)")
    _check(c.min_peers_timeout_s > 0, "min_peers_timeout_s", c.min_peers_timeout_s, "a positive number")
    _check(0 < c.timeout_floor_s <= c.timeout_ceiling_s, "timeout_floor_s", c.timeout_floor_s,
           f"seconds > 0 and <= --timeout-ceiling-s ({c.timeout_ceiling_s})")
    _check(c.checkpoint_every >= 1, "checkpoint_every", c.checkpoint_every, "an integer >= 1")
    _check(c.precision in PRECISIONS, "precision", c.precision, f"one of {', '.join(PRECISIONS)}")
    _check(1 <= c.grad_accum <= 4096, "grad_accum", c.grad_accum, "an integer from 1 to 4096")
    _check(c.export_every >= 0, "export_every", c.export_every, "an integer >= 0 (0 = never)")
    _check(c.export_every == 0 or bool(c.export_dir or c.checkpoint_dir), "export_every", c.export_every,
           "0 unless --export-dir or --checkpoint-dir says where the exports go")
    _check(c.text_field != "", "text_field", c.text_field, "a field name, e.g. text")
    _check(isinstance(c.max_upload_mbit, (int, float)) and math.isfinite(c.max_upload_mbit)
           and c.max_upload_mbit >= 0, "max_upload_mbit", c.max_upload_mbit,
           "a number of Mbit/s >= 0 (0 = no cap), e.g. 20")
    _check(0.5 <= c.join_window_s <= 300, "join_window_s", c.join_window_s, "seconds in [0.5, 300]")
    _check(c.identity_file == "" or os.path.isdir(os.path.dirname(os.path.abspath(c.identity_file))),
           "identity_file", c.identity_file, "a file in a folder that exists (a new key is written there if missing)")
    _check(not (c.run_secret and c.run_secret_file), "run_secret_file", c.run_secret_file,
           "not given together with --run-secret / DILOCO_RUN_SECRET (pick one)")
    _check(c.run_secret_file == "" or os.path.isfile(c.run_secret_file), "run_secret_file", c.run_secret_file,
           "a file that exists, holding the secret on its first line")
    _check(c.run_secret == "" or len(c.run_secret) >= 8, "run_secret", "(hidden)",
           "at least 8 characters (a long random string: python3 -c 'import secrets; print(secrets.token_hex(16))')")
    _check(5 <= c.max_clock_skew_s <= 600, "max_clock_skew_s", c.max_clock_skew_s, "seconds in [5, 600]")
    tls = [f"--tls-{n}" for n in ("cert", "key", "ca") if getattr(c, f"tls_{n}")]
    if tls and len(tls) < 3:
        raise ConfigError(f"{' and '.join(tls)} without the rest: TLS needs --tls-cert, --tls-key and --tls-ca "
                          "together (or none of them); make them with `peer tls`")
    validate_spec(c.spec)


def read_initial_peers_file(path: str, wait_s: float, poll_s: float = 0.5) -> tuple[str, ...]:
    """The multiaddrs in `path`, one a line (blank lines and `#` comments skipped), each checked like
    --initial-peers. Waits up to `wait_s` while the file is missing or empty (its writer, a bootstrap
    node's --join-file, is starting); then ConfigError naming the file."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines, problem = [], "does not exist"
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--initial-peers-file: cannot read {path!r}: {e}") from None
        else:
            problem = "holds no multiaddr"
        addrs = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and line.strip()[0] != "#"]
        for n, addr in addrs:
            if MADDR.match(addr) is None:
                raise ConfigError(f"--initial-peers-file {path} line {n}: {addr!r} is not valid; expected a "
                                  "multiaddr such as /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...")
        if addrs:
            return tuple(addr for _, addr in addrs)
        if time.monotonic() >= deadline:
            raise ConfigError(f"--initial-peers-file: {path!r} {problem} after waiting {wait_s:g} s "
                              "(--initial-peers-file-wait-s); start the bootstrap node with --join-file "
                              f"{path}, or pass --initial-peers")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def _check_reach(c: PeerConfig) -> None:
    """Addresses that cannot work together: a client-mode peer needs a swarm to join (nobody could
    dial it to get the state it would start), and a gRPC server on loopback only cannot serve a
    swarm elsewhere unless --announce-addr names where a forwarded port reaches it."""
    from peer.net.announce import WILDCARDS, is_loopback, maddr_host, remote_swarm

    if c.client_mode and not c.initial_peers and not c.initial_peers_file:
        raise ConfigError("--client-mode needs --initial-peers: a client-mode peer accepts no connections, so it "
                          "cannot start a run (nobody could download its state); start the run on a reachable "
                          "machine and join it")
    remote = [h for h in (maddr_host(p) for p in c.initial_peers) if h and not is_loopback(h)]
    if (remote_swarm(remote) and c.host not in WILDCARDS and is_loopback(c.host) and not c.announce_addr
            and not c.client_mode):
        raise ConfigError(f"--host {c.host} listens on loopback only, but the initial peers are elsewhere "
                          f"({remote[0]}): they could not reach this peer. Use --host 0.0.0.0 (or this machine's "
                          "address), or --client-mode, or --announce-addr HOST:PORT where a forwarded port reaches it")


def config_hash(config_json: str) -> str:
    """The 16-hex sha256 of a canonical model config: how peers and logs name a model's shape."""
    return hashlib.sha256(config_json.encode()).hexdigest()[:16] if config_json else ""


_FILE_CONFLICTS = {
    "model_hash": "--model: this folder's config.json (hash {ours}) is not the run's (hash {theirs}); use the "
                  "run's config.json, or drop --model to build the shape the run trains",
    "tokenizer_hash": "--tokenizer: this tokenizer (hash {ours}) is not the run's (hash {theirs}); use the run's "
                      "tokenizer folder (the same files every peer has)",
}


def spec_conflicts(run: RunSpec, wanted: RunSpec, explicit: set[str]) -> list[str]:
    """Lines naming every explicitly set spec field whose value differs from the run's."""
    lines = []
    for name in sorted(explicit - {"model_config"}):  # the config's hash speaks for it
        ours, theirs = getattr(wanted, name), getattr(run, name)
        if ours != theirs and name in _FILE_CONFLICTS:
            lines.append(_FILE_CONFLICTS[name].format(ours=ours, theirs=theirs))
        elif ours != theirs:
            lines.append(f"--{name.replace('_', '-')} {ours!r} conflicts with the run's value {theirs!r}; "
                         f"drop the flag to adopt the run's value")
    return lines


def tls_conflict(run: RunSpec, wanted: RunSpec) -> tuple[int, str] | None:
    """(exit status, the one line) when this peer's TLS does not fit the run's: no or unwanted
    certificates (2), or certificates of another CA (3, authentication)."""
    if run.tls_ca == wanted.tls_ca:
        return None
    if not wanted.tls_ca:
        return EXIT_CONFIG, (f"this run uses TLS (its CA has sha256 {run.tls_ca[:16]}): pass --tls-cert, --tls-key "
                             "and --tls-ca, a certificate issued by the run's CA (ask its operator: peer tls issue)")
    if not run.tls_ca:
        return EXIT_CONFIG, "this run does not use TLS: drop --tls-cert, --tls-key and --tls-ca to join it"
    return EXIT_AUTH, (f"this run's peers use another TLS CA (sha256 {run.tls_ca[:16]}) than this peer's --tls-ca "
                       f"(sha256 {wanted.tls_ca[:16]}): use a certificate issued by the run's CA")


def wire_codec(spec: RunSpec) -> str:
    """The codec name rosters and update headers carry (peer.codecs.get_codec parses it): the spec's
    codec, with the sparse codec's chunk and values kept per chunk spelled out."""
    if spec.codec != "sparse":
        return spec.codec
    return f"sparse:{spec.sparse_chunk}:{max(1, round(spec.sparse_chunk * spec.sparse_density))}"
