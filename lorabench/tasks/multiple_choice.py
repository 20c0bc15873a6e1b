"""Multiple choice scored by log-likelihood (as lm-evaluation-harness's `multiple_choice` tasks).

Each option is scored by the sum of the log-probabilities of its tokens after the prompt; `acc`
takes the argmax, `acc_norm` the argmax of the score divided by the option's length in bytes
(lm-eval's definitions). Training maximises the likelihood of the correct option.
"""
from __future__ import annotations

import time

import torch

from lorabench.tasks.base import EvalResult, Metric, Outcomes, Split, Task, seeded_split
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
        flat = [(i, j) for i, e in enumerate(examples) for j in range(len(e["choices"]))]
        scores = torch.empty(len(flat))
        n_tokens, t0 = 0, time.perf_counter()
        for s in range(0, len(flat), batch_size):
            chunk = flat[s:s + batch_size]
            pairs = [encode_pair(tokenizer, self.prompt(examples[i]), self.option_text(examples[i]["choices"][j]),
                                 self.max_length) for i, j in chunk]
            batch = pad_pairs(pairs, tokenizer.pad_token_id, train=False)
            scores[s:s + len(chunk)] = continuation_logprobs(model, batch)
            n_tokens += int(batch["attention_mask"].sum())
        pred, acc_norm, k = [], 0, 0
        for e in examples:
            n = len(e["choices"])
            sc = scores[k:k + n]
            lens = torch.tensor([len(self.option_text(c).encode()) for c in e["choices"]], dtype=torch.float)
            pred.append(int(sc.argmax().item()))
            acc_norm += int((sc / lens).argmax().item() == e["label"])
            k += n
        labels = [int(e["label"]) for e in examples]
        correct = [int(p == y) for p, y in zip(pred, labels)]
        return EvalResult({"accuracy": sum(correct) / len(examples), "accuracy_norm": acc_norm / len(examples)},
                          n_tokens, time.perf_counter() - t0, Outcomes(correct, pred, labels))


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
