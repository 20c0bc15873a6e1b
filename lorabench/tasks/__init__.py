"""The task registry (docs/architecture.md, "Where things live"); sizes of every split are in docs/tasks.md."""
from lorabench.registry import Registry

# kind, metric (its name), higher_is_better, default_model and sizes: what `list tasks` shows without
# importing the task (lorabench/registry.py); tests check them against the class's attributes.
TASKS: Registry = Registry("task", meta_keys=("kind", "metric", "higher_is_better", "default_model", "sizes"))
TASKS.register_lazy("rt-sentiment", "lorabench.tasks.classification:RTSentiment",
                    kind="classification", metric="accuracy", higher_is_better=True, default_model="minilm-l6",
                    sizes="train 5,530 / validation 500 / eval 2,500 (of 8,530; balanced classes)")
TASKS.register_lazy("sarcasm", "lorabench.tasks.classification:Sarcasm",
                    kind="classification", metric="accuracy", higher_is_better=True, default_model="minilm-l6",
                    sizes="train 24,498 / validation 1,000 / eval 3,000 (of 28,614; 116 exact duplicates dropped)")
TASKS.register_lazy("quartz", "lorabench.tasks.multiple_choice:QuaRTz",
                    kind="multiple-choice", metric="accuracy", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 2,060 / validation 300 / eval 1,500 (of 3,860)")
TASKS.register_lazy("socialiqa", "lorabench.tasks.multiple_choice:SocialIQA",
                    kind="multiple-choice", metric="accuracy", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 903 / validation 300 / eval 1,000 (of 2,224; 21 exact duplicates dropped)")
TASKS.register_lazy("arith", "lorabench.tasks.generation:Arith",
                    kind="generation", metric="exact_match", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 3,837 / validation 300 / eval 500 (of 5,000: duplicates and every question also in "
                          "eval or validation dropped from train)")
TASKS.register_lazy("shakespeare-lm", "lorabench.tasks.lm:ShakespeareLM",
                    kind="perplexity", metric="perplexity", higher_is_better=False, default_model="smollm2-135m",
                    sizes="plays split 4 eval / the rest train; eval 64 windows (n_eval), train windows from every train play")
TASKS.register_lazy("kv-retrieval", "lorabench.tasks.longctx:KVRetrieval",
                    kind="generation", metric="exact_match", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 2,000 / eval 200 (of 2,200 generated from seed 0; n_pairs sets the input length)")


def get_task(name: str):
    return TASKS.get(name)
