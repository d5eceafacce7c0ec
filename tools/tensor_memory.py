"""Peak bytes of live CPU/GPU tensors allocated inside a block (a tracemalloc for torch tensors).

tracemalloc does not see torch's allocations, and the process RSS high-water mark mostly
shows what the C allocator kept from earlier work. :class:`TensorMemory` watches every
tensor an op returns (a ``TorchDispatchMode``): a new storage counts its bytes until its
last tensor dies; views count nothing; tensors that existed before the block count nothing.
"""

from __future__ import annotations

import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list] = {}  # data_ptr -> [nbytes, tensors alive]

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def _watch(self, t: torch.Tensor, is_view: bool) -> None:
        if isinstance(t, FakeTensor) or t.device.type == "meta":
            return  # tracing: no memory
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self._storages.get(key)
        if entry is None:
            if is_view:
                return  # a view of a tensor from before the block
            entry = self._storages[key] = [storage.nbytes(), 0]
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, t in enumerate(tree_leaves(out)):
            if isinstance(t, torch.Tensor):
                alias = returns[min(i, len(returns) - 1)].alias_info if returns else None
                self._watch(t, alias is not None)
        return out
