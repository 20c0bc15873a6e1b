"""Side by side, alternating: one training step (forward + backward) of MiniLM-L6 (batch 16 x 64 tokens) and one
scoring forward of SmolLM2-135M (16 x 96 tokens), fp32 against torch.autocast(bfloat16), one thread."""
import time, torch
from lorabench.assets.models import load_model
torch.set_num_threads(1)
def bench(model, x, train, reps=6):
    out = {}
    for mode in ["fp32", "bf16"] * reps:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            if train:
                model(**x).logits.float().sum().backward()
            else:
                with torch.no_grad():
                    model(**x)
        out.setdefault(mode, []).append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] for k, v in out.items()}
enc = load_model("minilm-l6", "seq-cls", num_labels=2).model.train()
x = {"input_ids": torch.randint(1000, 20000, (16, 64)), "attention_mask": torch.ones(16, 64, dtype=torch.long)}
r = bench(enc, x, True); print(f"minilm train step: fp32 {r['fp32']*1e3:.0f} ms, bf16 {r['bf16']*1e3:.0f} ms, bf16/fp32 {r['bf16']/r['fp32']:.2f}")
dec = load_model("smollm2-135m", "causal-lm").model.eval()
x = {"input_ids": torch.randint(1000, 20000, (16, 96)), "attention_mask": torch.ones(16, 96, dtype=torch.long)}
r = bench(dec, x, False, 4); print(f"smollm2 forward: fp32 {r['fp32']*1e3:.0f} ms, bf16 {r['bf16']*1e3:.0f} ms, bf16/fp32 {r['bf16']/r['fp32']:.2f}")
