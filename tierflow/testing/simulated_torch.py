"""The torch calls on ``SimulatedCuda``'s device tensors (the model: ``simulated_cuda``'s docstring):
the tensor subclass that routes every call on device memory to the simulation, the mode that makes
a factory call naming the device allocate device memory, and the dispatch that logs each kernel's
use of a block in its stream's order and counts the calls that synchronise with the host. A base
class of ``SimulatedCuda``, apart because which torch calls sync, write or only make a view is a
table of torch's behaviour, not of the device's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:
    from tierflow.testing.simulated_cuda import SimulatedCuda

_SYNC_METHODS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero",
                 "masked_select", "unique", "unique_consecutive", "bincount", "argwhere", "nonzero_static"}
_FACTORIES = {"empty", "zeros", "ones", "full", "arange", "linspace", "rand", "randn", "eye", "empty_strided",
              "tensor", "as_tensor", "randint"}
_DATA_FACTORIES = {"tensor", "as_tensor"}
# calls that only make a view (no kernel runs, so no stream does anything)
_VIEWS = {"view", "view_as", "reshape", "__getitem__", "transpose", "t", "permute", "expand", "expand_as", "narrow",
          "select", "unsqueeze", "squeeze", "flatten", "unflatten", "split", "chunk", "unbind", "detach", "as_strided",
          "__get__", "data_ptr", "untyped_storage", "element_size", "numel", "dim", "size", "stride", "is_contiguous",
          "storage_offset", "movedim", "swapaxes", "diagonal", "unfold", "tensor_split", "real", "__len__",
          "__iter__", "__repr__", "__format__", "_make_subclass", "as_subclass", "is_floating_point", "is_pinned"}


class _DeviceTensor(torch.Tensor):
    """A tensor in a ``SimulatedCuda``'s device memory (each simulation has its own subclass)."""
    _sim: "SimulatedCuda"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return cls._sim._dispatch(cls, func, args, kwargs or {})


class _FactoryMode(torch.overrides.TorchFunctionMode):
    """Active while a thread uses a simulated stream: a factory call that names a device (as
    ``torch.zeros(..., device=q.device)`` does) makes device memory, and a host tensor moved
    with ``.to(device)`` becomes a device copy (a blocking one: counted)."""

    def __init__(self, sim: "SimulatedCuda") -> None:
        super().__init__()
        self.sim = sim

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        sim = self.sim
        if name in _FACTORIES and kwargs.get("device") is not None and getattr(func, "__module__", "") == "torch":
            out = func(*args, **kwargs)
            if name in _DATA_FACTORIES:
                sim._sync(f"torch.{name}(..., device=...): a copy from pageable host memory")
            return sim._adopt(out, f"torch.{name}")
        if name == "to" and args and type(args[0]) is torch.Tensor and _to_device_arg(args[1:], kwargs):
            source = args[0]
            out = func(*args, **kwargs)
            if out is source or out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
                out = out.clone()
            if not (kwargs.get("non_blocking") and sim._is_pinned(source)):
                sim._sync("Tensor.to(device) from host memory, blocking or pageable")
            return sim._adopt(out, "Tensor.to")
        return func(*args, **kwargs)


def _to_device_arg(args: Any, kwargs: Any) -> bool:
    """Whether a ``Tensor.to`` call names a ``torch.device`` (the simulated device)."""
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, torch.device)


def _to_host_arg(args: Any, kwargs: Any) -> bool:
    """Whether a ``Tensor.to`` call names the host: the string "cpu"."""
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, str) and target.startswith("cpu")


class TorchCalls:
    """The dispatch of torch calls on ``SimulatedCuda``'s device tensors (its base class)."""

    # -- the torch calls on device tensors -----------------------------------------------------

    def _dispatch(self, cls: type, func: Any, args: Any, kwargs: Any) -> Any:
        name = getattr(func, "__name__", "")
        tensors = [t for t in _flatten((args, kwargs)) if isinstance(t, torch.Tensor)]
        device = [t for t in tensors if isinstance(t, cls)]
        reason = self._sync_reason(name, func, args, kwargs, cls)
        if reason and not hasattr(self._local, "seq"):   # a stream's own work was counted when enqueued
            self._sync(reason)
        written = _written(name, args, kwargs)
        kernel = name not in _VIEWS or reason is not None
        # a kernel runs in its stream's order: after the work already queued on it
        seq = self._position(self._current()) if kernel and device else 0
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if seq:
            for t in device:
                self._use(t, any(t is w for w in written), name, seq)
        if name in ("cpu", "numpy") or (name == "to" and _to_host_arg(args[1:], kwargs)):
            with torch._C.DisableTorchFunctionSubclass():
                return out.clone() if isinstance(out, torch.Tensor) else out     # a host copy, not an alias
        if written and out is written[0]:
            return out                         # an in-place call returns its (unconverted) target
        with torch._C.DisableTorchFunctionSubclass():
            host = {t.untyped_storage().data_ptr() for t in tensors if not isinstance(t, cls)}
        return self._wrap(out, cls, host)

    def _wrap(self, out: Any, cls: type, host: set[int]) -> Any:
        if isinstance(out, torch.Tensor):
            if isinstance(out, cls) or type(out) is not torch.Tensor:
                return out
            with torch._C.DisableTorchFunctionSubclass():
                if out.untyped_storage().data_ptr() in host:      # an alias of a host input stays a host tensor
                    return out
            return self._adopt(out, "result")
        if isinstance(out, (tuple, list)):
            return type(out)([self._wrap(o, cls, host) for o in out])
        return out

    def _sync_reason(self, name: str, func: Any, args: Any, kwargs: Any, cls: type) -> str | None:
        target = args[0] if args else None
        on_device = isinstance(target, cls)
        if name in _SYNC_METHODS and on_device:
            return f"Tensor.{name}() of a device tensor"
        if name == "where" and len(args) + len(kwargs) == 1:
            return "torch.where(condition): nonzero"
        if name == "to" and on_device and _to_host_arg(args[1:], kwargs):
            return "Tensor.to('cpu') of a device tensor"
        if name == "repeat_interleave" and "output_size" not in kwargs and \
                any(isinstance(a, cls) for a in args[1:2]):
            return "repeat_interleave without output_size"
        if name in ("__getitem__", "__setitem__", "index_put_", "index_put") and on_device and len(args) > 1:
            for index in _flatten(args[1]):
                if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                    return f"{name} with a boolean mask: nonzero"
                if isinstance(index, torch.Tensor) and not isinstance(index, cls) and index.dim() > 0:
                    return f"{name} with a host index tensor: a blocking copy"
        if name == "copy_" and len(args) > 1:
            dst, src = args[0], args[1]
            if isinstance(dst, cls) != isinstance(src, cls):
                host = src if isinstance(dst, cls) else dst
                if not (kwargs.get("non_blocking") or (len(args) > 2 and args[2])):
                    return "a blocking copy between the device and the host"
                if not self._is_pinned(host):
                    return "an asynchronous copy from or to pageable host memory"
        return None


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value


def _written(name: str, args: Any, kwargs: Any) -> list[torch.Tensor]:
    """The tensors a torch call writes: an in-place method's target, ``out=``."""
    written = []
    if args and isinstance(args[0], torch.Tensor) and (name == "__setitem__" or
                                                       (name.endswith("_") and not name.startswith("__")) or
                                                       name.startswith("__i")):
        written.append(args[0])
    out = kwargs.get("out")
    written.extend(t for t in _flatten(out) if isinstance(t, torch.Tensor))
    return written
