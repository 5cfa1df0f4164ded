"""The `peer` command: flags and an optional TOML file -> one validated PeerConfig, then the
trainer. Bad input stops here, before any network activity, with exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import Any

from peer.config import EXIT_CONFIG, SPARSE_DEFAULTS, ConfigError, PeerConfig, RunSpec, validate_peer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Spec fields derived from files (--model PATH, --tokenizer PATH), never typed by a user.
DERIVED_SPEC_FIELDS = {"model_config", "model_hash", "tokenizer_hash", "tls_ca"}
SPEC_FIELDS = {f.name for f in dataclasses.fields(RunSpec)} - {"protocol"} - DERIVED_SPEC_FIELDS
PEER_FIELDS = {f.name for f in dataclasses.fields(PeerConfig)} - {"spec", "model_path"}
LIST_FIELDS = {"initial_peers", "dht_host_maddrs", "dht_announce_maddrs"}

# (flag, type, help); every default lives in config.py, none here.
FLAGS: list[tuple[str, Any, str]] = [
    ("initial-peers", str, "multiaddrs of a bootstrap node or any peer of the run; none = start a new run"),
    ("initial-peers-file", str, "a file of more initial peers, one multiaddr a line, waited for while missing "
                                "(bootstrap --join-file writes one; containers share it through a volume)"),
    ("initial-peers-file-wait-s", float, "how long --initial-peers-file is waited for before exit 2"),
    ("run-id", str, "name of the run; peers with the same run id train together"),
    ("dht-host-maddrs", str, "multiaddrs this peer's DHT node listens on (default /ip4/0.0.0.0/tcp/0)"),
    ("dht-announce-maddrs", str, "multiaddrs others reach this peer's DHT node at (behind NAT, Docker)"),
    ("host", str, "interface of the gRPC server (default 0.0.0.0)"),
    ("port", int, "gRPC port; 0 picks a free one"),
    ("announce-addr", str, "host:port other peers dial for gRPC (default: --host, else this machine's address "
                           "that routes to the first initial peer)"),
    ("http-port", int, "serve /status (JSON), /metrics (Prometheus) and the swarm page here (0 = off)"),
    ("batch-size", int, "sequences per inner step"),
    ("data", str, "a file or folder of .txt, .jsonl/.json or .parquet (streamed); default: Python's "
                  "standard library source"),
    ("eval-data", str, "held-out data of the same kinds (default: a fixed slice of --data is held out)"),
    ("text-field", str, "the field that holds the text in .jsonl/.json/.parquet rows (default text)"),
    ("tokenizer", str, "a local tokenizers/transformers tokenizer folder (default: byte-level, or the "
                       "--model folder's own tokenizer)"),
    ("device", str, "auto, cpu, cuda or cuda:N"),
    ("precision", str, "fp32, bf16 (autocast), fp16 (autocast + grad scaler) or auto (bf16 on a GPU that "
                       "has it, else fp16 on a GPU, fp32 on a CPU)"),
    ("grad-accum", int, "micro-batches of --batch-size summed into one inner step (for batches that do not fit)"),
    ("seed", int, "local seed (data order)"),
    ("threads", int, "torch CPU threads (0 = torch's default)"),
    ("huge-pages", str, "on: a round's state-sized buffers on transparent huge pages where the kernel offers "
                        "them (a fresh one costs a few dozen page faults instead of one per 4 KiB); off: 4 KiB pages"),
    ("metrics-file", str, "append one JSON object per round to this file"),
    ("max-rounds", int, "finish after this many rounds and exit 0 (0 = no limit)"),
    ("log-level", str, "DEBUG, INFO, WARNING or ERROR"),
    ("progress", str, "a progress bar per round: auto (when stderr is a terminal and the log is not DEBUG), "
                      "on or off"),
    ("eval-batches", int, "held-out batches evaluated after every round (0 = none)"),
    ("eval-every", int, "evaluate after every Nth round only, and after the last of --max-rounds (1; 0 = never)"),
    ("min-peers-timeout-s", float, "how long round 0 waits for --min-peers before starting anyway"),
    ("join-window-s", float, "the most a round's leader waits for the rest of the group (the window in force "
                             "is 2 s + 2 inner steps of the slowest peer, at least 3 s)"),
    ("timeout-floor-s", float, "no communication deadline is shorter than this (env DILOCO_TIMEOUT_FLOOR_S)"),
    ("timeout-ceiling-s", float, "no communication deadline is longer than this (env DILOCO_TIMEOUT_CEILING_S)"),
    ("max-upload-mbit", float, "cap this peer's sending of shard and state bytes at this many Mbit/s, all "
                               "streams together (0 = no cap); the leader sizes its shard by its measured rate"),
    ("checkpoint-dir", str, "keep atomic checkpoints here and resume from them (one directory per run)"),
    ("checkpoint-every", int, "rounds between checkpoints (one is also written on SIGINT/SIGTERM)"),
    ("export-every", int, "write the global state as a model folder every this many rounds (0 = never)"),
    ("export-dir", str, "where --export-every writes (default <checkpoint-dir>/export)"),
    ("identity-file", str, "this peer's key file: its id is the key's hash (made if missing; default "
                           "<checkpoint-dir>/identity.key, else a new identity each start)"),
    ("run-secret", str, "a private run: only peers with this secret take part (visible to local users in the "
                        "process list until it starts: prefer DILOCO_RUN_SECRET or --run-secret-file)"),
    ("run-secret-file", str, "read the run secret from the first line of this file"),
    ("max-clock-skew-s", float, "calls stamped further than this from this peer's clock are refused (30)"),
    ("tls-cert", str, "TLS: this peer's certificate, issued by the run's CA (peer tls issue); needs --tls-key and "
                      "--tls-ca too"),
    ("tls-key", str, "TLS: the private key of --tls-cert"),
    ("tls-ca", str, "TLS: the run's CA certificate; every peer of a TLS run needs one it issued"),
    # run spec: the starting peer's values become the run's; joiners adopt them
    ("model", str, "run spec: a built-in GPT preset (tiny, small, base) or a local folder with a transformers "
                   "causal LM config.json (and safetensors weights to continue from)"),
    ("task", str, "run spec: your own task, module:callable returning a peer.tasks.Task (see README)"),
    ("seq-len", int, "run spec: tokens per training window (0 = the model's own)"),
    ("model-seed", int, "run spec: seed of the initial parameters"),
    ("inner-lr", float, "run spec: AdamW peak learning rate"),
    ("weight-decay", float, "run spec: AdamW weight decay"),
    ("warmup-samples", int, "run spec: global samples of learning-rate warmup"),
    ("total-samples", int, "run spec: global samples at the end of the cosine schedule"),
    ("outer-lr", float, "run spec: Nesterov outer learning rate (0.7; 2 with --codec sparse)"),
    ("outer-momentum", float, "run spec: Nesterov outer momentum (0.9; 0 with --codec sparse)"),
    ("codec", str, "run spec: pseudo-gradient codec: fp32, fp16, bf16, int8, int4 or sparse"),
    ("sparse-chunk", int, "run spec: sparse codec: values per chunk (4096)"),
    ("sparse-density", float, "run spec: sparse codec: share of each chunk sent (1/64 = 0.015625)"),
    ("ef-decay", float, "run spec: lossy codecs: each round a member's error-feedback residual is added "
                        "times this (1; 0.95 with --codec sparse)"),
    ("weighting", str, "run spec: weight of a contribution: steps, samples or equal"),
    ("aggregator", str, "run spec: how owners reduce shards: mean, or robust to peers that send bad updates: "
                        "trimmed-mean (drops each value's extremes) or centered-clip (clips far updates)"),
    ("trim-fraction", float, "run spec: trimmed-mean: share of the total weight dropped at each end (0.2)"),
    ("clip-tau", float, "run spec: centered-clip: clipping radius in median distances to the median (1.0)"),
    ("clip-iters", int, "run spec: centered-clip: clipping steps (3)"),
    ("verify-shards", str, "run spec: each shard is reduced by its owner and its backup and members apply it "
                           "only when both hashes match (a lying owner): auto (on with a robust --aggregator "
                           "and no --trusted-owners), on, off; costs each member a second upload of its delta"),
    ("trusted-owners", str, "run spec: comma-separated peer ids that alone own shards (their keys are trusted "
                            "not to lie as owners); other peers only contribute"),
    ("shard-sizing", str, "run spec: shard sizes: rate (proportional to each owner's measured upload rate; an "
                          "owner under 1/8 of the median owns none) or equal (one equal shard per serving member)"),
    ("stale-work", str, "run spec: work of a missed round is dropped or carried into the next (drop, carry)"),
    ("target-steps", int, "run spec: inner steps summed over the swarm that close a round"),
    ("max-round-seconds", float, "run spec: a round closes after this much training anyway"),
    ("min-peers", int, "run spec: round 0 waits until this many peers are in"),
]


# `peer NAME ...`: each module's main(argv) -> exit status; anything else runs a peer.
SUBCOMMANDS = {"export": "peer.export", "plot": "peer.plot", "doctor": "peer.doctor", "status": "peer.status",
               "tls": "peer.tlsfiles"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_CONFIG, f"peer: error: {message} (see peer --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="peer", description="Train one model with a swarm of peers (DiLoCo over a "
                "hivemind DHT and gRPC).", argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="a TOML file with the same keys as the flags (flags win)")
    p.add_argument("--client-mode", action="store_true",
                   help="accept no inbound connections (NAT): send and fetch, own no shard, never lead; "
                        "needs --initial-peers")
    p.add_argument("--overlap", action="store_true",
                   help="train on while a round is averaged (one round in flight at most); the global "
                        "state stays the same bytes, only this peer's local parameters carry the steps")
    for name, typ, text in FLAGS:
        dest = name.replace("-", "_")
        if dest in LIST_FIELDS:
            p.add_argument(f"--{name}", nargs="+", type=typ, help=text)
        else:
            p.add_argument(f"--{name}", type=typ, help=text)
    return p


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: {path!r} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--config: cannot read {path!r}: {e}") from None
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - SPEC_FIELDS - PEER_FIELDS)
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {unknown}; the keys are the flag names")
    return values


def _read_env(env: Mapping[str, str]) -> dict[str, Any]:
    """DILOCO_<FLAG> environment variables, e.g. DILOCO_TIMEOUT_FLOOR_S=10 (flags win over them)."""
    values: dict[str, Any] = {}
    for name in SPEC_FIELDS | PEER_FIELDS:
        raw = env.get(f"DILOCO_{name.upper()}")
        if raw is not None:
            values[name] = raw.split() if name in LIST_FIELDS else _from_text(name, raw)
    return values


def _from_text(name: str, raw: str) -> Any:
    if name in ("client_mode", "overlap"):
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"DILOCO_{name.upper()}: {raw!r} is not valid; expected 1 or 0")
        return raw.lower() in ("1", "true", "yes")
    default = getattr(RunSpec() if name in SPEC_FIELDS else PeerConfig(), name)
    try:
        return type(default)(raw) if not isinstance(default, str) else raw
    except ValueError:
        raise ConfigError(f"DILOCO_{name.upper()}: {raw!r} is not valid; expected {type(default).__name__}") from None


def _coerce(name: str, value: Any, default: Any) -> Any:
    if name in LIST_FIELDS:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is not valid; expected a list of multiaddrs")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is not valid; expected true or false")
        return value
    ok = not isinstance(value, bool) and (not isinstance(default, int) or isinstance(value, int))
    try:
        if ok and isinstance(value, (int, float, str)):
            return type(default)(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is not valid; expected {type(default).__name__}")


def parse_config(argv: list[str] | None = None) -> tuple[PeerConfig, set[str]]:
    """Returns the config and the names of the spec fields the user set explicitly."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = _read_toml(args.pop("config")) if "config" in args else {}
    values.update(_read_env(os.environ))
    values.update(args)
    base_peer, base_spec = PeerConfig(), RunSpec()
    peer_kw = {k: _coerce(k, v, getattr(base_peer, k)) for k, v in values.items() if k in PEER_FIELDS}
    spec_kw = {k: _coerce(k, v, getattr(base_spec, k)) for k, v in values.items() if k in SPEC_FIELDS}
    _model_and_tokenizer_files(peer_kw, spec_kw)
    if peer_kw.get("run_secret_file"):
        peer_kw["run_secret"] = _read_secret_file(peer_kw.pop("run_secret_file"), bool(peer_kw.get("run_secret")))
    explicit = set(spec_kw)
    if spec_kw.get("codec") == "sparse":   # the codec's own defaults, never a conflict with the run
        spec_kw = {**SPARSE_DEFAULTS, **spec_kw}
    cfg = PeerConfig(**peer_kw, spec=RunSpec(**spec_kw))
    validate_peer(cfg)
    if cfg.tls_ca:   # the files checked now (exit 2); their CA's fingerprint is the run spec's
        from peer.tlsfiles import load

        ca = load(cfg.tls_cert, cfg.tls_key, cfg.tls_ca).ca_sha256
        cfg = dataclasses.replace(cfg, spec=dataclasses.replace(cfg.spec, tls_ca=ca))
        explicit.add("tls_ca")
    return cfg, explicit


def _read_secret_file(path: str, also_given: bool) -> str:
    if also_given:
        raise ConfigError("--run-secret-file: not given together with --run-secret / DILOCO_RUN_SECRET (pick one)")
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--run-secret-file: cannot read {path!r}: {getattr(e, 'strerror', None) or e}") from None
    if not secret:
        raise ConfigError(f"--run-secret-file: {path!r} holds no secret on its first line")
    return secret


def hide_secret(argv: list[str]) -> None:
    """Overwrites this process's command line so that `ps` and /proc/PID/cmdline show no --run-secret value."""
    shown, hidden = [], False
    for i, arg in enumerate(argv):
        if arg.startswith("--run-secret="):
            arg, hidden = "--run-secret=(hidden)", True
        elif i > 0 and argv[i - 1] == "--run-secret":
            arg, hidden = "(hidden)", True
        shown.append(arg)
    if hidden:
        import setproctitle

        setproctitle.setproctitle(" ".join([os.path.basename(sys.argv[0] or "peer"), *shown]))


def _model_and_tokenizer_files(peer_kw: dict[str, Any], spec_kw: dict[str, Any]) -> None:
    """--model PATH and --tokenizer PATH become spec fields (the config and the tokenizer hashes,
    which every peer must share) plus the per-peer paths; a preset name stays as it is."""
    from peer.config import MODELS

    if not ("model" in spec_kw and spec_kw["model"] not in MODELS) and not peer_kw.get("tokenizer"):
        return
    from peer.tasks.base import TaskError  # imports torch: only when files are named
    from peer.tasks.hf import read_model_folder
    from peer.tasks.tokenizer import tokenizer_hash

    try:
        if "model" in spec_kw and spec_kw["model"] not in MODELS:
            folder = read_model_folder(spec_kw["model"])
            spec_kw |= {"model": "hf", "model_config": folder.config_json, "model_hash": folder.config_hash}
            peer_kw["model_path"] = folder.path
            if "tokenizer" not in peer_kw and folder.has_tokenizer:
                peer_kw["tokenizer"] = folder.path
        if peer_kw.get("tokenizer"):
            spec_kw["tokenizer_hash"] = tokenizer_hash(peer_kw["tokenizer"])
    except TaskError as e:
        raise ConfigError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        import importlib

        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    try:
        hide_secret(argv)
        cfg, explicit = parse_config(argv)
    except ConfigError as e:
        print(f"peer: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from peer.run import run  # heavy imports (torch, hivemind) only after the flags are good

    return run(cfg, explicit)


if __name__ == "__main__":
    sys.exit(main())
