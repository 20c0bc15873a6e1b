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

Cost of a batch: an adapter added while a slot is free is brought in at once (free slots would
otherwise sit idle), so with `capacity` >= the adapters served a batch never copies. The adapters a
batch misses are brought in together: every (A, B) copy of all of them in one `_foreach_copy_` and the
ranks and scales of their slots in one `index_copy_` each, instead of two copies per module per
adapter from Python (measured on CPU: 64 misses of 8 modules went from ~15 ms to the time of the
copies themselves).
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
        self._plan: dict[str, tuple[list, torch.Tensor, torch.Tensor]] = {}  # see add()
        self._Ab = [(self.A[p], self.B[p]) for p in modules]  # by module number
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
        # what a load copies, computed once: (module number, A, B) and the slot's ranks / scales column
        self._plan[adapter.name] = (
            [(i, A, B) for i, p in enumerate(self.modules) if p in weights for A, B in [weights[p]]],
            torch.tensor([weights[p][0].shape[0] if p in weights else 0 for p in self.modules], dtype=torch.int64),
            torch.tensor([float(adapter.scales[p]) if p in weights else 0.0 for p in self.modules],
                         dtype=torch.float32))
        if self._free:  # a free slot would sit idle: bring the adapter in now, not in a batch's time
            self._bring_in([adapter.name], protect=set())
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
        missing = [n for n in wanted if n not in self._resident]
        self.hits += len(wanted) - len(missing)
        if missing:
            self._bring_in(missing, protect=set(wanted))
        for n in wanted:  # most recently used last, in the batch's order
            self._resident.move_to_end(n)
        slot = {n: self._resident[n] for n in wanted}
        return torch.tensor([slot[n] if n is not None else -1 for n in names], dtype=torch.int64,
                            device=self.device)

    def _bring_in(self, names: list[str], protect: set[str]) -> None:
        """Copy adapters `names` (not resident) into free slots, evicting LRU adapters not in `protect`."""
        slots, dst, src = [], [], []
        for name in names:
            if not self._free:
                victim = next(n for n in self._resident if n not in protect)  # LRU first
                self._free.append(self._resident.pop(victim))
                self.evictions += 1
            s = self._free.pop()
            for i, A, B in self._plan[name][0]:
                r = A.shape[0]
                fa, fb = self._Ab[i]
                dst += (fa[s, :r], fb[s, :, :r])  # rows / columns past r keep stale data, never read
                src += (A, B)
            self._resident[name] = s
            slots.append(s)
        if dst:
            torch._foreach_copy_(dst, src, non_blocking=True)
        at = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self._ranks.index_copy_(1, at, torch.stack([self._plan[n][1] for n in names], 1).to(self.device))
        self._scales.index_copy_(1, at, torch.stack([self._plan[n][2] for n in names], 1).to(self.device))
        self.loads += len(names)

    def fast_bytes(self) -> int:
        """Bytes of the fast-memory slots."""
        return sum(t.numel() * t.element_size() for d in (self.A, self.B) for t in d.values())
