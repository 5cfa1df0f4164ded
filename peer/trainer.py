"""The main-thread training loop: inner steps until the swarm closes the round, hand-over of
the pseudo-gradient to the node, which returns the next global state (see net/keeper.py),
checkpoints, one log line per round."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from peer.checkpoint import Checkpoint, latest, save_round
from peer.config import ConfigError, PeerConfig, RunSpec
from peer.faults import FaultPlan
from peer.net.node import MAX_CARRY_ROUNDS, Node, Outcome
from peer.outer import GlobalState, assign_flat_, flatten_params, pseudo_gradient
from peer.tasks import BatchStream, ByteCorpus, build_model, eval_batches, inner_lr, start_position

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


@dataclass
class RoundStats:
    steps: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    train_s: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.steps if self.steps else float("nan")


class Trainer:
    def __init__(self, cfg: PeerConfig, spec: RunSpec, node: Node, stop: Any):
        self.cfg, self.spec, self.node, self.stop = cfg, spec, node, stop
        self.state: GlobalState | None = None
        self.device = pick_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model = build_model(spec.model, spec.model_seed).to(self.device)
        self.seq_len = self.model.config.block_size
        corpus = ByteCorpus.load(cfg.data or None)
        self.corpus = corpus
        start = start_position(len(corpus.train), f"{cfg.seed}/{node.peer_id}")
        self.stream = BatchStream(corpus.train, cfg.batch_size, self.seq_len, start)
        self.eval_set = eval_batches(corpus.heldout, cfg.batch_size, self.seq_len, cfg.eval_batches)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=spec.inner_lr, betas=(0.9, 0.95),
                                     weight_decay=spec.weight_decay)
        self.faults = FaultPlan.from_env()
        self.dump_dir = os.environ.get("DILOCO_TEST_DUMP_DIR", "")
        self.divergences = 0
        self.carry: tuple[torch.Tensor, float, int] | None = None  # (delta, weight, origin round)
        numel = sum(p.numel() for p in self.model.parameters())
        node.set_numel(numel)
        log.info("model %s: %d parameters on %s; data %s (%d bytes, held-out unigram entropy %.3f nats)",
                 spec.model, numel, self.device, corpus.name, len(corpus.train), corpus.unigram_entropy_nats())

    # ---- state --------------------------------------------------------------------------
    def fresh_state(self) -> GlobalState:
        theta = flatten_params(self.model)
        return GlobalState(theta=theta, momentum=torch.zeros_like(theta), round=0, global_samples=0)

    # ---- checkpoints --------------------------------------------------------------------
    def load_checkpoint(self) -> Checkpoint | None:
        """Restores the local state (inner optimizer, data position, residuals) of our newest
        checkpoint of this run and returns it; None without one."""
        if not self.cfg.checkpoint_dir:
            return None
        ckpt = latest(self.cfg.checkpoint_dir, self.cfg.run_id, self.node.core.spec_hash)
        if ckpt is None:
            return None
        self.opt.load_state_dict(ckpt.optimizer)
        self.stream.load_state_dict(ckpt.data)
        self.node.load_residuals(ckpt.residuals, ckpt.owner_residuals)
        log.info("restored the inner optimizer, data position and residuals of round %d", ckpt.state.round)
        return ckpt

    def save_checkpoint(self, why: str) -> None:
        if not self.cfg.checkpoint_dir or self.state is None:
            return
        state, residuals, owner_residuals = self.node.checkpoint_parts()  # taken together on the loop
        if state is None:
            return
        ckpt = Checkpoint(state=state, run_id=self.cfg.run_id, spec_hash=self.node.core.spec_hash,
                          peer_id=self.node.peer_id, optimizer=self.opt.state_dict(),
                          data=self.stream.state_dict(), residuals=residuals, owner_residuals=owner_residuals)
        t = time.monotonic()
        os.makedirs(self.cfg.checkpoint_dir, exist_ok=True)
        path = save_round(self.cfg.checkpoint_dir, ckpt,
                          midway=lambda: self.faults.hit("checkpoint_write", ckpt.state.round))
        log.info("checkpoint of round %d written %s: %s (%.2f s)", state.round, why, path,
                 time.monotonic() - t)

    @contextlib.contextmanager
    def critical(self):
        """A signal inside this block (an inner step: the optimizer state that a checkpoint
        keeps) takes effect when the block ends, never half-way."""
        self.stop.critical += 1
        try:
            yield
        finally:
            self.stop.critical -= 1
        self.stop.check()

    def adopt(self, state: GlobalState) -> GlobalState:
        """Trains from `state` next (the keeper's: read, never changed)."""
        assign_flat_(self.model, state.theta)
        self.state = state
        return state

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        ckpt = self.load_checkpoint()
        state = self.adopt(self.node.start_state(ckpt.state if ckpt else None, self.fresh_state()))
        if state.round == 0:
            n = self.node.wait_for_peers(self.spec.min_peers, self.cfg.min_peers_timeout_s)
            log.info("round 0 starts with %d peer(s) holding the state", n)
        log.info("eval loss at the start: %.4f", self.evaluate())
        rounds_done = 0
        while not self.cfg.max_rounds or rounds_done < self.cfg.max_rounds:
            state = self.one_round(state)
            rounds_done += 1
        log.info("finished %d rounds; the global state is at round %d (digest %s)",
                 rounds_done, state.round, state.digest()[:12])
        return 0

    def train_until_trigger(self, r: int, base_samples: int) -> RoundStats:
        stats = RoundStats()
        self.model.train()
        t0 = time.monotonic()
        step_s = 0.0
        while not self.node.should_stop(stats.steps, step_s):
            t = time.monotonic()
            x, y = self.stream.next_batch()
            lr = inner_lr(base_samples + stats.samples * self.node.num_training(r), self.spec.inner_lr,
                          self.spec.warmup_samples, self.spec.total_samples)
            for group in self.opt.param_groups:
                group["lr"] = lr
            with self.critical():
                _, loss = self.model(x.to(self.device), y.to(self.device))
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
            self.faults.hit("inner_step", r)
            stats.steps += 1
            stats.samples += x.shape[0]
            stats.loss_sum += loss.item()
            step_s = time.monotonic() - t if stats.steps == 1 else 0.8 * step_s + 0.2 * (time.monotonic() - t)
            self.node.report_progress(stats.steps, stats.samples, 1.0 / max(step_s, 1e-6))
        stats.train_s = time.monotonic() - t0
        return stats

    def weight_of(self, stats: RoundStats) -> float:
        if stats.steps == 0:
            return 0.0
        return {"steps": float(stats.steps), "samples": float(stats.samples), "equal": 1.0}[self.spec.weighting]

    def one_round(self, state: GlobalState) -> GlobalState:
        r, t0 = state.round, time.monotonic()
        self.node.begin_round(r)
        stats = self.train_until_trigger(r, state.global_samples)
        self.faults.hit("before_average", r)
        delta = pseudo_gradient(state.theta, flatten_params(self.model))
        fresh = self.weight_of(stats)
        carried = (min(self.carry[1], fresh), self.carry[2]) if self.carry and fresh > 0 else (0.0, -1)
        weight = fresh + carried[0]
        t_avg = time.monotonic()
        result = self.node.finish_round(r, delta.clone(), weight, stats.samples, carried)
        new_state, outcome = self.adopt(result.state), result.outcome
        self.divergences = result.divergences
        self.carry_over(r, delta, weight, carried[1], outcome, new_state)
        avg_s = time.monotonic() - t_avg
        self.dump(r, state, delta, weight, outcome, new_state)
        eval_loss = self.evaluate()
        self.report(r, stats, weight, outcome, new_state, eval_loss, time.monotonic() - t0, avg_s)
        if new_state.round != r and new_state.round % self.cfg.checkpoint_every == 0:
            self.save_checkpoint(f"after round {r}")
        self.faults.hit("after_round", r)
        return new_state

    def carry_over(self, r: int, delta: torch.Tensor, weight: float, origin: int, outcome: Outcome,
                   new: GlobalState) -> None:
        """--stale-work carry: work of a round we were left out of goes on top of the new
        global state and into our next contribution (with its origin round); drop: it is lost."""
        missed = outcome.kind == "excluded" and new.round > r and weight > 0
        origin = origin if origin >= 0 else r
        if not missed or self.spec.stale_work != "carry" or new.round - origin > MAX_CARRY_ROUNDS:
            self.carry = None
            return
        self.carry = (delta, weight, origin)
        assign_flat_(self.model, torch.sub(new.theta, delta))
        log.info("round %d: carrying %.0f weight of work from round %d into round %d", r, weight, origin, new.round)

    @torch.no_grad()
    def evaluate(self) -> float:
        if not self.eval_set:
            return float("nan")
        self.model.eval()
        losses = [float(self.model(x.to(self.device), y.to(self.device))[1]) for x, y in self.eval_set]
        self.model.train()
        return sum(losses) / len(losses)

    # ---- output -------------------------------------------------------------------------
    def report(self, r: int, stats: RoundStats, weight: float, o: Outcome, state: GlobalState,
               eval_loss: float, round_s: float, avg_s: float) -> None:
        group = len(o.roster.members) if o.roster is not None else 0
        sps = stats.samples / stats.train_s if stats.train_s > 0 else 0.0
        log.info("round %d: %s, %d peers, loss %.4f, eval %.4f, %.0f samples/s, sent %.2f MB, %.1f s "
                 "(train %.1f s, %d steps; average %.1f s)%s", r, o.kind, group, stats.loss, eval_loss, sps,
                 o.bytes_sent / 1e6, round_s, stats.train_s, stats.steps, avg_s,
                 f"; dropped {', '.join(p[-6:] for p in o.dropped)}" if o.dropped else "")
        if not self.cfg.metrics_file:
            return
        row = {"round": r, "peer_id": self.node.peer_id, "outcome": o.kind, "group_size": group,
               "weight": weight, "total_weight": o.total_weight, "steps": stats.steps, "samples": stats.samples,
               "loss": _num(stats.loss), "eval_loss": _num(eval_loss), "samples_per_s": sps,
               "bytes_sent": o.bytes_sent, "bytes_received": o.bytes_received, "round_seconds": round_s,
               "average_seconds": avg_s, "digest": state.digest(), "state_round": state.round, "global_samples": state.global_samples,
               "leader": o.roster.leader if o.roster is not None else "",
               "contributors": o.contributors, "dropped": o.dropped, "divergences": self.divergences,
               "time": time.time()}
        with open(self.cfg.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def dump(self, r: int, state: GlobalState, delta: torch.Tensor, weight: float, o: Outcome,
             new: GlobalState) -> None:
        """Test-only (DILOCO_TEST_DUMP_DIR): what a test needs to recompute the round."""
        if not self.dump_dir:
            return
        path = os.path.join(self.dump_dir, f"{self.node.peer_id}.r{r}.npz")
        np.savez(path, theta=state.theta.numpy(), delta=delta.numpy(), weight=np.float64(weight),
                 new_theta=new.theta.numpy(), applied=np.bool_(o.kind == "applied"),
                 contributors=np.array(o.contributors, dtype=str))


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x
