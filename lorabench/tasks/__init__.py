"""The task registry (docs/architecture.md, "Where things live"); sizes of every split are in docs/tasks.md."""
from lorabench.registry import Registry

# kind, metric (its name), higher_is_better, default_model and sizes: what `list tasks` shows without
# importing the task (lorabench/registry.py); tests check them against the class's attributes.
TASKS: Registry = Registry("task", meta_keys=("kind", "metric", "higher_is_better", "default_model", "sizes"))
TASKS.register_lazy("rt-sentiment", "lorabench.tasks.classification:RTSentiment",
                    kind="classification", metric="accuracy", higher_is_better=True, default_model="minilm-l6",
                    sizes="train 5,530 / validation 500 / eval 2,500 (of 8,530; balanced classes)")
TASKS.register_lazy("movie-domains", "lorabench.tasks.classification:MovieDomains",
                    kind="classification", metric="accuracy", higher_is_better=True, default_model="minilm-l6",
                    sizes="train 14,060 / validation 500 / eval 2,500 (of 17,060: 8,530 per domain)")
TASKS.register_lazy("sarcasm", "lorabench.tasks.classification:Sarcasm",
                    kind="classification", metric="accuracy", higher_is_better=True, default_model="minilm-l6",
                    sizes="train 24,498 / validation 1,000 / eval 3,000 (of 28,614; 116 exact duplicates dropped)")
TASKS.register_lazy("text-sources", "lorabench.tasks.classification:TextSources",
                    kind="classification", metric="accuracy", higher_is_better=True, default_model="minilm-l6",
                    sizes="train 6,800 / validation 400 / eval 800 (of 8,000: 2,000 per class, 4 classes)")
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
TASKS.register_lazy("shakespeare-roles", "lorabench.tasks.lm:ShakespeareRoles",
                    kind="perplexity", metric="perplexity", higher_is_better=False, default_model="smollm2-135m",
                    sizes="train 1,819 / eval 454 speeches of the 10 roles with the most (n_roles); no validation part")
TASKS.register_lazy("kv-retrieval", "lorabench.tasks.longctx:KVRetrieval",
                    kind="generation", metric="exact_match", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 2,000 / eval 200 (of 2,200 generated from seed 0; n_pairs sets the input length)")

# The cross-task pool (docs/tasks.md, "The cross-task pool"; lorabench/harness/task_pool.py): multiple choice on
# SmolLM2, scored like quartz and socialiqa
TASKS.register_lazy("rt-mc", "lorabench.tasks.multiple_choice:RTChoice",
                    kind="multiple-choice", metric="accuracy", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 7,730 / validation 300 / eval 500 (of 8,530)")
TASKS.register_lazy("imdb-mc", "lorabench.tasks.multiple_choice:IMDBChoice",
                    kind="multiple-choice", metric="accuracy", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 24,104 / validation 300 / eval 500 (of 24,904 distinct reviews)")
TASKS.register_lazy("sarcasm-mc", "lorabench.tasks.multiple_choice:SarcasmChoice",
                    kind="multiple-choice", metric="accuracy", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 27,698 / validation 300 / eval 500 (of 28,614; 116 exact duplicates dropped)")
TASKS.register_lazy("corr2cause", "lorabench.tasks.multiple_choice:Corr2Cause",
                    kind="multiple-choice", metric="accuracy", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 722 / validation 300 / eval 500 (of 2,246; 724 exact duplicates dropped)")
TASKS.register_lazy("pararule-plus", "lorabench.tasks.multiple_choice:PararulePlus",
                    kind="multiple-choice", metric="accuracy", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 1,200 / validation 300 / eval 500 (of 2,000)")
TASKS.register_lazy("crepe", "lorabench.tasks.multiple_choice:Crepe",
                    kind="multiple-choice", metric="accuracy", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 720 / validation 300 / eval 500 (of 1,520)")
TASKS.register_lazy("abstract-causal", "lorabench.tasks.multiple_choice:AbstractCausal",
                    kind="multiple-choice", metric="accuracy", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 1,181 / validation 300 / eval 500 (of 2,000; 19 exact duplicates dropped)")
TASKS.register_lazy("logiqa", "lorabench.tasks.multiple_choice:LogiQA",
                    kind="multiple-choice", metric="accuracy", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 377 / validation 100 / eval 200 (of 1,354; every question is in the file twice: 677 dropped)")
TASKS.register_lazy("reclor", "lorabench.tasks.multiple_choice:ReClor",
                    kind="multiple-choice", metric="accuracy", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 300 / validation 50 / eval 150 (of 500)")
TASKS.register_lazy("parable-moral", "lorabench.tasks.multiple_choice:ParableMoral",
                    kind="multiple-choice", metric="accuracy", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 832 / validation 300 / eval 500 (of 1,632)")
TASKS.register_lazy("tomi", "lorabench.tasks.multiple_choice:ToMi",
                    kind="multiple-choice", metric="accuracy", higher_is_better=True, default_model="smollm2-135m",
                    sizes="train 5,183 / validation 300 (50 stories) / eval 510 (85 stories) (of 5,993 questions about "
                          "999 stories)")


def get_task(name: str):
    return TASKS.get(name)
