"""`LorabenchLM`: a base model plus a lorabench adapter as an lm-evaluation-harness `LM`.

Registered in lm-eval's model registry as `lorabench` when this module is imported, so both
`lm_eval.simple_evaluate(model=LorabenchLM(model, tokenizer), ...)` (an object, fully offline)
and `simple_evaluate(model="lorabench", model_args="pretrained=smollm2-135m,adapter=a.safetensors")`
work.

Scoring follows lorabench's own evaluator, not lm-eval's HFLM, so the two agree by construction:
- `loglikelihood`: context and continuation are tokenised separately and concatenated
  (`lorabench.tasks.causal.encode_pair`), the sum of the continuation tokens' log-probabilities
  is `continuation_logprobs`, the same function `MultipleChoiceTask.evaluate` calls. HFLM instead
  tokenises context+continuation as one string and splits it; for a continuation that starts
  with a space the two agree for SmolLM2's byte-level BPE, and lm-eval allows either.
- `loglikelihood_rolling`: lm-eval's contract (every token predicted exactly once, the first one
  from `prefix_token_id`, windows of `max_length` from `lm_eval.utils.get_rolling_token_windows`).
- `generate_until`: greedy `model.generate` on left-padded prompts, stopped at `until` (and EOS),
  as `Arith.evaluate` decodes.

Requests are scored in batches of `batch_size`, longest first (less padding; an out-of-memory
shows on the first batch), and returned in request order.
"""
from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lorabench.tasks.causal import continuation_logprobs, encode_pair, pad_pairs

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task sets no max_gen_toks


@register_model("lorabench")
class LorabenchLM(LM):
    """A causal LM (optionally with a lorabench method applied) scored the lorabench way.

    Either pass `model` and `tokenizer` objects (a model with a method already applied, e.g.
    right after training), or `pretrained` (a model asset, local directory or hub id) and
    optionally `adapter` (a safetensors file written by `Method.save_adapter`), `dtype` and
    `device` (lm-eval's `max_batch_size` is accepted and unused: batches have a fixed size).
    max_length: the longest sequence fed to the model (context truncated from the left, as
    lorabench's tasks do); default the model's `max_position_embeddings`.
    """

    def __init__(self, model=None, tokenizer=None, pretrained: str | None = None, adapter: str | None = None,
                 batch_size: int | str = 16, max_length: int | None = None, dtype: str | None = None,
                 name: str | None = None, device: str | None = None, max_batch_size: int | None = None):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("LorabenchLM needs a model: pass model= and tokenizer= objects, or "
                                 "pretrained=<asset name, local directory or hub id> [adapter=<file>]")
            model, tokenizer = load_for_eval(pretrained, adapter, dtype)
            if device is not None:  # lm-eval passes its --device here
                model = model.to(device)
            name = name or pretrained + (f"+{adapter}" if adapter else "")
        elif adapter is not None:
            raise ValueError("adapter= only goes with pretrained=; with a model object, apply or load the "
                             "adapter first (lorabench.methods.base.load_adapter)")
        if tokenizer is None:
            raise ValueError("LorabenchLM(model=...) also needs the model's tokenizer=")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "name_or_path", None) or type(model).__name__
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 16  # no auto-search on CPU
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_length = int(max_length or getattr(model.config, "max_position_embeddings", 2048))
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self._device = next(model.parameters()).device

    # -- tokens -----------------------------------------------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on (lm-eval: BOS, else EOS)."""
        tok = self.tokenizer
        if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None:
            return tok.bos_token_id
        return tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix_token_id

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- scoring ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]], desc: str,
                     disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax)."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for s in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=disable_tqdm or len(order) == 0):
            idx = order[s:s + self.batch_size]
            batch = {k: v.to(self._device) for k, v in pad_pairs([pairs[i] for i in idx], self.pad_token_id,
                                                                  train=False).items()}
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ll = continuation_logprobs(lambda **_: _Logits(logits), batch)  # the evaluator's own sum
            greedy_ok = (logits[:, :-1].argmax(-1) == batch["input_ids"][:, 1:]) | ~batch["target_mask"][:, 1:]
            for row, i in enumerate(idx):
                out[i] = (float(ll[row]), bool(greedy_ok[row].all()))
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (r.args for r in requests):
            ctx, cont = encode_pair(self.tokenizer, context, continuation, self.max_length)
            if not cont:
                raise ValueError(f"empty continuation after tokenisation for context {context[-60:]!r}")
            pairs.append((ctx or [self.prefix_token_id], cont))
        return self._log(requests, self._score_pairs(pairs, "lorabench loglikelihood", disable_tqdm),
                         "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # lm-eval's windows: each token scored once; context_len=1 gives disjoint windows of max_length.
        pairs, owner = [], []
        for k, (text,) in enumerate(r.args for r in requests):
            for w in get_rolling_token_windows(self._encode(text), self.prefix_token_id, self.max_length, 1):
                pairs.append(make_disjoint_window(w))
                owner.append(k)
        scores = self._score_pairs(pairs, "lorabench loglikelihood_rolling", disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, scores):
            totals[k] += ll
        return self._log(requests, totals, "loglikelihood_rolling")

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.eos_token
        out: list[str | None] = [None] * len(requests)
        # Requests with the same generation settings are batched together, longest prompt first.
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), desc="lorabench generate_until", disable=disable_tqdm or not requests)
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen} must be below the model's max_length={self.max_length}")
            if not kwargs.pop("do_sample", False):
                kwargs.pop("temperature", None)  # greedy: a temperature would only draw a warning
                kwargs["do_sample"] = False
            prompts = {i: encode_pair(self.tokenizer, requests[i].args[0], "", self.max_length - max_gen)[0]
                       or [self.prefix_token_id] for i in idx}
            idx = sorted(idx, key=lambda i: -len(prompts[i]))
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                width = max(len(prompts[i]) for i in chunk)
                # Left padding: every row's next token is generated at the same position (as Arith.evaluate).
                ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(chunk):
                    ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                    mask[row, width - len(prompts[i]):] = 1
                gen = self.model.generate(input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                                          max_new_tokens=max_gen, pad_token_id=self.pad_token_id,
                                          stop_strings=until, tokenizer=self.tokenizer, **kwargs)
                for row, i in enumerate(chunk):
                    text = self.tokenizer.decode(gen[row, width:], skip_special_tokens=True)
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return self._log(requests, out, "generate_until")

    def _log(self, requests, results: list, attr: str) -> list:
        for r, res in zip(requests, results):
            self.cache_hook.add_partial(attr, r.args, res)
        return results

    # -- chat template ----------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or self.name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get(chat_template if isinstance(chat_template, str) else "default")
        if not template:
            raise ValueError(f"the tokenizer of {self.name} has no chat template; run without apply_chat_template")
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self.chat_template(True)  # a clear error when there is none
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)


class _Logits:
    """Lets `continuation_logprobs` (which calls a model) score logits already computed."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits


def load_for_eval(pretrained: str, adapter: str | None, dtype: str | None = None) -> tuple[Any, Any]:
    """A causal-LM asset (or directory / hub id) with a saved lorabench adapter applied, in eval mode."""
    from lorabench import assets
    from lorabench.methods.base import ApplyContext, load_adapter

    loaded = assets.load_model(pretrained, head="causal-lm", dtype=dtype)
    model = loaded.model
    if adapter is not None:
        import os
        if not os.path.isfile(adapter):
            raise ValueError(f"adapter file {adapter} does not exist (write one with Method.save_adapter "
                             f"or a suite run's saved adapter)")
        model, _ = load_adapter(model, adapter, ApplyContext(architecture=model.config.model_type,
                                                             head_modules=[]))
    return model.eval(), loaded.tokenizer
