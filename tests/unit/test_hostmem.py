"""--huge-pages: with `on`, a fresh state-sized buffer (hostmem.empty_f32: the outer step's new
state, the pseudo-gradient, the averaged result, decoded shards) is faulted in on 2 MiB pages, a
few dozen faults instead of one per 4 KiB page, and freeing it gives the memory back at once, so
a run's resident set does not grow round after round; `off` and small buffers are torch.empty's."""

import resource

import pytest
import torch

from peer import hostmem
from peer.hostmem import MIN_BYTES, empty_f32, kernel_thp_mode, use_huge_pages

NUMEL = 16 << 20   # 64 MiB of float32


def rss_mb() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) // 1024


def faults_and_growth(rounds: int = 5) -> tuple[int, int]:
    """The most page faults one round's fresh buffer took (after the first), and the resident set's
    growth over the rounds (each round: a buffer written, a small object kept, the buffer freed)."""
    faults, kept, start = [], [], rss_mb()
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buf = empty_f32(NUMEL).fill_(1.0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        assert buf.dtype == torch.float32 and buf.shape == (NUMEL,) and bool((buf[::4096] == 1.0).all())
        kept.append(bytearray(4000))
        del buf
    return max(faults[1:]), rss_mb() - start


@pytest.fixture
def setting():
    was = hostmem._on
    yield use_huge_pages
    hostmem._on = was


@pytest.mark.skipif(kernel_thp_mode() not in ("always", "madvise"),
                    reason=f"this kernel offers no transparent huge pages (mode {kernel_thp_mode()!r})")
def test_on_faults_a_fresh_state_sized_buffer_in_on_huge_pages_and_gives_it_back(setting):
    assert "on transparent huge pages" in setting("on")
    huge, huge_growth = faults_and_growth()
    assert "off (--huge-pages off)" in setting("off")
    plain, plain_growth = faults_and_growth()
    small_pages = 4 * NUMEL // 4096
    if kernel_thp_mode() == "madvise":   # under "always" the kernel puts every mapping on huge pages anyway
        assert plain >= small_pages // 2, f"4 KiB pages: {plain} faults for a 64 MiB buffer, expected ~{small_pages}"
    assert huge < small_pages // 20, f"--huge-pages on: {huge} faults for a 64 MiB buffer (off: {plain})"
    assert huge_growth < 16 and plain_growth < 16, \
        f"resident set grew by {huge_growth} MB (on) / {plain_growth} MB (off) over 5 rounds of freed buffers"


def test_small_buffers_and_a_kernel_without_huge_pages_use_torch_empty(setting):
    assert "not used: this kernel's transparent huge pages are never" in setting("on", "never")
    assert empty_f32(NUMEL).untyped_storage().nbytes() == 4 * NUMEL   # no mapping of its own, no padding
    setting("on", "madvise")
    small = empty_f32(MIN_BYTES // 4 - 1)
    assert small.untyped_storage().nbytes() == MIN_BYTES - 4
    with pytest.raises(ValueError, match="expected one of"):
        setting("always")
