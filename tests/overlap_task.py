"""examples/sine_task.py with one fixed data seed, whatever the peer's identity: two solo runs of
it train on the same batches, so their states can be compared byte for byte (test_overlap.py)."""

from __future__ import annotations

import dataclasses

from sine_task import build as build_sine

from peer.tasks.base import Task, TaskOptions


def build(options: TaskOptions) -> Task:
    return build_sine(dataclasses.replace(options, peer_key="fixed"))
