"""Multiple choice scored by log-likelihood (as lm-evaluation-harness's `multiple_choice` tasks).

Each option is scored by the sum of the log-probabilities of its tokens after the prompt; `acc`
takes the argmax, `acc_norm` the argmax of the score divided by the option's length in bytes
(lm-eval's definitions). Training maximises the likelihood of the correct option.
"""
from __future__ import annotations

import contextlib
import time
import warnings

import torch

from lorabench.tasks.base import EvalResult, Metric, Outcomes, Split, Task, seeded_group_split, seeded_split
from lorabench.tasks.causal import continuation_logprobs, encode_pair, pad_pairs

ACC = Metric("accuracy", True, "fraction of questions whose highest-log-likelihood option is correct")


class MultipleChoiceTask(Task):
    kind = "multiple-choice"
    head = "causal-lm"
    default_model = "smollm2-135m"
    metric = ACC
    eval_size: int

    @staticmethod
    def prompt(example: dict) -> str:
        return f"Question: {example['question']}\nAnswer:"

    @staticmethod
    def option_text(choice: str) -> str:
        return " " + choice

    def build_split(self) -> Split:
        from lorabench import assets
        items = [{"question": r["question"], "choices": list(r["choices"]), "label": int(r["label"])}
                 for r in assets.load_dataset(self.dataset)]
        return seeded_split(items, self.eval_size, self.val_size)

    def collate(self, examples, tokenizer):
        pairs = [encode_pair(tokenizer, self.prompt(e), self.option_text(e["choices"][e["label"]]), self.max_length)
                 for e in examples]
        return pad_pairs(pairs, tokenizer.pad_token_id, train=True)

    @torch.no_grad()
    def evaluate(self, model, tokenizer, batch_size: int, part: str = "eval") -> EvalResult:
        examples = self.examples(part)
        t0 = time.perf_counter()
        pairs = [[encode_pair(tokenizer, self.prompt(e), self.option_text(c), self.max_length) for c in e["choices"]]
                 for e in examples]
        scores: list[torch.Tensor | None] = [None] * len(examples)
        # Questions whose options all keep the same (untruncated) prompt are scored with the prompt run once
        # (shared_prompt_logprobs); the others, and every question if the shared path disagrees with the full
        # one on the first chunk, one full sequence per option.
        shared = [i for i, ps in enumerate(pairs) if all(c == ps[0][0] for c, _ in ps)]
        full = sorted(set(range(len(examples))) - set(shared))
        if shared:
            shared.sort(key=lambda i: len(pairs[i][0][0]))   # chunks of similar prompt lengths: little padding
            chunks = option_chunks(shared, [len(pairs[i]) for i in shared], batch_size)

            def cached(chunk: list[int]) -> list[torch.Tensor]:
                return shared_prompt_logprobs(model, [pairs[i][0][0] for i in chunk],
                                              [[t for _, t in pairs[i]] for i in chunk], tokenizer.pad_token_id)

            first = chunks[0]

            def full_first() -> torch.Tensor:
                return full_sequence_logprobs(model, [p for i in first for p in pairs[i]], tokenizer.pad_token_id,
                                              batch_size)

            # The check runs in fp32. Under bf16 autocast (train.autocast: bf16) every logit carries bf16's rounding
            # (2^-8 relative): the two paths' sums were 0.129 nats apart on QuaRTz's first chunk (SmolLM2-135M), more
            # than a tiny model's rewritten inputs move them (0.3), so no tolerance could tell the two apart there.
            low_precision = torch.is_autocast_enabled("cpu")
            with torch.autocast("cpu", enabled=False) if low_precision else contextlib.nullcontext():
                want = full_first()
                try:
                    got = torch.cat(cached(first))
                    differs = None if torch.allclose(got, want, rtol=1e-4, atol=2e-3) else \
                        f"max |diff| {float((got - want).abs().max()):.3g}"
                except (ValueError, TypeError, RuntimeError) as err:   # e.g. a method that refuses a cache (Pillow)
                    differs = f"{type(err).__name__}: {err}"
            if low_precision:   # checked; the first chunk is scored at the trial's precision, as the others
                if differs is None:
                    got = torch.cat(cached(first))
                else:
                    want = full_first()
            # the first chunk is scored either way: the cached scores when they agree, else the full ones
            for i, sc in zip(first, torch.split(want if differs else got, [len(pairs[i]) for i in first])):
                scores[i] = sc
            if differs is None:
                for chunk in chunks[1:]:
                    for i, sc in zip(chunk, cached(chunk)):
                        scores[i] = sc
            else:   # the model does not score a cached prompt as it scores the whole sequence (e.g. it rewrites
                    # its inputs, as Pillow's prompt prepending does): every other question takes the full path
                warnings.warn(f"{self.name}: scoring with a shared prompt cache differs from full sequences on this "
                              f"model ({differs}); scoring full sequences", RuntimeWarning)
                full = sorted(set(full) | {i for chunk in chunks[1:] for i in chunk})
        if full:
            flat = full_sequence_logprobs(model, [p for i in full for p in pairs[i]], tokenizer.pad_token_id, batch_size)
            k = 0
            for i in full:
                scores[i] = flat[k:k + len(pairs[i])]
                k += len(pairs[i])
        n_tokens = sum(len(c) + len(t) for ps in pairs for c, t in ps)   # the option sequences scored (as lm-eval)
        pred, acc_norm = [], 0
        for e, sc in zip(examples, scores):
            lens = torch.tensor([len(self.option_text(c).encode()) for c in e["choices"]], dtype=torch.float)
            pred.append(int(sc.argmax().item()))
            acc_norm += int((sc / lens).argmax().item() == e["label"])
        labels = [int(e["label"]) for e in examples]
        correct = [int(p == y) for p, y in zip(pred, labels)]
        return EvalResult({"accuracy": sum(correct) / len(examples), "accuracy_norm": acc_norm / len(examples)},
                          n_tokens, time.perf_counter() - t0, Outcomes(correct, pred, labels),
                          [[float(x) for x in sc] for sc in scores])


def option_chunks(order: list[int], n_options: list[int], batch_size: int) -> list[list[int]]:
    """`order` cut into consecutive chunks of at most `batch_size` option sequences (at least one question each)."""
    chunks, cur, width = [], [], 0
    for i, n in zip(order, n_options):
        if cur and width + n > batch_size:
            chunks.append(cur)
            cur, width = [], 0
        cur.append(i)
        width += n
    if cur:
        chunks.append(cur)
    return chunks


@torch.no_grad()
def full_sequence_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int,
                           batch_size: int) -> torch.Tensor:
    """log p(continuation | context) of each (context, continuation) pair, one padded sequence per pair."""
    out = torch.empty(len(pairs))
    for s in range(0, len(pairs), batch_size):
        out[s:s + batch_size] = continuation_logprobs(model, pad_pairs(pairs[s:s + batch_size], pad_id, train=False))
    return out


@torch.no_grad()
def shared_prompt_logprobs(model, prompts: list[list[int]], options: list[list[list[int]]],
                           pad_id: int) -> list[torch.Tensor]:
    """log p(option | prompt) for every option of every question, each prompt run once.

    The prompts (right-padded) go through the model once with its key-value cache; the cache rows are
    repeated for each question's options, which then run as a second, short batch after the padded
    prompts (masked out, positions continuing from each prompt's own length). An option's first token
    is scored from the prompt's last position, its k-th token from the option's (k-1)-th. The same sums
    as `continuation_logprobs` over the full sequences, with the prompt computed once instead of once
    per option (QuaRTz: 2 options, prompts ~10x longer than the options).
    """
    lens = torch.tensor([len(p) for p in prompts])
    width = int(lens.max())
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = torch.tensor(p)
        mask[r, :len(p)] = 1
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    last = torch.log_softmax(out.logits[torch.arange(len(prompts)), lens - 1].float(), dim=-1)   # (Q, V)
    rows = [(q, o) for q, opts in enumerate(options) for o in opts]
    first = torch.tensor([float(last[q, o[0]]) for q, o in rows])
    rest = torch.zeros(len(rows))
    tail = max(len(o) for _, o in rows) - 1
    if tail > 0:   # options of more than one token: their other tokens after the cached prompt
        index = torch.tensor([q for q, _ in rows])
        cache = out.cache   # transformers 5: `cache` (formerly past_key_values)
        cache.reorder_cache(index)
        oids = torch.full((len(rows), tail), pad_id, dtype=torch.long)
        omask = torch.zeros_like(oids)
        for r, (_, o) in enumerate(rows):
            oids[r, :len(o) - 1] = torch.tensor(o[:-1])
            omask[r, :len(o) - 1] = 1
        pos = lens[index].unsqueeze(1) + torch.arange(tail)
        logits = model(input_ids=oids, attention_mask=torch.cat([mask[index], omask], 1), position_ids=pos,
                       cache=cache, use_cache=True).logits.float()
        logp = torch.log_softmax(logits, dim=-1)                      # position k predicts option token k + 1
        for r, (_, o) in enumerate(rows):
            if len(o) > 1:
                tgt = torch.tensor(o[1:])
                rest[r] = logp[r, torch.arange(len(o) - 1), tgt].sum()
    scores = first + rest
    sizes = [len(opts) for opts in options]
    return list(torch.split(scores, sizes))


class QuaRTz(MultipleChoiceTask):
    name = "quartz"
    dataset = "quartz"
    description = "QuaRTz qualitative relationship questions, 2 options (Tafjord et al. 2019, via OpenAI evals)"
    eval_size = 1500
    val_size = 300
    sizes = "train 2,060 / validation 300 / eval 1,500 (of 3,860)"
    default_max_length = 128


class SocialIQA(MultipleChoiceTask):
    name = "socialiqa"
    dataset = "socialiqa"
    description = "Social IQa commonsense questions about people, 3 options (Sap et al. 2019, via OpenAI evals)"
    eval_size = 1000
    val_size = 300
    sizes = "train 903 / validation 300 / eval 1,000 (of 2,224; 21 exact duplicates dropped)"
    default_max_length = 128


# --- the cross-task pool (docs/tasks.md, "The cross-task pool"): more tasks scored exactly like the two
# above, the likelihood of each option after "Question: {question}\nAnswer:", so that adapters trained on
# them share one output space and can be composed.

class VerbalizedChoice(MultipleChoiceTask):
    """A labelled-text dataset ({"text", "label"}) asked as a question whose options are the label
    words: `choices[label]` is the correct option of every example."""
    template: str        # the question, with {text}
    choices: list[str]   # the option of label 0, 1, ...

    def build_split(self) -> Split:
        from lorabench import assets
        items = [{"question": self.template.format(text=r["text"]), "choices": list(self.choices),
                  "label": int(r["label"])} for r in assets.load_dataset(self.dataset)]
        return seeded_split(items, self.eval_size, self.val_size)


class RTChoice(VerbalizedChoice):
    name = "rt-mc"
    dataset = "rotten-tomatoes"
    description = "Rotten Tomatoes sentence polarity asked as a question, options negative/positive (Pang & Lee 2005)"
    template = "Movie review: {text}\nIs this review positive or negative?"
    choices = ["negative", "positive"]
    eval_size = 500
    val_size = 300
    sizes = "train 7,730 / validation 300 / eval 500 (of 8,530)"
    default_max_length = 96


class IMDBChoice(VerbalizedChoice):
    name = "imdb-mc"
    dataset = "imdb"
    description = "IMDB review polarity asked as a question, options negative/positive (Maas et al. 2011)"
    template = RTChoice.template
    choices = RTChoice.choices
    eval_size = 500
    val_size = 300
    sizes = "train 24,104 / validation 300 / eval 500 (of 24,904 distinct reviews)"
    default_max_length = 256   # median review + question 241 tokens; longer reviews lose their beginning


class SarcasmChoice(VerbalizedChoice):
    name = "sarcasm-mc"
    dataset = "sarcasm"
    description = "news headlines, sarcastic or not, asked as a question, options no/yes (Misra & Arora, via OpenAI evals)"
    template = "Headline: {text}\nIs this headline sarcastic?"
    choices = ["no", "yes"]
    eval_size = 500
    val_size = 300
    sizes = "train 27,698 / validation 300 / eval 500 (of 28,614; 116 exact duplicates dropped)"
    default_max_length = 64


class Corr2Cause(MultipleChoiceTask):
    name = "corr2cause"
    dataset = "corr2cause"
    description = ("Corr2Cause: does a causal hypothesis follow from stated correlations? options entailment/"
                   "contradiction/neutral (Jin et al. 2023, via OpenAI evals)")
    eval_size = 500
    val_size = 300
    sizes = "train 722 / validation 300 / eval 500 (of 2,246; 724 exact duplicates dropped)"
    default_max_length = 448   # the longest premise + hypothesis: 429 tokens


class PararulePlus(MultipleChoiceTask):
    name = "pararule-plus"
    dataset = "pararule-plus"
    description = "PARARULE-Plus multi-step deductive reasoning over stated rules, options true/false (via OpenAI evals)"
    eval_size = 500
    val_size = 300
    sizes = "train 1,200 / validation 300 / eval 500 (of 2,000)"
    default_max_length = 320   # the longest: 309 tokens


class Crepe(MultipleChoiceTask):
    name = "crepe"
    dataset = "crepe"
    description = ("CREPE: does an event make another more, less or equally likely? 3 options (Zhang et al. 2023, "
                   "via OpenAI evals)")
    eval_size = 500
    val_size = 300
    sizes = "train 720 / validation 300 / eval 500 (of 1,520)"
    default_max_length = 224   # the longest: 211 tokens


class AbstractCausal(MultipleChoiceTask):
    name = "abstract-causal"
    dataset = "abstract-causal"
    description = ("abstract causal reasoning: from observed objects and a light, is the light on, off or "
                   "undetermined for a new scene? (via OpenAI evals)")
    eval_size = 500
    val_size = 300
    sizes = "train 1,181 / validation 300 / eval 500 (of 2,000; 19 exact duplicates dropped)"
    default_max_length = 224   # the longest: 211 tokens


class LogiQA(MultipleChoiceTask):
    name = "logiqa"
    dataset = "logiqa"
    description = "LogiQA logical reading comprehension, 4 options (Liu et al. 2020, via OpenAI evals)"
    eval_size = 200
    val_size = 100
    sizes = "train 377 / validation 100 / eval 200 (of 1,354; every question is in the file twice: 677 dropped)"
    default_max_length = 256   # 99% fit; longer passages lose their beginning


class ReClor(MultipleChoiceTask):
    name = "reclor"
    dataset = "reclor"
    description = "ReClor logical reasoning questions, 4 options (Yu et al. 2020, via OpenAI evals)"
    eval_size = 150
    val_size = 50
    sizes = "train 300 / validation 50 / eval 150 (of 500)"
    default_max_length = 256   # the longest: 253 tokens


class ParableMoral(MultipleChoiceTask):
    name = "parable-moral"
    dataset = "parable-moral"
    description = "which of 5 morals a parable conveys (OpenAI evals' parable-to-moral-match, English)"
    eval_size = 500
    val_size = 300
    sizes = "train 832 / validation 300 / eval 500 (of 1,632)"
    default_max_length = 512   # 90% fit; longer stories lose their beginning


class ToMi(MultipleChoiceTask):
    """ToMi: where an object is, was, or where someone will look for it (the false-belief questions); the
    options are the containers the story names. About 6 questions share each story, so the split is by
    story (`seeded_group_split`): no story is both trained on and evaluated."""
    name = "tomi"
    dataset = "tomi"
    description = ("ToMi theory-of-mind stories: where is an object, or where will someone look for it? options: "
                   "the containers the story names (Le et al. 2019, via OpenAI evals)")
    eval_stories = 85
    val_stories = 50
    eval_size = 510   # the questions of those stories
    val_size = 300
    sizes = "train 5,183 / validation 300 (50 stories) / eval 510 (85 stories) (of 5,993 questions about 999 stories)"
    default_max_length = 128   # the longest: 112 tokens

    @staticmethod
    def story(example: dict) -> str:
        q = example["question"]
        return q[:q.rindex(". ") + 1]  # everything before the question sentence

    def build_split(self) -> Split:
        from lorabench import assets
        return seeded_group_split(assets.load_dataset(self.dataset), self.story, self.eval_stories, self.val_stories)
