"""The kv_load and kv_spill stages of a sweep, as the paged store's ``BlockIO`` (``KVStages``).

kv_load (``stages/kv_load.py:KVLoader``) reads the sweep's off-device blocks ahead of attention
in the order of its plan (``plan_loads``), and then the next sweep's first ones.

kv_spill (``stages/kv_spill.py:KVSpiller``). A paged handle commits a full block bound for the
host or disk tier by copying it into a spill buffer (``commit``), which it keeps as fresh so
this sweep's attention reads it from memory. After the layer's compute the runner calls
``after_layer``: the layer's new blocks are written to their tier on the store's writer thread,
overlapping the next units, and each buffer is reused only once its write has landed. Buffers
are bounded (``max_buffers``); a commit that finds none free waits for the oldest write in
flight (a layer's own new blocks are always held: that wait has nothing to wait for). A write
that fails fails its sequence (``kv.fail``) and nobody else's. ``drain`` waits for every write;
the sweep ends with it, so the prefix cache and the next sweep see every block in its tier.

On CUDA, ``DeviceKV`` (``stages/kv_device.py``) moves the bytes: blocks from the host pool or the
disk window go to device staging buffers on a copy stream, the compute stream waits for the
copy's event, and new blocks leave the device on the copy stream after an event of the compute
that produced them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

import torch

from tierflow.stages.kv_load import KVLoader, LoadStats
from tierflow.stages.kv_plan import KVLoadPlan, KVRead, plan_loads
from tierflow.stages.kv_spill import KVSpiller
from tierflow.tiers.kv.blocks import BlockRef
from tierflow.tiers.kv.handle import KVHandle
from tierflow.tiers.kv.paged import KVStore

__all__ = ["KVLoadPlan", "KVLoader", "KVRead", "KVStages", "LoadStats", "plan_loads"]


class KVStages:
    """kv_load and kv_spill of one engine, the paged store's ``BlockIO`` while a sweep runs."""

    def __init__(self, store: KVStore, device: Any = None) -> None:
        """``device``: a ``kv_device.DeviceKV`` on CUDA (None on CPU, where the device is the host)."""
        self.store = store
        self.loader = KVLoader(store, place=device.place if device else None,
                               before_read=device.before_read if device else None)
        self.spiller = KVSpiller(store, new_buffer=device.new_buffer if device else None,
                                 write=device.write if device else None,
                                 stage_out=device.stage_out if device else None)

    def begin(self, plan: KVLoadPlan, handles: Sequence[KVHandle],
              ahead: Callable[[int], Sequence[KVRead] | None] | None = None) -> None:
        """``ahead``: the next sweep's reads of a layer, as ``KVLoader.begin`` takes them."""
        self.spiller.begin(handles)
        self.loader.begin(plan, ahead)
        self.store.attach(self)

    def commit(self, seq_id: int, layer: int, ref: BlockRef, block: torch.Tensor) -> torch.Tensor | None:
        self.store.forget(ref)      # a read ahead must not take a reused slot's old block for this one
        return self.spiller.commit(seq_id, layer, ref, block)

    def load(self, seq_id: int, layer: int, index: int, ref: BlockRef) -> torch.Tensor:
        return self.loader.take(seq_id, layer, index, ref)

    def together(self, seq_id: int, layer: int, index: int, count: int) -> int:
        return self.loader.together(seq_id, layer, index, count)

    def first_planned(self, seq_id: int, layer: int) -> int | None:
        return self.loader.first_planned(seq_id, layer)

    def after_layer(self, layer: int) -> None:
        """In the compute worker, after the layer's compute (enqueued, on CUDA)."""
        self.loader.finish_layer(layer)
        self.spiller.after_layer(layer)

    async def end(self) -> None:
        """Every spill of the sweep has landed and no read of its plan is running (reads ahead
        for the next sweep go on); handles go back to DirectIO."""
        try:
            pending = self.spiller.drain()
            if pending:
                await asyncio.gather(*(asyncio.wrap_future(f) for f in pending), return_exceptions=True)
        finally:
            await asyncio.to_thread(self.loader.end)
            if self.store.retiring:         # a spill file deleted under the engine is closed now
                await asyncio.to_thread(self.loader.drop_ahead)
            self.store.detach()

