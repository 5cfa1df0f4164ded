"""Tokens/s of a transformers model training alone on this machine, then as a peer of a local
swarm, and what the swarm costs.

Alone: the trainer's own step (peer.trainer.train_step: same task, loss, AdamW groups) in a
loop, nothing else running. Swarm: a bootstrap node and --peers peer processes on 127.0.0.1
with rounds of about --round-s seconds of training. Printed per peer: tokens/s while training
(the round line's figure) and effective tokens/s (tokens over whole rounds, averaging and
evaluation included); the swarm's cost is 1 - effective / alone. Each process gets --threads
torch threads, so run it with peers x threads <= cores.

    python bench/task_speed.py                       # Llama-shaped, 4 layers x 256, byte tokenizer
    python bench/task_speed.py --round-s 90 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_model_and_data(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    from transformers import LlamaConfig

    model_dir, data_dir = root / "model", root / "data"
    model_dir.mkdir()
    data_dir.mkdir()
    LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=args.seq_len,
                bos_token_id=None, eos_token_id=0, pad_token_id=None).save_pretrained(model_dir)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with open(data_dir / "stdlib.jsonl", "w") as f:  # Python's own source, one file a row
        for path in sorted(stdlib.glob("*.py"))[:400]:
            f.write(json.dumps({"text": path.read_text(errors="replace")}) + "\n")
    return model_dir, data_dir


def alone(model_dir: Path, data_dir: Path, args: argparse.Namespace) -> float:
    import torch
    from peer.tasks.hf import read_model_folder

    from peer.tasks import TaskOptions, make_task
    from peer.trainer import optimizer_groups, train_step

    torch.set_num_threads(args.threads)
    folder = read_model_folder(str(model_dir))
    task = make_task("", TaskOptions(model="hf", model_config=folder.config_json, seq_len=args.seq_len,
                                     data=str(data_dir), batch_size=args.batch_size, eval_batches=1,
                                     peer_key="alone"))
    model = task.build_model()
    opt = torch.optim.AdamW(optimizer_groups(task.parameters(model), 0.1), lr=1e-3, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stream, cpu = task.train_stream(), torch.device("cpu")
    for _ in range(3):  # warm-up steps are not counted
        train_step(task, model, opt, scaler, [stream.next_batch()], cpu, torch.float32)
    tokens, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < args.alone_s:
        batch = stream.next_batch()
        train_step(task, model, opt, scaler, [batch], cpu, torch.float32)
        tokens += task.tokens(batch)
    return tokens / (time.monotonic() - t0)


def swarm(model_dir: Path, data_dir: Path, root: Path, steps_per_s: float, args: argparse.Namespace) -> list[dict]:
    from tests.procs import python_module, start_proc, stop, wait_for_line

    local = ["--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0", "--host", "127.0.0.1", "--threads", str(args.threads)]
    target = max(1, round(args.round_s * steps_per_s * args.peers))
    run = ["--model", str(model_dir), "--data", str(data_dir), "--seq-len", str(args.seq_len), "--batch-size",
           str(args.batch_size), "--target-steps", str(target), "--max-round-seconds", str(3 * args.round_s),
           "--min-peers", str(args.peers), "--max-rounds", str(args.rounds), "--eval-batches", "1",
           "--codec", args.codec, "--run-id", "task-speed", *local]
    env = {"OMP_NUM_THREADS": str(args.threads)}
    procs = [start_proc(python_module("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"), env,
                        root / "bootstrap.log")]
    try:
        addr = wait_for_line(procs[0], r"^Join through: (\S+)", 60).group(1)
        for i in range(args.peers):
            procs.append(start_proc(python_module("peer.cli", *run, "--initial-peers", addr, "--seed", str(i),
                                                  "--metrics-file", str(root / f"p{i}.jsonl")),
                                    env, root / f"p{i}.log"))
        deadline = time.monotonic() + args.rounds * args.round_s * 4 + 300
        for p in procs[1:]:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                stop(p)
    rows = []
    for i in range(args.peers):
        path = root / f"p{i}.jsonl"
        rows += [dict(json.loads(line), peer=i) for line in path.read_text().splitlines()] if path.exists() else []
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--alone-s", type=float, default=60.0)
    ap.add_argument("--round-s", type=float, default=60.0, help="seconds of training a round should take")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--codec", default="int8")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data_dir = make_model_and_data(root, args)
        tps = alone(model_dir, data_dir, args)
        steps_per_s = tps / (args.batch_size * args.seq_len)
        print(f"alone: {tps:.0f} tokens/s ({steps_per_s:.2f} steps/s, {args.threads} thread(s), "
              f"{args.layers} x {args.hidden} Llama, {args.batch_size} x {args.seq_len} tokens a step)", flush=True)
        rows = swarm(model_dir, data_dir, root, steps_per_s, args)
        if not rows:
            print("the swarm reported no rounds; logs were in", root)
            sys.exit(1)
        for i in range(args.peers):
            mine = [r for r in rows if r["peer"] == i and r["outcome"] == "applied"]
            later = mine[1:] or mine  # round 0 also holds the wait for the other peers' state
            in_round = statistics.mean(r["tokens_per_s"] for r in later)
            effective = sum(r["tokens"] for r in later) / sum(r["round_seconds"] for r in later)
            print(f"peer {i}: {len(mine)} rounds applied; rounds of {statistics.mean(r['round_seconds'] for r in later):.1f} s "
                  f"(averaging {statistics.mean(r['average_seconds'] for r in later):.2f} s); tokens/s while "
                  f"training {in_round:.0f} ({in_round / tps - 1:+.1%} vs alone), effective {effective:.0f} "
                  f"(swarm cost {1 - effective / tps:.1%})")


if __name__ == "__main__":
    main()
