"""A candidate tree's attention mask: which of a chunk's own tokens each of its queries sees.

Speculative decoding with a candidate tree (``engine/speculative.py``) verifies several
continuations of one sequence in one chunk: the sequence's last known token (the root), then
proposed tokens, each the child of an earlier token of the chunk. A chunk token's KV sits in the
slot it was appended to, in chunk order, but it means "the token at position ``start + depth``
after its ancestors" — so a query sees every key before the chunk (the sequence so far, within
its sliding window) and, of the chunk's own keys, only its ancestors' and its own. Rotary
positions are the depths too (the driver builds the batch's positions from ``positions``).

``TreeMask`` holds the parent of every chunk token (-1: none in the chunk, i.e. the root);
``visible`` is the [queries, keys] mask of one block of keys for ``attention._online_softmax``,
and the only thing attention needs. A chain (parents 0, 1, 2, ...) is the causal mask, so the
mask generalises the chunk attention it replaces for the sequences that carry one.

The tree lives only in the sweep that verifies it: afterwards the driver keeps the KV of the
accepted path, moved down to consecutive slots (``tiers/kv/handle.keep_path``), and forgets the
rest, so nothing past that sweep ever sees a slot that is not its position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch


@dataclass(frozen=True, slots=True)
class TreeMask:
    """The tree of one sequence's chunk: ``parents[j]`` is the chunk offset of token j's parent
    (-1 for a token whose parent is before the chunk), always < j."""

    parents: tuple[int, ...]
    depths: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        depths: list[int] = []
        for j, parent in enumerate(self.parents):
            if not -1 <= parent < j:
                raise ValueError(f"token {j} of a candidate tree has parent {parent}: a parent comes before its "
                                 "child in the chunk (or is -1, before the chunk)")
            depths.append(0 if parent < 0 else depths[parent] + 1)
        object.__setattr__(self, "depths", tuple(depths))

    @staticmethod
    def chain(n: int) -> "TreeMask":
        return TreeMask(tuple(range(-1, n - 1)))

    def __len__(self) -> int:
        return len(self.parents)

    def positions(self, start: int) -> list[int]:
        """The position of each chunk token when the chunk starts at ``start``."""
        return [start + d for d in self.depths]

    def ancestry(self) -> list[list[bool]]:
        """[queries, keys] over the chunk: whether key k is query j's ancestor or j itself."""
        rows: list[list[bool]] = []
        for j, parent in enumerate(self.parents):
            row = list(rows[parent]) if parent >= 0 else [False] * len(self.parents)
            row[j] = True
            rows.append(row)
        return rows

    def on(self, device: torch.device | str) -> "DeviceTree":
        """The mask's tensors on ``device`` (built once per sweep, used by every layer)."""
        return DeviceTree(self, torch.tensor(self.ancestry(), dtype=torch.bool, device=device),
                          torch.tensor(self.depths, dtype=torch.long, device=device))


@dataclass(frozen=True, slots=True)
class DeviceTree:
    """A ``TreeMask`` with its ancestry [n, n] and depths [n] on the sweep's device."""

    tree: TreeMask
    ancestry: torch.Tensor
    depths: torch.Tensor

    def visible(self, start: int, first: int, t: int, window: int | None) -> torch.Tensor:
        """[n, t] bool: which of the keys in slots first..first+t-1 each chunk query (the chunk
        starting at slot ``start``) sees — every key before the chunk, its ancestors' and its
        own of the chunk's, and under a sliding ``window`` only keys whose position is within
        it of the query's."""
        n, device = len(self.tree), self.ancestry.device
        slots = torch.arange(first, first + t, device=device)
        inside = slots >= start
        seen = (~inside)[None, :].expand(n, t).clone()
        lo, hi = max(first, start), min(first + t, start + n)
        if hi > lo:
            seen[:, lo - first:hi - first] = self.ancestry[:, lo - start:hi - start]
        if window is not None:
            offsets = (slots - start).clamp(0, n - 1)
            key_pos = torch.where(inside, start + self.depths[offsets], slots)
            query_pos = start + self.depths
            seen &= key_pos[None, :] > query_pos[:, None] - window
        return seen

