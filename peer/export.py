"""`peer export --checkpoint-dir D --out DIR`: the newest global state of a run, written as a folder
its users load: for a transformers model a `save_pretrained` folder (config, safetensors,
tokenizer) that `AutoModelForCausalLM.from_pretrained(DIR)` reads; for the built-in GPT its
safetensors and config. Needs no swarm, no data and no weights: the checkpoint holds the run
spec (the model's config) and the parameters."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peer.config import EXIT_CONFIG, EXIT_OK, IncompatibleRunError, RunSpec


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peer export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint-dir", required=True, help="a peer's --checkpoint-dir")
    p.add_argument("--out", required=True, help="the folder to write (replaced whole if it exists)")
    p.add_argument("--run-id", default=None, help="the run to export when the folder holds several")
    p.add_argument("--tokenizer", default="", help="the run's tokenizer folder, if it moved since training")
    return p


def export(checkpoint_dir: str, out: str, run_id: str | None = None, tokenizer: str = "") -> str:
    """Writes the export; returns a line saying what was written. ValueError saying what is wrong."""
    from peer.checkpoint import latest
    from peer.outer import assign_flat_
    from peer.tasks import TaskOptions, make_task

    if not Path(checkpoint_dir).is_dir():
        raise ValueError(f"--checkpoint-dir {checkpoint_dir}: no such folder")
    ckpt = latest(checkpoint_dir, run_id)
    if ckpt is None:
        which = f" of run {run_id}" if run_id else ""
        raise ValueError(f"{checkpoint_dir} holds no intact checkpoint{which}")
    if not ckpt.spec:
        raise ValueError(f"the checkpoint of round {ckpt.state.round} in {checkpoint_dir} was written by a version "
                         "that did not record the run spec; run a peer of this version to write a new one")
    try:
        spec = RunSpec.from_record(ckpt.spec)
    except IncompatibleRunError as e:
        raise ValueError(f"the checkpoint's run spec cannot be read: {e}") from e
    if spec.hash() != ckpt.spec_hash:
        raise ValueError(f"the checkpoint's run spec hashes to {spec.hash()}, its header says {ckpt.spec_hash}")
    options = TaskOptions(model=spec.model, model_config=spec.model_config, model_seed=spec.model_seed,
                          seq_len=spec.seq_len, tokenizer_hash=spec.tokenizer_hash,
                          tokenizer_path=tokenizer or ckpt.assets.get("tokenizer_path", ""))
    task = make_task(spec.task, options, weights=False)
    model = task.build_model()
    assign_flat_(task.parameters(model), ckpt.state.theta)
    task.export(model, Path(out))
    return (f"exported round {ckpt.state.round} of run {ckpt.run_id} (digest {ckpt.state.digest()[:12]}, "
            f"{ckpt.state.theta.numel()} parameters) to {out}")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        print(export(args.checkpoint_dir, args.out, args.run_id, args.tokenizer), flush=True)
    except ValueError as e:  # TaskError and CheckpointError are ValueErrors too
        print(f"peer export: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK
