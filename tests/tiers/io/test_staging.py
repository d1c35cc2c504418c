"""Staging buffers: alignment, huge pages where the kernel has them, the fallbacks when it
refuses (no hugetlb pool, no MADV_POPULATE_WRITE, MADV_COLLAPSE failing), and the layout
measurement on synthetic frame numbers and on real buffers."""

from __future__ import annotations

import errno
import mmap
from pathlib import Path

import numpy as np
import pytest
import torch

from tierflow.errors import TierCapacityError
from tierflow.tiers.io import staging
from tierflow.tiers.io.reader import aligned_empty
from tierflow.tiers.io.staging import (HUGE_PAGE_BYTES, BufferLayout, StagingPolicy, buffer_layout, frame_numbers,
                                       huge_share, hugetlb_free_bytes, pieces_per_block, staging_empty)

MiB = 2**20
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    try:
        text = THP.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


needs_thp = pytest.mark.skipif(thp_mode() not in ("always", "madvise"),
                               reason="transparent huge pages are not enabled (or not Linux)")
needs_pfns = pytest.mark.skipif(frame_numbers(torch.ones(4096, dtype=torch.uint8)) is None,
                                reason="/proc/self/pagemap hides frame numbers (needs CAP_SYS_ADMIN)")


def test_staging_buffer_is_aligned_writable_and_outlives_its_views():
    buffer = staging_empty(5 * MiB + 123)
    assert buffer.numel() == 5 * MiB + 123 and buffer.dtype == torch.uint8
    assert buffer.data_ptr() % HUGE_PAGE_BYTES == 0
    view = buffer[7:9]
    del buffer
    view.fill_(5)                         # the mapping stays alive as long as a view of it does
    assert view.tolist() == [5, 5]


def test_policy_is_validated():
    with pytest.raises(ValueError, match="collapse"):
        StagingPolicy(populate=False)
    with pytest.raises(ValueError, match="nbytes"):
        staging_empty(0)


def test_aligned_empty_uses_staging_buffers_from_2_mib():
    big, small = aligned_empty(3 * MiB), aligned_empty(100_000)
    assert big.data_ptr() % HUGE_PAGE_BYTES == 0 and small.data_ptr() % 4096 == 0
    assert big.numel() == 3 * MiB and small.numel() == 100_000


@needs_thp
def test_default_policy_backs_buffers_with_huge_pages():
    layout = buffer_layout(staging_empty(16 * MiB))
    # MADV_COLLAPSE compacts memory when it must; only a machine with almost no memory left
    # could refuse every huge page.
    assert layout.huge_fraction is not None and layout.huge_fraction >= 0.5, layout


@needs_pfns
def test_layout_counts_sane_pieces_on_real_buffers():
    block = 8 * MiB
    for policy in (StagingPolicy(), StagingPolicy(thp=False, collapse=False)):
        layout = buffer_layout(staging_empty(16 * MiB, policy), block)
        assert layout.source == "pagemap"
        assert 1 <= layout.pieces_per_block <= layout.max_pieces_per_block <= block // 4096
    if thp_mode() in ("always", "madvise"):
        huge = buffer_layout(staging_empty(16 * MiB), block)
        assert huge.max_pieces_per_block <= block // HUGE_PAGE_BYTES + 1 or huge.huge_fraction < 1
        assert "huge pages" in huge.describe() and "pieces per 8 MiB" in huge.describe()


def test_pieces_and_huge_share_on_synthetic_frames():
    per_huge = HUGE_PAGE_BYTES // 4096
    contiguous = np.arange(per_huge * 4, per_huge * 8, dtype=np.int64)     # 4 huge, 2 MiB-aligned runs
    assert pieces_per_block(contiguous, per_huge * 2) == [1, 1]
    assert huge_share(contiguous, first_page=0) == 1.0
    scattered = np.arange(0, per_huge * 4, 2, dtype=np.int64)             # every page its own run
    assert pieces_per_block(scattered, 256) == [256] * 4
    assert huge_share(scattered, first_page=0) == 0.0
    holes = contiguous.copy()
    holes[10] = -1                                                        # a page not faulted in
    assert pieces_per_block(holes, per_huge * 4) == [3]
    assert huge_share(holes, first_page=0) == 0.75
    shifted = contiguous + 1                                              # contiguous but not aligned
    assert huge_share(shifted, first_page=0) == 0.0


def test_layout_falls_back_to_smaps_without_frame_numbers(monkeypatch):
    monkeypatch.setattr(staging, "frame_numbers", lambda tensor: None)
    layout = buffer_layout(staging_empty(4 * MiB))
    assert layout.pieces_per_block is None and layout.source in ("smaps", "none")
    if layout.source == "smaps":
        assert 0.0 <= layout.huge_fraction <= 1.0
        assert "smaps" in layout.describe()


def test_describe_names_the_fallback():
    small = BufferLayout(8 * MiB, 8 * MiB, 0.0, 230.0, 402, False, "pagemap")
    assert small.describe() == "4 KiB pages, 230.0 pieces per 8 MiB (worst 402)"
    assert BufferLayout(8 * MiB, 8 * MiB, None, None, None, False, "none").describe().startswith("page layout unknown")


@pytest.mark.skipif(hugetlb_free_bytes() > 0, reason="the hugetlb pool has free pages: MAP_HUGETLB would succeed")
def test_an_empty_hugetlb_pool_falls_back_to_transparent_huge_pages(monkeypatch):
    monkeypatch.setattr(staging, "hugetlb_free_bytes", lambda: 1 << 40)   # /proc/meminfo raced: the pool is empty
    buffer = staging_empty(4 * MiB)
    assert buffer.data_ptr() % HUGE_PAGE_BYTES == 0
    assert not buffer_layout(buffer).hugetlb


@pytest.mark.skipif(hugetlb_free_bytes() < 4 * HUGE_PAGE_BYTES, reason="no free hugetlb pages (none are reserved here)")
def test_hugetlb_pages_are_used_when_the_pool_has_them():
    assert buffer_layout(staging_empty(2 * HUGE_PAGE_BYTES)).hugetlb


class _RefusingMap(mmap.mmap):
    """An anonymous mapping whose madvise refuses ``refused`` advice with ``code``."""

    refused: dict[int, int] = {}

    def madvise(self, option: int, start: int = 0, length: int = 0) -> None:  # type: ignore[override]
        if option in self.refused:
            raise OSError(self.refused[option], "refused")
        super().madvise(option, start, length)


def _refusing(monkeypatch, refused: dict[int, int]) -> None:
    monkeypatch.setattr(_RefusingMap, "refused", refused)

    def anonymous(nbytes: int):
        m = _RefusingMap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return m, (-np.frombuffer(m, dtype=np.uint8, count=1).ctypes.data) % HUGE_PAGE_BYTES
    monkeypatch.setattr(staging, "_anonymous_map", anonymous)


def test_without_madv_populate_write_pages_are_touched_instead(monkeypatch):
    _refusing(monkeypatch, {staging._MADV_POPULATE_WRITE: errno.EINVAL})
    buffer = staging_empty(4 * MiB)
    if frame_numbers(buffer[:4096]) is not None:
        assert (frame_numbers(buffer) >= 0).all()      # every page is present already
    buffer.fill_(1)
    assert int(buffer.sum()) == 4 * MiB


def test_a_failing_collapse_keeps_the_buffer(monkeypatch):
    _refusing(monkeypatch, {staging._MADV_COLLAPSE: errno.EAGAIN, mmap.MADV_HUGEPAGE: errno.EINVAL})
    buffer = staging_empty(4 * MiB)
    buffer.fill_(2)
    assert int(buffer[-1]) == 2


def test_populate_out_of_memory_is_a_capacity_error(monkeypatch):
    _refusing(monkeypatch, {staging._MADV_POPULATE_WRITE: errno.ENOMEM})
    with pytest.raises(TierCapacityError, match="staging buffer"):
        staging_empty(4 * MiB)


def test_lock_locks_or_says_why():
    try:
        buffer = staging_empty(2 * MiB, StagingPolicy(lock=True))
    except TierCapacityError as exc:                   # an unprivileged RLIMIT_MEMLOCK of a few MiB
        assert "RLIMIT_MEMLOCK" in str(exc)
        return
    buffer.fill_(3)
    assert int(buffer[0]) == 3


def test_collapse_is_tried_again_only_when_no_huge_page_was_free(monkeypatch):
    calls: list[int] = []

    class Counting(_RefusingMap):
        def madvise(self, option: int, start: int = 0, length: int = 0) -> None:  # type: ignore[override]
            if option == staging._MADV_COLLAPSE:
                calls.append(option)
            super().madvise(option, start, length)

    for code, expected in ((errno.EAGAIN, 4), (errno.ENOMEM, 4), (errno.EINVAL, 1)):
        calls.clear()
        monkeypatch.setattr(Counting, "refused", {staging._MADV_COLLAPSE: code})
        mapping = Counting(-1, 4 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        staging._collapse(mapping, 0, 4 * MiB, backoff_s=0.0)
        assert len(calls) == expected
