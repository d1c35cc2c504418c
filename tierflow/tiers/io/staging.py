"""Staging buffers that O_DIRECT reads land in, physically contiguous wherever the kernel allows.

An O_DIRECT read DMAs straight into the caller's pages. The block layer turns each physically
contiguous run of the buffer into one segment, and a device takes only so many segments per
request (``queue/max_segments``, 254 on virtio-blk): a read into scattered 4 KiB pages is
split into many small requests, which costs a measured quarter of the disk's bandwidth. With
memory free, the kernel's transparent huge pages (THP) give 2 MiB runs for free; when most of
RAM is taken (another process, or the page cache of a model bigger than RAM), faulting pages
in lazily — on the first read — finds no free 2 MiB block and falls back to 4 KiB pages.

So a staging buffer of 2 MiB or more is its own anonymous mapping, 2 MiB aligned, and is
backed once, when it is made (``StagingPolicy``; the engine makes its buffers when it opens):

1. ``hugetlb``: MAP_HUGETLB, only when the hugetlb pool already has enough free pages
   (``HugePages_Free``); tierflow never reserves any (that is a system setting);
2. ``thp``: MADV_HUGEPAGE, then every page faulted in at once (MADV_POPULATE_WRITE), then
   MADV_COLLAPSE (Linux 6.1+, up to four tries), which compacts memory synchronously to
   replace whatever was faulted with small pages by huge ones — the step that keeps reads
   fast under pressure;
3. otherwise the same mapping stays in 4 KiB pages (still faulted in once).

``lock`` also mlocks the buffer (off by default: it needs CAP_IPC_LOCK or RLIMIT_MEMLOCK,
and a CUDA engine pins its arena anyway). ``buffer_layout`` measures what a buffer got —
physically contiguous pieces per read block from /proc/self/pagemap (which shows frame
numbers only with CAP_SYS_ADMIN) and the share in 2 MiB pages, or, without frame numbers,
the share in huge pages from /proc/self/smaps as a proxy — so that the probe and the
benchmarks can say what the disk figures were measured with. io_uring with registered
buffers would pin pages but not make them contiguous, and needs a package outside the
standard library; it is not used.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tierflow.errors import TierCapacityError

log = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 * 2**20
SMALL_PAGE_BYTES = mmap.PAGESIZE
_MAP_HUGETLB = 0x40000                      # Linux, every architecture tierflow runs on
_MADV_POPULATE_WRITE = 23                   # Linux 5.14
_MADV_COLLAPSE = 25                         # Linux 6.1
_PFN_MASK = (1 << 55) - 1
_PRESENT = 1 << 63


@dataclass(frozen=True, slots=True)
class StagingPolicy:
    """How ``staging_empty`` backs a buffer of 2 MiB or more (smaller ones come from the heap)."""

    hugetlb: bool = True      # use free pages of the hugetlb pool when it has enough
    thp: bool = True          # advise transparent huge pages
    populate: bool = True     # fault every page in now (False: on first touch, as the heap does)
    collapse: bool = True     # MADV_COLLAPSE after populating: compaction now, not 4 KiB pages
    lock: bool = False        # mlock the buffer

    def __post_init__(self) -> None:
        if self.collapse and not (self.thp and self.populate):
            raise ValueError("StagingPolicy.collapse needs thp=True and populate=True")


DEFAULT_POLICY = StagingPolicy()


def hugetlb_free_bytes() -> int:
    """Bytes of free pages in the default hugetlb pool (0 without one)."""
    fields: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("HugePages_Free", "HugePages_Rsvd", "Hugepagesize"):
                fields[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    if fields.get("Hugepagesize", 0) * 1024 != HUGE_PAGE_BYTES:
        return 0
    return max(0, fields.get("HugePages_Free", 0) - fields.get("HugePages_Rsvd", 0)) * HUGE_PAGE_BYTES


def staging_empty(nbytes: int, policy: StagingPolicy = DEFAULT_POLICY) -> torch.Tensor:
    """A uint8 tensor of ``nbytes``, 2 MiB aligned, backed as ``policy`` says (see the module)."""
    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    rounded = -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    mapping = _hugetlb_map(rounded) if policy.hugetlb and hugetlb_free_bytes() >= rounded else None
    if mapping is not None:
        start = 0
        if policy.populate:
            _populate(mapping, 0, rounded)
    else:
        mapping, start = _anonymous_map(rounded)
        if policy.thp:
            _madvise(mapping, start, rounded, mmap.MADV_HUGEPAGE)
        if policy.populate:
            _populate(mapping, start, rounded)
        if policy.collapse:
            _collapse(mapping, start, rounded)
    tensor = torch.frombuffer(mapping, dtype=torch.uint8)[start:start + nbytes]
    if policy.lock:
        _mlock(tensor)
    return tensor


def _hugetlb_map(nbytes: int) -> mmap.mmap | None:
    try:
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_HUGETLB)
    except OSError as exc:      # the pool emptied since /proc/meminfo was read, or no hugetlbfs
        log.debug("MAP_HUGETLB of %d bytes refused (%s); using transparent huge pages", nbytes, exc.strerror)
        return None


def _anonymous_map(nbytes: int) -> tuple[mmap.mmap, int]:
    """A private anonymous mapping with a 2 MiB-aligned range of ``nbytes``; (mapping, offset)."""
    try:
        mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:
        raise TierCapacityError(f"cannot map a staging buffer of {nbytes} bytes ({exc.strerror}); lower the "
                                "plan's staging (fewer or smaller slots) or free memory") from exc
    address = np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data
    return mapping, (-address) % HUGE_PAGE_BYTES


def _madvise(mapping: mmap.mmap, start: int, nbytes: int, advice: int) -> bool:
    try:
        mapping.madvise(advice, start, nbytes)
        return True
    except (OSError, AttributeError, ValueError) as exc:
        # EINVAL: an older kernel without this advice; EAGAIN / ENOMEM (MADV_COLLAPSE): no huge
        # page could be made for some ranges, which stay in small pages; both still work.
        log.debug("madvise(%d) on %d bytes: %s", advice, nbytes, getattr(exc, "strerror", exc))
        return False


def _collapse(mapping: mmap.mmap, start: int, nbytes: int, tries: int = 4, backoff_s: float = 0.01) -> None:
    """MADV_COLLAPSE, tried again while it fails for want of a free huge page (EAGAIN, ENOMEM),
    after 10, 20, 40 ms: a failed huge-page allocation wakes kswapd and kcompactd, which
    reclaim and compact in the background, and with RAM nearly full one synchronous pass
    often frees too little. An older kernel (EINVAL) is not tried again; ranges left in small
    pages still work. Only buffers being made at open wait, and only when memory is short."""
    for attempt in range(tries):
        try:
            mapping.madvise(_MADV_COLLAPSE, start, nbytes)
            return
        except (OSError, AttributeError, ValueError) as exc:
            code = getattr(exc, "errno", None)
            log.debug("madvise(MADV_COLLAPSE) of %d bytes, attempt %d: %s", nbytes, attempt + 1,
                      getattr(exc, "strerror", exc))
            if code not in (errno.EAGAIN, errno.ENOMEM) or attempt + 1 == tries:
                return
            time.sleep(backoff_s * 2**attempt)


def _populate(mapping: mmap.mmap, start: int, nbytes: int) -> None:
    try:
        mapping.madvise(_MADV_POPULATE_WRITE, start, nbytes)
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise TierCapacityError(f"cannot back a staging buffer of {nbytes} bytes ({exc.strerror}); lower the "
                                    "plan's staging (fewer or smaller slots) or free memory") from exc
    except AttributeError:      # no madvise on this platform
        pass
    view = np.frombuffer(mapping, dtype=np.uint8)[start:start + nbytes]
    view[::SMALL_PAGE_BYTES] = 0    # one write per page faults it in


def _mlock(tensor: torch.Tensor) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlock(ctypes.c_void_p(tensor.data_ptr()), ctypes.c_size_t(tensor.numel())) != 0:
        code = ctypes.get_errno()
        raise TierCapacityError(f"cannot mlock a staging buffer of {tensor.numel()} bytes ({os.strerror(code)}); "
                                "raise RLIMIT_MEMLOCK (ulimit -l) or use StagingPolicy(lock=False)")


# ----------------------------------------------------------------------------- measuring a buffer
@dataclass(frozen=True, slots=True)
class BufferLayout:
    """What backs a buffer, as the kernel reports it."""

    nbytes: int
    block_bytes: int                   # the read size ``pieces_per_block`` is counted over
    huge_fraction: float | None        # share in 2 MiB pages (physically contiguous, aligned 2 MiB runs)
    pieces_per_block: float | None     # mean physically contiguous runs per block; None without frame numbers
    max_pieces_per_block: int | None   # the worst block
    hugetlb: bool                      # backed by the hugetlb pool
    source: str                        # "pagemap" (frame numbers) | "smaps" (huge-page share only) | "none"

    def describe(self) -> str:
        """One line for a report: which pages, and how many pieces a read block is in."""
        block = f"{self.block_bytes / 2**20:g} MiB"
        if self.huge_fraction is None:
            return "page layout unknown (no /proc/self/pagemap or smaps)"
        kind = "hugetlb" if self.hugetlb else "THP"
        pages = (f"huge pages: {self.huge_fraction:.0%} {kind}" if self.huge_fraction > 0
                 else f"{SMALL_PAGE_BYTES >> 10} KiB pages")
        if self.pieces_per_block is None:
            return f"{pages} (smaps; frame numbers need CAP_SYS_ADMIN)"
        return f"{pages}, {self.pieces_per_block:.1f} pieces per {block} (worst {self.max_pieces_per_block})"

    def as_dict(self) -> dict[str, object]:
        return {"huge_fraction": self.huge_fraction, "pieces_per_block": self.pieces_per_block,
                "max_pieces_per_block": self.max_pieces_per_block, "block_bytes": self.block_bytes,
                "hugetlb": self.hugetlb, "source": self.source, "layout": self.describe()}


def frame_numbers(tensor: torch.Tensor) -> np.ndarray | None:
    """The physical frame number of each 4 KiB page of ``tensor`` (-1: not present), or None
    when the kernel hides them (reading /proc/self/pagemap without CAP_SYS_ADMIN gives zeros)."""
    first = tensor.data_ptr() // SMALL_PAGE_BYTES
    last = -(-(tensor.data_ptr() + tensor.numel()) // SMALL_PAGE_BYTES)
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first * 8)
            raw = np.frombuffer(f.read((last - first) * 8), dtype=np.uint64)
    except OSError:
        return None
    present = (raw & np.uint64(_PRESENT)) != 0
    pfns = (raw & np.uint64(_PFN_MASK)).astype(np.int64)
    if present.any() and not pfns[present].any():
        return None
    return np.where(present, pfns, -1)


def buffer_layout(tensor: torch.Tensor, block_bytes: int = 8 * 2**20) -> BufferLayout:
    """Measure ``tensor``'s pages (touch it first: pages not yet faulted in count as scattered)."""
    nbytes, (smaps_share, hugetlb) = tensor.numel(), _smaps(tensor)
    pfns = frame_numbers(tensor)
    if pfns is None:
        share = smaps_share
        return BufferLayout(nbytes, block_bytes, share, None, None, hugetlb, "none" if share is None else "smaps")
    first_page = tensor.data_ptr() // SMALL_PAGE_BYTES
    pieces = pieces_per_block(pfns, max(1, block_bytes // SMALL_PAGE_BYTES))
    return BufferLayout(nbytes, block_bytes, huge_share(pfns, first_page), sum(pieces) / len(pieces), max(pieces),
                        hugetlb, "pagemap")


def pieces_per_block(pfns: np.ndarray, pages_per_block: int) -> list[int]:
    """Physically contiguous runs in each block of ``pages_per_block`` pages (-1: not present)."""
    starts = np.ones(len(pfns), dtype=bool)      # page k starts a run unless it follows page k-1
    starts[1:] = (np.diff(pfns) != 1) | (pfns[1:] < 0)
    return [int(starts[b:b + pages_per_block].sum()) + (0 if starts[b] else 1)
            for b in range(0, len(pfns), pages_per_block)]


def huge_share(pfns: np.ndarray, first_page: int) -> float:
    """Share of the 2 MiB-aligned virtual regions inside ``pfns`` (virtual page ``first_page``
    first) that sit on one physical, 2 MiB-aligned run: a huge page, THP or hugetlb."""
    per_huge = HUGE_PAGE_BYTES // SMALL_PAGE_BYTES
    skip = (-first_page) % per_huge
    regions = [pfns[s] >= 0 and pfns[s] % per_huge == 0 and bool(np.all(np.diff(pfns[s:s + per_huge]) == 1))
               for s in range(skip, len(pfns) - per_huge + 1, per_huge)]
    return sum(regions) / len(regions) if regions else 0.0


def _smaps(tensor: torch.Tensor) -> tuple[float | None, bool]:
    """(huge-page share, hugetlb) of the mappings that overlap ``tensor``, from /proc/self/smaps.
    The share is of the whole mappings, which may be larger than the tensor: a proxy."""
    lo, hi = tensor.data_ptr(), tensor.data_ptr() + tensor.numel()
    size = huge = 0
    hugetlb = False
    inside = False
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None, False
    for line in lines:
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start < hi and end > lo
            if inside:
                size += end - start
        elif inside and head in ("AnonHugePages:", "Private_Hugetlb:", "Shared_Hugetlb:"):
            kib = int(line.split()[1]) * 1024
            huge += kib
            hugetlb |= head != "AnonHugePages:" and kib > 0
    return (min(1.0, huge / size) if size else None), hugetlb
