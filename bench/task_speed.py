"""Tokens/s of a transformers model training alone on this machine, then as a peer of a local
swarm, and what the swarm costs.

Alone: the trainer's own step (peer.inner.train_step: same task, loss, AdamW groups) in a
loop, in --peers processes at once, so they share the machine as the peers will (one alone
process on an idle machine is printed too). Swarm: a bootstrap node and --peers peer processes on 127.0.0.1
with rounds of about --round-s seconds of training. Printed per peer: tokens/s while training
(the round line's figure) and effective tokens/s (tokens over whole rounds, averaging and
evaluation included); the swarm's cost is 1 - effective / alone. Each process gets --threads
torch threads, so run it with peers x threads <= cores.

    python bench/task_speed.py                       # Llama-shaped, 4 layers x 256, byte tokenizer
    python bench/task_speed.py --round-s 90 --rounds 3
    python bench/task_speed.py --device cuda --precision bf16 --hidden 1024 --layers 8 --cpu-peers 1

On a GPU it also prints the device memory held alone and as a peer (DiLoCo's outer state stays
on the host), and with --cpu-peers whether a CPU peer in the same run holds the same digests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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


def alone(model_dir: Path, data_dir: Path, args: argparse.Namespace) -> tuple[float, float | None]:
    """(tokens/s, peak device memory in MiB or None on a CPU) of plain training."""
    import torch

    from peer.inner import optimizer_groups, pick_device, pick_precision, train_step
    from peer.tasks import TaskOptions, make_task
    from peer.tasks.hf import read_model_folder

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    amp = pick_precision(args.precision, device)
    folder = read_model_folder(str(model_dir))
    task = make_task("", TaskOptions(model="hf", model_config=folder.config_json, seq_len=args.seq_len,
                                     data=str(data_dir), batch_size=args.batch_size, eval_batches=1,
                                     peer_key="alone"))
    model = task.build_model().to(device)
    opt = torch.optim.AdamW(optimizer_groups(task.parameters(model), 0.1), lr=1e-3, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    stream = task.train_stream()
    for _ in range(3):  # warm-up steps are not counted
        train_step(task, model, opt, scaler, [stream.next_batch()], device, amp)
    tokens, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < args.alone_s:
        batch = stream.next_batch()
        train_step(task, model, opt, scaler, [batch], device, amp)
        tokens += task.tokens(batch)
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return tokens / (time.monotonic() - t0), memory


def alone_together(model_dir: Path, data_dir: Path, args: argparse.Namespace) -> float:
    """Mean tokens/s of --peers alone runs at once (each its own process, as the peers will be)."""
    argv = [sys.executable, __file__, "--alone-worker", str(model_dir), str(data_dir), *sys.argv[1:]]
    workers = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS":
                                str(args.threads)}) for _ in range(args.peers)]
    results = [json.loads(w.communicate(timeout=args.alone_s + 300)[0].strip().splitlines()[-1]) for w in workers]
    return statistics.mean(r["tokens_per_s"] for r in results)


def swarm(model_dir: Path, data_dir: Path, root: Path, steps_per_s: float, args: argparse.Namespace) -> list[dict]:
    from tests.procs import python_module, start_proc, stop, wait_for_line

    local = ["--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0", "--host", "127.0.0.1", "--threads", str(args.threads)]
    target = max(1, round(args.round_s * steps_per_s * args.peers))
    run = ["--model", str(model_dir), "--data", str(data_dir), "--seq-len", str(args.seq_len), "--batch-size",
           str(args.batch_size), "--target-steps", str(target), "--max-round-seconds", str(3 * args.round_s),
           "--min-peers", str(args.peers + args.cpu_peers), "--max-rounds", str(args.rounds), "--eval-batches", "1",
           "--codec", args.codec, "--run-id", "task-speed", *local]
    env = {"OMP_NUM_THREADS": str(args.threads)}
    procs = [start_proc(python_module("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"), env,
                        root / "bootstrap.log")]
    try:
        addr = wait_for_line(procs[0], r"^Join through: (\S+)", 60).group(1)
        for i in range(args.peers + args.cpu_peers):
            device = ["--device", args.device, "--precision", args.precision] if i < args.peers else [
                "--device", "cpu", "--precision", "fp32"]
            procs.append(start_proc(python_module("peer.cli", *run, *device, "--initial-peers", addr, "--seed",
                                                  str(i), "--metrics-file", str(root / f"p{i}.jsonl")),
                                    env, root / f"p{i}.log"))
        deadline = time.monotonic() + args.rounds * args.round_s * 4 + 300
        for p in procs[1:]:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                stop(p)
    rows = []
    for i in range(args.peers + args.cpu_peers):
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
    ap.add_argument("--device", default="cpu", help="the device of the timed peers (and of the alone run)")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16, fp16 or auto")
    ap.add_argument("--cpu-peers", type=int, default=0, help="CPU peers (fp32) added to the swarm")
    ap.add_argument("--alone-worker", nargs=2, help=argparse.SUPPRESS)  # model and data folders: time one alone run
    args = ap.parse_args()
    if args.alone_worker:
        tps, memory = alone(Path(args.alone_worker[0]), Path(args.alone_worker[1]), args)
        print(json.dumps({"tokens_per_s": tps, "memory_mib": memory}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data_dir = make_model_and_data(root, args)
        tps, memory = alone(model_dir, data_dir, args)
        steps_per_s = tps / (args.batch_size * args.seq_len)
        print(f"alone: {tps:.0f} tokens/s ({steps_per_s:.2f} steps/s on {args.device} {args.precision}, "
              f"{args.threads} thread(s), {args.layers} x {args.hidden} Llama, {args.batch_size} x {args.seq_len} "
              f"tokens a step)" + (f"; device memory {memory:.0f} MiB" if memory is not None else ""), flush=True)
        if args.peers > 1:
            tps = alone_together(model_dir, data_dir, args)
            print(f"alone, {args.peers} processes at once: {tps:.0f} tokens/s each (the baseline below)", flush=True)
            steps_per_s = tps / (args.batch_size * args.seq_len)
        rows = swarm(model_dir, data_dir, root, steps_per_s, args)
        if not rows:
            print("the swarm reported no rounds; logs were in", root)
            sys.exit(1)
        for i in range(args.peers + args.cpu_peers):
            mine = [r for r in rows if r["peer"] == i and r["outcome"] == "applied"]
            later = mine[1:] or mine  # round 0 also holds the wait for the other peers' state
            in_round = statistics.mean(r["tokens_per_s"] for r in later)
            effective = sum(r["tokens"] for r in later) / sum(r["round_seconds"] for r in later)
            print(f"peer {i}: {len(mine)} rounds applied; rounds of {statistics.mean(r['round_seconds'] for r in later):.1f} s "
                  f"(averaging {statistics.mean(r['average_seconds'] for r in later):.2f} s); tokens/s while "
                  f"training {in_round:.0f} ({in_round / tps - 1:+.1%} vs alone), effective {effective:.0f} "
                  f"(swarm cost {1 - effective / tps:.1%})"
                  + (f"; device memory {mine[-1]['device_max_memory_mb']:.0f} MiB"
                     if mine and mine[-1].get("device_max_memory_mb") is not None else "")
                  + (" [cpu peer]" if i >= args.peers else ""))
        digests: dict[int, set[str]] = {}
        for r in rows:
            digests.setdefault(r["state_round"], set()).add(r["digest"])
        split = {k: v for k, v in digests.items() if len(v) > 1}
        print(f"digests: {len(digests)} state rounds, " + (f"SPLIT at {sorted(split)}" if split else
                                                            "one digest each across all peers"))


if __name__ == "__main__":
    main()
