"""State-sized buffers on transparent huge pages (`--huge-pages`).

A round makes and frees a few buffers the size of the model's state (the pseudo-gradient, the
averaged result, decoded shards, the outer step's new state). glibc maps each one afresh and
unmaps it on free, so the kernel faults every one in 4 KiB page by 4 KiB page: 14,000 faults
for the base preset's 57.6 MB, which made writing a fresh buffer 2-3x the time of writing one
already touched (bench/round_overhead.py). `empty_f32` maps those buffers itself, 2 MiB-aligned
and marked MADV_HUGEPAGE, so one takes a few dozen faults; freeing the tensor unmaps it, as before.

Only these buffers: torch's own switch (`THP_MEM_ALLOC_ENABLE=1`) puts every allocation of 2 MiB
and more on huge pages, heap ones too, and raised a base-preset peer's resident set by 20 %
(bench/peer_memory.py, 40 rounds: 2066 -> 2567 MB). Keeping freed memory mapped instead (glibc's
M_MMAP_MAX=0, no trimming) was rejected too: torch allocates with posix_memalign, whose request
does not fit the hole a freed buffer of the same size leaves, and the heap grew by a buffer a round."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import torch

from peer.config import HUGE_PAGES

HUGE_PAGE = 2 << 20
MIN_BYTES = 4 << 20     # smaller buffers come from the C heap: a mapping of their own gains little
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def kernel_thp_mode(path: Path = THP_MODE) -> str:
    """The kernel's transparent huge page mode (always, madvise or never; "" where none is known)."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    return next((w[1:-1] for w in text.split() if w.startswith("[") and w.endswith("]")), "")


def _usable(mode: str) -> bool:
    return mode in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")


_on = _usable(kernel_thp_mode())   # until use_huge_pages


def use_huge_pages(setting: str, thp_mode: str | None = None) -> str:
    """Applies --huge-pages to this process; returns what was done, for a log line."""
    if setting not in HUGE_PAGES:
        raise ValueError(f"--huge-pages {setting!r}; expected one of {HUGE_PAGES}")
    global _on
    mode = kernel_thp_mode() if thp_mode is None else thp_mode
    _on = False
    if setting == "off":
        return "huge pages: off (--huge-pages off): state-sized buffers on 4 KiB pages"
    if not _usable(mode):
        return f"huge pages: not used: this kernel's transparent huge pages are {mode or 'not available'}"
    _on = True
    return f"huge pages: state-sized buffers on transparent huge pages (kernel mode {mode})"


def empty_f32(n: int) -> torch.Tensor:
    """An uninitialised float32 CPU tensor of n values: at MIN_BYTES and more, in a mapping of its own
    on huge pages (while --huge-pages is on), unmapped when the tensor is freed."""
    nbytes = 4 * n
    if not _on or nbytes < MIN_BYTES:
        return torch.empty(n, dtype=torch.float32)
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(m)) % HUGE_PAGE   # the first 2 MiB boundary
    try:
        m.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    except OSError:   # a kernel without THP after all: 4 KiB pages, as torch.empty's
        pass
    return torch.frombuffer(m, dtype=torch.float32, count=n, offset=start)
