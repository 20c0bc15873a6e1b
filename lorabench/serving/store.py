"""The adapter store: every adapter in host memory, the hot ones in fast-memory slots (LRU), after
S-LoRA's unified paging (arXiv 2311.03285, section 4): the number of adapters served is bounded by
host memory, not by the accelerator's.

Fast memory holds, per target module, the stacked slots the BGMV/SGMV ops read
(lorabench/ops/multi_lora.py): A (capacity, max_rank, in), B (capacity, out, max_rank), ranks and
scales (capacity,). An adapter of rank r fills A[slot, :r] and B[slot, :, :r] of the modules it
adapts and sets rank 0 on the others; what lies past r is left as it is and never read, so slots
need no clearing when an adapter of another rank moves in. On CPU the two memories are the same
RAM and a "load" is the copy into the stacked slots; on CUDA host copies are pinned and the load
is an asynchronous host-to-device copy.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from lorabench.serving.adapters import LoraAdapter, load_adapter


class AdapterStore:
    def __init__(self, modules: dict[str, tuple[int, int]], *, capacity: int, max_rank: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """modules: target module path -> (in, out); capacity: slots in fast memory; max_rank: the
        largest rank a slot holds (1..256 is what the kernels are tested for)."""
        if capacity < 1 or max_rank < 1:
            raise ValueError(f"capacity and max_rank must be >= 1, got {capacity} and {max_rank}")
        self.modules, self.capacity, self.max_rank = dict(modules), capacity, max_rank
        self.device, self.dtype = torch.device(device), dtype
        z = dict(device=self.device)
        self.A = {p: torch.zeros(capacity, max_rank, i, dtype=dtype, **z) for p, (i, o) in modules.items()}
        self.B = {p: torch.zeros(capacity, o, max_rank, dtype=dtype, **z) for p, (i, o) in modules.items()}
        # one (modules, capacity) table each, so that bringing an adapter in sets all its modules' ranks
        # and scales in one copy; ranks[p] / scales[p] are row views of it
        self._ranks = torch.zeros(len(modules), capacity, dtype=torch.int64, **z)
        self._scales = torch.zeros(len(modules), capacity, dtype=torch.float32, **z)
        self.ranks = {p: self._ranks[i] for i, p in enumerate(modules)}
        self.scales = {p: self._scales[i] for i, p in enumerate(modules)}
        self._host: dict[str, LoraAdapter] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._free = list(range(capacity - 1, -1, -1))
        self.hits = self.loads = self.evictions = 0

    # -- host memory ---------------------------------------------------------------------------
    def add(self, adapter: LoraAdapter) -> str:
        unknown = sorted(set(adapter.weights) - set(self.modules))
        if unknown:
            raise ValueError(f"adapter {adapter.name!r} adapts modules this model does not target: {unknown[:4]}; "
                             f"targeted: {sorted(self.modules)[:4]}...")
        for p, (A, B) in adapter.weights.items():
            n_in, n_out = self.modules[p]
            if A.shape[1] != n_in or B.shape[0] != n_out:
                raise ValueError(f"adapter {adapter.name!r}, {p}: A {tuple(A.shape)} / B {tuple(B.shape)} do not fit "
                                 f"the module (in={n_in}, out={n_out})")
            if A.shape[0] > self.max_rank:
                raise ValueError(f"adapter {adapter.name!r}, {p}: rank {A.shape[0]} exceeds the store's max_rank "
                                 f"{self.max_rank}; build the store with a larger max_rank")
        pin = self.device.type == "cuda"
        cast = (lambda t: t.to(self.dtype).contiguous().pin_memory()) if pin else \
               (lambda t: t.to(self.dtype).contiguous())
        weights = {p: (cast(A), cast(B)) for p, (A, B) in adapter.weights.items()}
        if adapter.name in self._resident:  # replaced: the slot's copy is stale
            self._free.append(self._resident.pop(adapter.name))
        self._host[adapter.name] = LoraAdapter(adapter.name, weights, dict(adapter.scales))
        return adapter.name

    def load(self, path: str, name: str | None = None) -> str:
        """Load a lorabench or PEFT adapter from disk into host memory; returns its name."""
        return self.add(load_adapter(path, name))

    def __len__(self) -> int:
        return len(self._host)

    def __contains__(self, name: str) -> bool:
        return name in self._host

    @property
    def names(self) -> list[str]:
        return list(self._host)

    @property
    def resident(self) -> list[str]:
        """Adapters in fast memory, least recently used first."""
        return list(self._resident)

    # -- fast memory ---------------------------------------------------------------------------
    def slots(self, names: Sequence[str | None]) -> torch.Tensor:
        """Slot of each request's adapter (-1 for None), loading missing adapters into fast memory
        and evicting the least recently used ones that this batch does not need."""
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        missing = [n for n in wanted if n not in self._host]
        if missing:
            raise KeyError(f"unknown adapters {missing[:4]}; loaded: {self.names[:8]}"
                           f"{'...' if len(self) > 8 else ''}")
        if len(wanted) > self.capacity:
            raise ValueError(f"a batch names {len(wanted)} distinct adapters but the store has {self.capacity} "
                             "fast-memory slots; split the batch or build the store with a larger capacity")
        for n in wanted:
            if n in self._resident:
                self._resident.move_to_end(n)
                self.hits += 1
            else:
                self._bring_in(n, protect=set(wanted))
        slot = {n: self._resident[n] for n in wanted}
        return torch.tensor([slot[n] if n is not None else -1 for n in names], dtype=torch.int64,
                            device=self.device)

    def _bring_in(self, name: str, protect: set[str]) -> None:
        if not self._free:
            victim = next(n for n in self._resident if n not in protect)  # LRU first
            self._free.append(self._resident.pop(victim))
            self.evictions += 1
        s = self._free.pop()
        adapter = self._host[name]
        ranks, scales = [], []
        for p in self.modules:
            if p not in adapter.weights:
                ranks.append(0)  # this adapter leaves module p alone
                scales.append(0.0)
                continue
            A, B = adapter.weights[p]
            r = A.shape[0]
            self.A[p][s, :r].copy_(A, non_blocking=True)    # rows past r keep stale data, never read
            self.B[p][s, :, :r].copy_(B, non_blocking=True)
            ranks.append(r)
            scales.append(adapter.scales[p])
        self._ranks[:, s] = torch.tensor(ranks, dtype=torch.int64)
        self._scales[:, s] = torch.tensor(scales, dtype=torch.float32)
        self._resident[name] = s
        self.loads += 1

    def fast_bytes(self) -> int:
        """Bytes of the fast-memory slots."""
        return sum(t.numel() * t.element_size() for d in (self.A, self.B) for t in d.values())
