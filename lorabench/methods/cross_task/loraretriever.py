"""LoraRetriever (Zhao et al., "LoraRetriever: Input-Aware LoRA Retrieval and Composition for Mixed Tasks in the
Wild", arXiv 2402.09997): each input retrieves the library adapters whose tasks resemble it, and only those are
composed for it.

Retrieval (sec. 4.1): a sentence embedding E maps an input x and each adapter φ_i into one space; the adapter is
represented by the mean embedding of a few examples x_ij of the task it was trained on,

    E(φ_i) = (1/n) Σ_j E(x_ij)                                          (the LoRA's embedding, sec. 4.1)
    s(x, φ_i) = cos(E(x), E(φ_i))                                       (input-adapter similarity, sec. 4.1)

and x retrieves the k adapters of highest similarity. The paper trains its retriever (Instructor-xl, instruction
fine-tuned on a share of its tasks, with an instruction I prepended: E(I ⊕ x)); here E is a pretrained sentence
encoder used as it is, all-MiniLM-L6-v2 (the `minilm-l6` asset: the mean of its last hidden states over the real
tokens, L2-normalised, as sentence-transformers pools it), with no instruction and no retriever training, and each
adapter is embedded from `adapter_examples` prompts drawn from its task's training split.

Composition (sec. 4.2) of the k retrieved adapters (A_i, B_i) at scale s, with uniform weights:

    mixture:  h = W0 x + (1/k) Σ_i s B_i A_i x       (the mean of the retrieved adapters' outputs; held exactly as
                                                       one rank-k·r adapter by concatenating their factors)
    fusion:   h = W0 x + s B̄ Ā x,  Ā = (1/k) Σ_i A_i,  B̄ = (1/k) Σ_i B_i   (the mean of their parameters)

The cross-task scenario's leave-one-task-out protocol (lorabench/harness/cross_task.py) is the paper's
out-of-domain setting (the held-out task's own adapter is not in the pool): every eval example of the held-out task
retrieves its own k candidates; examples that retrieve the same set are scored together with that set's composition
(the paper's batched inference serves a different composition per request). No k-shot example is read. The record
keeps which adapters each held-out task retrieved, and how often.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from lorabench.config import option
from lorabench.methods.cross_task.base import Composition, CompositionMethod, LossFn, State, factorwise
from lorabench.methods.cross_task.uniform_average import concatenated
from lorabench.methods.lora.config import LoraConfig

COMPOSITIONS = ("mixture", "fusion")


@dataclass
class LoraRetrieverConfig(LoraConfig):
    top_k: int = option(3, "adapters each input retrieves (LoraRetriever: 3)", low=1, high=1000)
    composition: str = option("mixture", "how the retrieved adapters are composed: mixture (the mean of their "
                                         "outputs) or fusion (the mean of their parameters)")
    adapter_examples: int = option(10, "training examples of each adapter's task whose mean embedding represents "
                                       "the adapter", low=1, high=10000)
    embedder: str = option("minilm-l6", "sentence encoder of inputs and adapters (a model asset, a local directory "
                                        "or a Hugging Face id; mean-pooled last hidden states, L2-normalised)")

    def __post_init__(self):
        super().__post_init__()
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"composition {self.composition!r} is not one of LoraRetriever's: "
                             f"{', '.join(COMPOSITIONS)}")


@torch.no_grad()
def sentence_embeddings(model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """(len(texts), hidden) L2-normalised mean-pooled last hidden states of the encoder (sentence-transformers'
    pooling of all-MiniLM-L6-v2)."""
    encoder = getattr(model, "base_model", model)
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s:s + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        h = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state   # (b, T, d)
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 0)


def adapter_embeddings(example_embeddings: list[torch.Tensor]) -> torch.Tensor:
    """E(φ_i) = (1/n) Σ_j E(x_ij) for each adapter (rows), L2-normalised so that a dot product is the cosine."""
    return torch.nn.functional.normalize(torch.stack([e.mean(0) for e in example_embeddings]), dim=-1)


def retrieve(queries: torch.Tensor, adapters: torch.Tensor, k: int) -> list[tuple[int, ...]]:
    """The k adapters of highest cosine similarity s(x, φ_i) for each query row, as sorted index tuples."""
    if k > adapters.shape[0]:
        raise ValueError(f"top_k={k} is more than the {adapters.shape[0]} candidate adapters")
    sim = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(adapters, dim=-1).T   # (Q, N)
    return [tuple(sorted(row.tolist())) for row in sim.topk(k, dim=-1).indices]


class LoraRetriever(CompositionMethod):
    __doc__ = __doc__
    name = "loraretriever"
    title = "LoraRetriever: Input-Aware LoRA Retrieval and Composition for Mixed Tasks in the Wild"
    paper = "2402.09997"
    config_cls = LoraRetrieverConfig
    input_aware = True   # the harness retrieves per eval input and calls compose_retrieved per retrieved set

    def compose_retrieved(self, states: list[State], chosen: tuple[int, ...], scale: float) -> State:
        """sec. 4.2: the uniform mixture (exact mean of outputs) or fusion (mean of parameters) of the chosen."""
        picked = [states[i] for i in chosen]
        w = [1.0 / len(picked)] * len(picked)
        if self.config.composition == "mixture":
            return concatenated(picked, w, scale)    # Σ_i (1/k) s B_i A_i x, exactly
        return factorwise(picked, w, scale)          # s ((1/k) Σ B_i) ((1/k) Σ A_i) x

    def compose(self, states: list[State], scale: float, loss_fn: LossFn, seed: int) -> Composition:
        raise ValueError("loraretriever composes per input: the cross-task protocol retrieves adapters for each "
                         "eval example (lorabench/harness/cross_task.py) and calls compose_retrieved")

    @staticmethod
    def retrieval_summary(candidates: list[str], chosen: list[tuple[int, ...]]) -> dict:
        """How often each candidate was retrieved (fraction of inputs), the retrieved sets (most frequent first) and
        each input's set (candidate indices, in the eval part's order)."""
        n = len(chosen)
        per_adapter = Counter(i for c in chosen for i in c)
        sets = Counter(chosen)
        return {"retrieved_fraction": {candidates[i]: round(per_adapter[i] / n, 6) for i in sorted(per_adapter)},
                "sets": [{"adapters": [candidates[i] for i in s], "inputs": c} for s, c in sets.most_common()],
                "per_input": [list(s) for s in chosen]}
