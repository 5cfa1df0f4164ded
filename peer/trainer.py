"""The main-thread training loop: inner steps until the swarm closes the round, hand-over of
the pseudo-gradient to the node, which returns the next global state (see net/keeper.py),
checkpoints, one log line per round."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from peer.checkpoint import Checkpoint, latest, save_round
from peer.config import PeerConfig, RunSpec
from peer.faults import FaultPlan
from peer.inner import (
    autocast,
    optimizer_groups,
    pick_device,
    pick_precision,
    task_options,
    train_step,
)
from peer.net.node import MAX_CARRY_ROUNDS, Node, Outcome, PendingRound
from peer.outer import GlobalState, assign_flat_, flatten_params, pseudo_gradient
from peer.progress import RoundBar, estimate, wants_bar
from peer.roundrow import RoundStats, dump_round, metrics_row
from peer.tasks import Task, inner_lr, make_task, to_device

log = logging.getLogger(__name__)
# a round's phases on the training thread, each named by the mark that ends it (metrics: phase_seconds)
PHASES = ("start", "began", "trained", "submitted", "ahead", "result", "adopted", "evaluated")


class Trainer:
    def __init__(self, cfg: PeerConfig, spec: RunSpec, node: Node, stop: Any):
        self.cfg, self.spec, self.node, self.stop = cfg, spec, node, stop
        self.state: GlobalState | None = None
        self.device = pick_device(cfg.device)
        self.amp_dtype = pick_precision(cfg.precision, self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        t = time.monotonic()
        # Everything a task can refuse (model folder, tokenizer, data) is refused here, before joining.
        self.task: Task = make_task(spec.task, task_options(cfg, spec, f"{cfg.seed}/{node.peer_id}"))
        self.model = self.task.build_model().to(self.device)
        self.params = self.task.parameters(self.model)
        self.stream = self.task.train_stream()
        self.eval_set = self.task.eval_batches()
        numel = sum(p.numel() for p in self.params)
        # The outer state stays on the host; a GPU model's parameters cross through pinned memory.
        self.host = torch.empty(numel, dtype=torch.float32, pin_memory=self.device.type == "cuda")
        self.opt = torch.optim.AdamW(optimizer_groups(self.params, spec.weight_decay), lr=spec.inner_lr,
                                     betas=(0.9, 0.95))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.faults = FaultPlan.from_env()
        self.dump_dir = os.environ.get("DILOCO_TEST_DUMP_DIR", "")
        self.divergences = 0
        self.rounds_run = 0   # rounds this process ran (--eval-every counts them)
        self.ahead: RoundStats | None = None   # --overlap: steps of the next round done while one averaged
        self.steps_ahead = 0   # of the round being trained: how many of its steps were done ahead
        self.steps_at_barrier = 0   # ... and how many while its start barrier waited (--overlap)
        self.last_steps = 0   # of the last round trained: the most steps --overlap trains ahead
        self.phases: dict[str, float] = {}   # the last round's seconds per phase (PHASES)
        self.carry: tuple[torch.Tensor, float, int] | None = None  # (delta, weight, origin round)
        self.show_bar = wants_bar(cfg.progress, cfg.log_level)   # a progress bar per round on a terminal
        self.bar: RoundBar | None = None
        node.set_numel(numel)
        log.info("task %s: %d parameters on %s (%s, %d x %d samples per step); ready in %.1f s",
                 self.task.describe(), numel, self.device, str(self.amp_dtype)[6:], cfg.grad_accum,
                 cfg.batch_size, time.monotonic() - t)

    def local_params(self) -> torch.Tensor:
        """The model's parameters in the host buffer (valid until the next call)."""
        return flatten_params(self.params, out=self.host)

    # ---- state --------------------------------------------------------------------------
    def fresh_state(self) -> GlobalState:
        theta = self.local_params().clone()
        return GlobalState(theta=theta, momentum=torch.zeros_like(theta), round=0, global_samples=0)

    # ---- checkpoints --------------------------------------------------------------------
    def load_checkpoint(self) -> Checkpoint | None:
        """Restores the local state (inner optimizer, data position, residuals) of our newest
        checkpoint of this run and returns it; None without one."""
        if not self.cfg.checkpoint_dir:
            return None
        ckpt = latest(self.cfg.checkpoint_dir, self.cfg.run_id, self.node.spec_hash)
        if ckpt is None:
            return None
        self.opt.load_state_dict(ckpt.optimizer)
        try:
            self.stream.load_state_dict(ckpt.data)
        except ValueError as e:
            log.warning("the checkpoint's data position does not fit this data (%s); reading from this "
                        "peer's own start instead", e)
        self.node.load_residuals(ckpt.residuals, ckpt.owner_residuals)
        log.info("restored the inner optimizer, data position and residuals of round %d", ckpt.state.round)
        return ckpt

    def save_checkpoint(self, why: str) -> None:
        if not self.cfg.checkpoint_dir or self.state is None:
            return
        state, residuals, owner_residuals = self.node.checkpoint_parts()  # taken together on the loop
        if state is None:
            return
        ckpt = Checkpoint(state=state, run_id=self.cfg.run_id, spec_hash=self.node.spec_hash,
                          peer_id=self.node.peer_id, optimizer=self.opt.state_dict(),
                          data=self.stream.state_dict(), residuals=residuals, owner_residuals=owner_residuals,
                          spec=self.spec.to_record(), assets=self.assets())
        t = time.monotonic()
        os.makedirs(self.cfg.checkpoint_dir, exist_ok=True)
        path = save_round(self.cfg.checkpoint_dir, ckpt,
                          midway=lambda: self.faults.hit("checkpoint_write", ckpt.state.round))
        log.info("checkpoint of round %d written %s: %s (%.2f s)", state.round, why, path,
                 time.monotonic() - t)

    def assets(self) -> dict[str, str]:
        """Where this peer's model folder and tokenizer are: `peer export` finds them there."""
        found = {"model_path": self.cfg.model_path, "tokenizer_path": self.cfg.tokenizer}
        return {k: os.path.abspath(v) for k, v in found.items() if v}

    def export(self, state: GlobalState) -> None:
        """--export-every: the model, holding `state`, written where its users load it."""
        if not self.cfg.export_every or state.round % self.cfg.export_every:
            return
        out = Path(self.cfg.export_dir or os.path.join(self.cfg.checkpoint_dir, "export"))
        t = time.monotonic()
        self.task.export(self.model, out)
        log.info("exported the global state of round %d to %s (%.1f s)", state.round, out, time.monotonic() - t)

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

    def adopt(self, state: GlobalState, carried: torch.Tensor | None = None,
              anchor: torch.Tensor | None = None) -> GlobalState:
        """Trains from `state` next (the keeper's: read, never changed): L <- theta, minus the
        `carried` delta of a missed round, plus (--overlap) the steps made since `anchor` A was
        kept: L <- theta + (L - A). Without steps since A this is the blocking path's assignment."""
        if carried is None and anchor is None:
            assign_flat_(self.params, state.theta)
        else:
            local = torch.sub(state.theta, carried) if carried is not None else state.theta.clone()
            if anchor is not None:
                local.add_(torch.sub(self.local_params(), anchor, out=anchor))
            assign_flat_(self.params, local)
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
            rounds_done += 1
            state = self.one_round(state, last=rounds_done == self.cfg.max_rounds)
        log.info("finished %d rounds; the global state is at round %d (digest %s)",
                 rounds_done, state.round, state.digest()[:12])
        return 0

    def train_until_trigger(self, r: int, base_samples: int, ahead: RoundStats | None = None) -> RoundStats:
        """Inner steps until the round's trigger; `ahead`: steps already done for this round while
        the round before averaged (--overlap), which count as its first steps."""
        stats = ahead or RoundStats()
        self.model.train()
        t0 = time.monotonic() - stats.train_s
        step_s = stats.train_s / stats.steps if stats.steps else 0.0
        if stats.steps:
            self.node.report_ahead(stats.steps, stats.samples, 1.0 / max(step_s, 1e-6))
        while not self.node.should_stop(stats.steps, step_s):
            t = time.monotonic()
            lr = inner_lr(base_samples + stats.samples * self.node.num_training(r), self.spec.inner_lr,
                          self.spec.warmup_samples, self.spec.total_samples)
            for group in self.opt.param_groups:
                group["lr"] = lr
            with self.critical():  # the data position and the optimizer state move together
                loss = self.inner_step(stats)
            self.faults.hit("inner_step", r)
            stats.steps += 1
            stats.loss_sum += loss
            step_s = time.monotonic() - t if stats.steps == 1 else 0.8 * step_s + 0.2 * (time.monotonic() - t)
            self.node.report_progress(stats.steps, stats.samples, 1.0 / max(step_s, 1e-6))
            if self.bar is not None:
                total, eta_s = estimate(stats.steps, 1.0 / max(step_s, 1e-6), *self.node.swarm_left(stats.steps))
                self.bar.step(stats.steps, stats.loss, stats.samples, total, eta_s)
        stats.train_s = time.monotonic() - t0
        return stats

    def inner_step(self, stats: RoundStats) -> float:
        """One optimizer step over --grad-accum micro-batches; returns their mean loss."""
        batches = [self.stream.next_batch() for _ in range(self.cfg.grad_accum)]
        stats.samples += sum(self.task.samples(b) for b in batches)
        stats.tokens += sum(self.task.tokens(b) for b in batches)
        return train_step(self.task, self.model, self.opt, self.scaler, batches, self.device, self.amp_dtype)

    def weight_of(self, stats: RoundStats) -> float:
        if stats.steps == 0:
            return 0.0
        return {"steps": float(stats.steps), "samples": float(stats.samples), "equal": 1.0}[self.spec.weighting]

    def due_for_eval(self, rounds_done: int, last: bool) -> bool:
        """--eval-every N: after every Nth round this process ran, and after its last one."""
        every = self.cfg.eval_every
        return last or (every > 0 and rounds_done % every == 0)

    def train_ahead(self, pending: PendingRound, r: int, state: GlobalState, cap: int, ahead: RoundStats
                    ) -> RoundStats:
        """--overlap: inner steps added to `ahead` (steps of the next round, reported when it begins)
        while `pending` runs on the loop, polled between steps, until it is done or `ahead` holds
        `cap` steps (one round in flight at most)."""
        t0 = time.monotonic() - ahead.train_s
        while ahead.steps < cap:
            self.faults.hit("overlap_step", r)
            if pending.done():
                break
            lr = inner_lr(state.global_samples + ahead.samples * self.node.num_training(r), self.spec.inner_lr,
                          self.spec.warmup_samples, self.spec.total_samples)
            for group in self.opt.param_groups:
                group["lr"] = lr
            with self.critical():
                ahead.loss_sum += self.inner_step(ahead)
            ahead.steps += 1
        ahead.train_s = time.monotonic() - t0
        return ahead

    def train_while_averaging(self, pending: PendingRound, r: int, state: GlobalState, steps: int,
                              ) -> tuple[torch.Tensor | None, RoundStats | None]:
        """--overlap: keeps A = L (the anchor) and trains on while the round averages, at most as
        many steps as the round had (one round in flight), polling the round between steps.
        Returns the anchor and the steps done (None, None when the result came first)."""
        if pending.done():
            return None, None
        anchor = self.local_params().clone()
        ahead = self.train_ahead(pending, r, state, max(1, steps), RoundStats())
        if ahead.steps == 0:
            return None, None
        return anchor, ahead

    def begin(self, r: int, state: GlobalState, ahead: RoundStats | None) -> RoundStats | None:
        """The round's start barrier (Node.begin_round). --overlap: while it waits, trains on (the
        round's first steps, added to `ahead`) up to the last round's steps in flight."""
        pending = self.node.submit_begin(r)
        in_flight = ahead.steps if ahead else 0
        if self.cfg.overlap and self.last_steps > in_flight:
            more = self.train_ahead(pending, r, state, self.last_steps, ahead or RoundStats())
            self.steps_at_barrier = more.steps - in_flight
            ahead = more if more.steps else ahead
        self.node.began(pending)
        return ahead

    def one_round(self, state: GlobalState, last: bool = False) -> GlobalState:
        r, t0 = state.round, time.monotonic()
        ahead, self.ahead = self.ahead, None
        self.steps_ahead, self.steps_at_barrier = (ahead.steps if ahead else 0), 0
        ahead = self.begin(r, state, ahead)
        marks = {"start": t0, "began": time.monotonic()}
        self.bar = RoundBar(r) if self.show_bar else None
        anchor = None
        try:  # the bar goes before the round's line is logged, and on any exit
            stats = self.train_until_trigger(r, state.global_samples, ahead)
            self.last_steps = stats.steps
            marks["trained"] = time.monotonic()
            self.faults.hit("before_average", r)
            delta = pseudo_gradient(state.theta, self.local_params())
            fresh = self.weight_of(stats)
            carried = (min(self.carry[1], fresh), self.carry[2]) if self.carry and fresh > 0 else (0.0, -1)
            weight = fresh + carried[0]
            t_avg = time.monotonic()
            if self.bar is not None:
                self.bar.averaging()
            sent = self.faults.sent_delta(r, delta)   # delta itself, unless a test makes this peer lie
            lie = self.faults.claim_factor(r)   # 1 unless a test makes this peer forge its claim
            pending = self.node.submit_round(r, sent, weight * lie, int(stats.samples * lie),
                                             (carried[0] * lie, carried[1]))   # read, never written
            marks["submitted"] = time.monotonic()
            if self.cfg.overlap and weight > 0:
                anchor, self.ahead = self.train_while_averaging(pending, r, state, stats.steps)
            marks["ahead"] = time.monotonic()
            result = pending.result()
            marks["result"] = time.monotonic()
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
        new_state, outcome = result.state, result.outcome
        self.divergences = result.divergences
        carrying = self.carry_over(r, delta, weight, carried[1], outcome, new_state)
        self.adopt(new_state, delta if carrying else None, anchor)
        if new_state.round != r:
            self.export(new_state)
        avg_s = time.monotonic() - t_avg
        if self.dump_dir:   # test-only
            dump_round(self.dump_dir, self.node.peer_id, r, state, delta, weight, outcome, new_state)
        self.rounds_run += 1
        marks["adopted"] = time.monotonic()
        eval_loss = self.evaluate() if self.due_for_eval(self.rounds_run, last) else float("nan")
        marks["evaluated"] = time.monotonic()
        self.phases = {b: round(marks[b] - marks[a], 4) for a, b in zip(PHASES, PHASES[1:], strict=False)}
        self.report(r, stats, weight, outcome, new_state, eval_loss, time.monotonic() - t0, avg_s)
        if new_state.round != r and new_state.round % self.cfg.checkpoint_every == 0:
            self.save_checkpoint(f"after round {r}")
        self.faults.hit("after_round", r)
        return new_state

    def carry_over(self, r: int, delta: torch.Tensor, weight: float, origin: int, outcome: Outcome,
                   new: GlobalState) -> bool:
        """--stale-work carry: work of a round we were left out of goes on top of the new
        global state (True: adopt subtracts `delta`) and into our next contribution (with its
        origin round); drop: it is lost."""
        missed = outcome.kind == "excluded" and new.round > r and weight > 0
        origin = origin if origin >= 0 else r
        if not missed or self.spec.stale_work != "carry" or new.round - origin > MAX_CARRY_ROUNDS:
            self.carry = None
            return False
        self.carry = (delta, weight, origin)
        log.info("round %d: carrying %.0f weight of work from round %d into round %d", r, weight, origin, new.round)
        return True

    @torch.no_grad()
    def evaluate(self) -> float:
        if not self.eval_set:
            return float("nan")
        self.model.eval()
        with autocast(self.device, self.amp_dtype):
            losses = [float(self.task.loss(self.model, to_device(b, self.device))) for b in self.eval_set]
        self.model.train()
        return sum(losses) / len(losses)

    # ---- output -------------------------------------------------------------------------
    def report(self, r: int, stats: RoundStats, weight: float, o: Outcome, state: GlobalState,
               eval_loss: float, round_s: float, avg_s: float) -> None:
        row = metrics_row(r, self.node.peer_id, stats, weight, o, state, eval_loss, round_s, avg_s) | {
            "steps_ahead": self.steps_ahead, "steps_at_barrier": self.steps_at_barrier,
            "device_max_memory_mb": self.device_memory_mb(), "divergences": self.divergences,
            "phase_seconds": self.phases}
        dropped = ", ".join(f"{p[-6:]} ({o.drop_reasons.get(p, '?')})" for p in o.dropped)
        log.info("round %d: %s, %d peers, loss %.4f, eval %.4f, %.0f samples/s, %.0f tokens/s, sent %.2f MB, "
                 "%.1f s (train %.1f s, %d steps%s; average %.1f s)%s", r, o.kind, row["group_size"], stats.loss,
                 eval_loss, row["samples_per_s"], row["tokens_per_s"], o.bytes_sent / 1e6, round_s, stats.train_s,
                 stats.steps, f", {self.steps_ahead} ahead" if self.steps_ahead else "", avg_s,
                 f"; dropped {dropped}" if dropped else "")
        self.node.report_round(row)   # handed over: never changed after this
        if not self.cfg.metrics_file:
            return
        with open(self.cfg.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def device_memory_mb(self) -> float | None:
        """The most GPU memory torch has held for this peer so far (None on a CPU)."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**20

