"""One frozen base model serving many LoRA adapters in one batch (Punica arXiv 2310.18547, S-LoRA
arXiv 2311.03285).

Each target nn.Linear is replaced by a `MultiLoraLinear` that computes, for every token i,
`h_i = W0 x_i + s_l B_l A_l x_i` with l the adapter of token i's request (eq. (3) of LoRA,
arXiv 2106.09685): the base GEMM once for the whole batch, then the LoRA term with the gather ops
(BGMV when every request has one token, i.e. decode; SGMV over one segment per request otherwise,
i.e. prefill). Adapters live in an `AdapterStore` (LRU between host and fast memory).

    model = MultiLoraModel(LlamaForCausalLM(config), target_modules=("q_proj", "v_proj"))
    model.load_adapter("a.safetensors"); model.load_adapter("peft_dir/", name="b")
    logits = model(input_ids, adapter_names=["a", "b", None, "a"]).logits   # one name per request
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lorabench.ops import multi_lora as ops
from lorabench.serving.adapters import LoraAdapter
from lorabench.serving.store import AdapterStore


@dataclass
class _Batch:
    """Where each token's adapter is, for the forward in progress (shared by all MultiLoraLinear)."""
    idx: torch.Tensor | None = None         # (T,) slot per token: BGMV
    seg_starts: torch.Tensor | None = None  # (S+1,) with seg_idx (S,): SGMV
    seg_idx: torch.Tensor | None = None


class MultiLoraLinear(nn.Module):
    """base(x) + the LoRA term of each token's adapter, read from the store's slots of `path`."""

    def __init__(self, base: nn.Linear, store: AdapterStore, path: str, batch: _Batch, backend: str | None):
        super().__init__()
        self.base, self.path, self.backend = base, path, backend
        self._store, self._batch = store, batch  # plain attributes: not submodules, not in state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., out): the base GEMM for every request at once
        b = self._batch
        if b.idx is None and b.seg_idx is None:
            return out
        s, p = self._store, self.path
        x2, o2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])  # (T, in), (T, out)
        if b.idx is not None:
            torch._check(b.idx.shape[0] == x2.shape[0], lambda: f"{p}: {b.idx.shape[0]} adapter indices for "
                                                                f"{x2.shape[0]} tokens")
            y = ops.bgmv_shrink(x2, s.A[p], b.idx, s.ranks[p], s.scales[p], backend=self.backend)  # (T, R)
            ops.bgmv_expand(o2, y, s.B[p], b.idx, s.ranks[p], backend=self.backend)
        else:
            y = ops.sgmv_shrink(x2, s.A[p], b.seg_starts, b.seg_idx, s.ranks[p], s.scales[p], backend=self.backend)
            ops.sgmv_expand(o2, y, s.B[p], b.seg_starts, b.seg_idx, s.ranks[p], backend=self.backend)
        return out


class MultiLoraModel(nn.Module):
    def __init__(self, base_model: nn.Module, *, target_modules: Sequence[str] = ("q_proj", "v_proj"),
                 capacity: int = 64, max_rank: int = 16, backend: str | None = None):
        """Wrap a frozen base model (e.g. transformers' LlamaForCausalLM). target_modules: names of the
        nn.Linear modules to adapt (last path component, as PEFT's target_modules); capacity: adapters
        held in fast memory at once (>= the distinct adapters of one batch); max_rank: largest rank."""
        super().__init__()
        ops.resolve_backend(backend, next(base_model.parameters()).device)  # fail now on a bad backend
        self.base_model = base_model.requires_grad_(False)
        targets = {n: m for n, m in base_model.named_modules()
                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in set(target_modules)}
        if not targets:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in base_model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(f"no nn.Linear named {list(target_modules)} in the model; its linear modules: {names}")
        w = next(iter(targets.values())).weight
        self.store = AdapterStore({n: (m.in_features, m.out_features) for n, m in targets.items()},
                                  capacity=capacity, max_rank=max_rank, device=w.device, dtype=w.dtype)
        self._batch = _Batch()
        for name, lin in targets.items():
            parent_name, _, child = name.rpartition(".")
            parent = base_model.get_submodule(parent_name) if parent_name else base_model
            setattr(parent, child, MultiLoraLinear(lin, self.store, name, self._batch, backend))

    def load_adapter(self, path: str, name: str | None = None) -> str:
        """Load a lorabench `.safetensors` or PEFT directory adapter into the store; returns its name."""
        return self.store.load(path, name)

    def add_adapter(self, adapter: LoraAdapter) -> str:
        return self.store.add(adapter)

    def set_adapter_indices(self, idx: torch.Tensor | None = None, *, seg_starts: torch.Tensor | None = None,
                            seg_idx: torch.Tensor | None = None) -> None:
        """Low level: per-token store slots (BGMV), or segments (SGMV), for the next forwards; None clears."""
        if idx is not None and seg_idx is not None:
            raise ValueError("give per-token idx or segments (seg_starts, seg_idx), not both")
        if (seg_starts is None) != (seg_idx is None):
            raise ValueError("segments need both seg_starts and seg_idx")
        self._batch.idx, self._batch.seg_starts, self._batch.seg_idx = idx, seg_starts, seg_idx

    @contextmanager
    def adapters(self, names: Sequence[str | None], seq_len: int):
        """Within the block, request b of a (len(names), seq_len) batch uses adapter names[b] (None: base)."""
        slots = self.store.slots(names)  # (B,) loads what is missing into fast memory
        if seq_len == 1:  # decode: one token per request
            self.set_adapter_indices(slots)
        else:  # prefill: request b's tokens are the segment [b * seq_len, (b + 1) * seq_len)
            starts = torch.arange(len(names) + 1, device=slots.device, dtype=torch.int64) * seq_len
            self.set_adapter_indices(seg_starts=starts, seg_idx=slots)
        try:
            yield self
        finally:
            self.set_adapter_indices(None)

    def forward(self, input_ids: torch.Tensor, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """The base model's forward; adapter_names: one adapter name (or None) per request."""
        if adapter_names is None:
            return self.base_model(input_ids, **kwargs)
        if len(adapter_names) != input_ids.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {input_ids.shape[0]}")
        with self.adapters(adapter_names, input_ids.shape[1]):
            return self.base_model(input_ids, **kwargs)
