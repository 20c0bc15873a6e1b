"""LongLoRA (arXiv 2309.12307): long-context LoRA fine-tuning; SinkLoRA (`sinklora.py`) builds on it.

LongLoRA = LoRA on the attention projections + trainable embedding and normalization layers
("LoRA+", sec. 3.3: without them LoRA does not adapt to long contexts) + shifted sparse attention
(S²-Attn, sec. 3.2) while training, full attention at evaluation, and Position Interpolation
(arXiv 2306.15595) of RoPE to extend the context by `context_factor`.

It records in `method_metrics` (-> the trial record): the model's original context
(`base_context`, its max_position_embeddings), the extension factor and the extended context, the
longest training length and the group size used at it, and the share of full attention's
(query, key) pairs the training-time pattern keeps (`attn_pairs_fraction`, mean over steps) and
its complement `attn_flops_saved` (what a grouped kernel saves on the attention scores).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState, replace_module, resolve_targets
from lorabench.methods.beyond_fine_tuning.attention import (
    ATTENTION, SPEC_ATTR, LongCtxSpec, attention_modules, interpolate_positions, pattern_fraction,
    register_attention)
from lorabench.methods.lora import LoRA, LoraConfig

# LongLoRA adapts the attention projections (W_q, W_k, W_v, W_o; sec. 3.3).
ATTENTION_LINEARS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "bert": ["query", "key", "value", "attention.output.dense"],
}


@dataclass
class LongLoRAConfig(LoraConfig):
    target_modules: list[str] | None = option(
        None, "names (or name suffixes) of the modules to adapt; None = the attention projections "
              "(q/k/v/o_proj on Llama, query/key/value/attention.output.dense on BERT), as LongLoRA")
    group_size_ratio: float = option(
        0.25, "S²-Attn group size as a fraction of the training length (paper: 1/4, e.g. groups of 2048 "
              "tokens when training at 8192); a group >= the sequence length is full attention",
        low=0.0, high=1.0)
    train_length: int | None = option(
        None, "the training length the group size is a fraction of (the paper's target context, e.g. 8192); "
              "None = the padded length of each training batch", low=2)
    context_factor: float = option(
        1.0, "Position Interpolation factor s of RoPE (positions m -> m / s): the context is extended from "
             "max_position_embeddings to s times it; 1.0 = no extension; Llama (RoPE) models only", low=1.0)
    train_embeddings: bool = option(
        True, "train the embedding layers (LongLoRA's 'LoRA+', sec. 3.3; with tied word embeddings also the "
              "LM head)")
    train_norms: bool = option(True, "train the normalization layers (LayerNorm / RMSNorm; LongLoRA sec. 3.3)")

    def __post_init__(self):
        super().__post_init__()
        if not self.group_size_ratio > 0:
            raise ValueError(f"group_size_ratio={self.group_size_ratio} must be in (0, 1]; the paper uses 0.25")


class LongLoRA(LoRA):
    name = "longlora"
    title = "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models"
    paper = "2309.12307"
    # The survey (arXiv 2407.11046) lists LongLoRA and SinkLoRA in sec. 2 "Low-Rank Adaptation",
    # under "Beyond fine-tuning" (long context); that section's key here is "lora".
    family = "beyond-fine-tuning"
    config_cls = LongLoRAConfig
    mechanism_metrics = {
        "attn_flops_saved": "fraction of the dense attention's query-key pairs the sparse pattern skips in training",
        "attn_pairs_fraction": "fraction of them it computes",
        "group_size": "the attention group size at the longest training length",
    }
    # The paper fine-tunes 7B-70B models at 2e-5 for 1000 steps; lorabench's short fixed budget uses
    # LoRA's default (5e-4) so the comparison with LoRA is at equal learning rate.
    default_lr = 5e-4
    mergeable = True   # the LoRA updates merge; embeddings and norms are trained in place

    wrap = True        # S²-Attn: the shifted groups wrap around (Algorithm 1's roll)

    def n_sink(self) -> int:
        return 0

    def spec(self) -> LongCtxSpec:
        c = self.config
        return LongCtxSpec(c.group_size_ratio, c.train_length, self.n_sink(), self.wrap)

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        c = self.config
        if ctx.architecture not in ATTENTION_LINEARS:
            raise ValueError(f"{self.name} supports {', '.join(ATTENTION_LINEARS)} models, not {ctx.architecture!r}")
        attn = attention_modules(model)
        self.freeze_all_but_head(model, ctx)
        targets = c.target_modules if c.target_modules is not None else ATTENTION_LINEARS[ctx.architecture]
        for name in resolve_targets(model, targets, ctx):
            layer = self.make_layer(model.get_submodule(name))
            self.freeze_adapter(layer)
            replace_module(model, name, layer)
        for m in model.modules():   # sec. 3.3: trainable embedding and normalization layers
            if (c.train_embeddings and isinstance(m, nn.Embedding)) or (c.train_norms and is_norm(m)):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)
        base_context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        if c.context_factor != 1.0:
            if interpolate_positions(model, c.context_factor) == 0:
                raise ValueError(f"context_factor={c.context_factor}: this {ctx.architecture} model has no RoPE "
                                 f"to interpolate (learned absolute positions); use context_factor=1.0")
            model.config.max_position_embeddings = int(base_context * c.context_factor)
        register_attention()
        model.set_attn_implementation(ATTENTION)
        spec = self.spec()
        for m in attn:
            setattr(m, SPEC_ATTR, spec)
        self._spec = spec
        self._heads = int(model.config.num_attention_heads)
        self._causal = ctx.architecture == "llama"
        self._static = {"base_context": base_context, "context_factor": c.context_factor,
                        "extended_context": int(base_context * c.context_factor),
                        "group_size_ratio": c.group_size_ratio, "n_sink": spec.n_sink}
        return model

    # -- training-time measurements --------------------------------------------------------------
    def on_train_begin(self, state: TrainState) -> None:
        self._fractions: list[float] = []
        self._longest = 0
        state.metrics.update(self._static)

    def on_step_begin(self, state: TrainState) -> None:
        batch = state.batch or {}
        ids = batch.get("input_ids")
        if ids is None:
            return
        T = ids.shape[1]
        pattern = self._spec.pattern(T, self._heads)
        self._fractions.append(pattern_fraction(pattern, batch.get("attention_mask"), self._causal, T))
        if T >= self._longest:
            self._longest = T
            state.metrics["train_length_max"] = T
            state.metrics["group_size"] = min(self._spec.group_size(T), T)
        frac = sum(self._fractions) / len(self._fractions)
        state.metrics["attn_pairs_fraction"] = round(frac, 6)
        state.metrics["attn_flops_saved"] = round(1.0 - frac, 6)


def is_norm(m: nn.Module) -> bool:
    """LayerNorm, and the RMSNorm classes of transformers models (LlamaRMSNorm, ...)."""
    return isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or type(m).__name__.endswith("RMSNorm")


__all__ = ["LongLoRA", "LongLoRAConfig", "ATTENTION_LINEARS"]
