"""One inner step and what it runs on: the device, the autocast precision, AdamW's parameter
groups and the task's options for this peer. No rounds, no network."""

from __future__ import annotations

import torch

from peer.config import ConfigError, PeerConfig, RunSpec
from peer.tasks import Task, TaskOptions, to_device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype (float32: no autocast). auto: bf16 on a GPU that has it, else fp16 on a
    GPU, fp32 on a CPU (where bf16 autocast is slower than fp32)."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; "
                          "use --precision fp16 or auto")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def task_options(cfg: PeerConfig, spec: RunSpec, peer_key: str) -> TaskOptions:
    return TaskOptions(model=spec.model, model_config=spec.model_config, model_seed=spec.model_seed,
                       seq_len=spec.seq_len, tokenizer_hash=spec.tokenizer_hash, model_path=cfg.model_path,
                       tokenizer_path=cfg.tokenizer, data=cfg.data, eval_data=cfg.eval_data,
                       text_field=cfg.text_field, batch_size=cfg.batch_size, eval_batches=cfg.eval_batches,
                       peer_key=peer_key)


def autocast(device: torch.device, amp_dtype: torch.dtype) -> torch.autocast:
    """Autocast to amp_dtype (--precision); off for float32."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)


def train_step(task: Task, model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batches: list, device: torch.device, amp_dtype: torch.dtype) -> float:
    """One optimizer step on the mean loss of `batches` (gradient accumulation: each micro-batch's
    loss / len(batches) is backpropagated in turn); autocast to amp_dtype unless float32, the
    scaler's loss scaling for float16. Returns the mean loss."""
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for batch in batches:
        with autocast(device, amp_dtype):
            loss = task.loss(model, to_device(batch, device))
        scaler.scale(loss / len(batches)).backward()
        total += loss.detach().float()
    scaler.step(opt)
    scaler.update()
    return total.item() / len(batches)


def optimizer_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups as nanoGPT makes them: matrices (and embeddings) decay; biases and norms do not."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
