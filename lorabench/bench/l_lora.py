"""The cost of L-LoRA's linearised training step against a plain LoRA step (lorabench/methods/cross_task/l_lora.py).

One training step (forward, backward, AdamW) of the same model with plain LoRA and with L-LoRA's linearised modules
(each LoRA module's output by `torch.func.jvp` around its initial factors), on the same batches, rounds interleaved
with the order alternating, median step time of each after a warm-up round (docs/architecture.md, "Measurement
protocol": a ratio of two implementations measured in one run on one machine).

    python -c "import json, torch; torch.set_num_threads(1); from lorabench.bench.l_lora import main; \
print(json.dumps(main('smollm2-135m', 'quartz', rounds=5)))"
"""
from __future__ import annotations

import copy
import statistics
import time

import torch


def main(model_name: str = "tiny-llama", task: str = "quartz", rank: int = 8, batch_size: int = 4, rounds: int = 5,
         seed: int = 0) -> dict:
    from lorabench import assets
    from lorabench.harness.trial import seed_everything
    from lorabench.methods import get_method
    from lorabench.methods.base import ApplyContext
    from lorabench.tasks import get_task
    seed_everything(seed)
    loaded = assets.load_model(model_name, head="causal-lm", seed=seed)
    tok, t = loaded.tokenizer, get_task(task).from_options({}, where=f"task {task}")
    sides = {}
    for name in ("lora", "l-lora"):
        method = get_method(name).from_options({"rank": rank, "alpha": 2.0 * rank})
        torch.manual_seed(seed)   # the same initial factors on both sides
        model = method.apply(copy.deepcopy(loaded.model), ApplyContext(loaded.model.config.model_type, [], seed))
        model.train()
        opt = torch.optim.AdamW([p for _, p in method.trainable_parameters(model)], lr=1e-4)
        sides[name] = (model, opt)

    def step(name, batch):
        model, opt = sides[name]
        t0 = time.perf_counter()
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    stream = t.train_batches(tok, batch_size, seed)
    times: dict[str, list[float]] = {"lora": [], "l-lora": []}
    tokens = []
    for r in range(rounds + 1):   # round 0 warms both up
        batch = next(stream)
        order = ("lora", "l-lora") if r % 2 == 0 else ("l-lora", "lora")
        got = {name: step(name, batch) for name in order}
        if r > 0:
            for name in got:
                times[name].append(got[name])
            tokens.append(int(batch["attention_mask"].sum()))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model_name, "task": task, "rank": rank, "batch_size": batch_size, "rounds": rounds,
            "threads": torch.get_num_threads(), "tokens_per_step_median": statistics.median(tokens),
            "lora_step_s": round(med["lora"], 4), "l_lora_step_s": round(med["l-lora"], 4),
            "ratio_l_lora_over_lora": round(med["l-lora"] / med["lora"], 3)}
