"""Imported once by the fork server (worker.PRELOAD), so that trials do not each import it again.

transformers imports its model and tokenizer classes lazily, on first use: without this module every trial
process imports ~1,500 modules (modeling_bert or modeling_llama, the auto classes, the loading machinery,
the tokenizers) when it loads its model, 2.4 s of CPU time per MiniLM-L6 trial on the development machine;
imported here, a trial's start-up takes 0.1 s. The modules are those of the two model families the suites
load (BERT: MiniLM-L6, tiny-bert; Llama: SmolLM2-135M, tiny-llama). A module this transformers lacks is left
out: the trial then imports whatever its model needs itself, as before. Importing is all this does; no model
is built here. The pages these modules occupy are shared with each trial and counted in its peak RSS either
way (a forked process's RSS includes the pages it inherits): docs/architecture.md, "Where a trial's time goes".
"""
from __future__ import annotations

import importlib

MODULES = (
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.bert.modeling_bert",
    "transformers.models.llama.modeling_llama",
    "transformers.modeling_utils",
    "transformers.tokenization_utils_tokenizers",
    "transformers.core_model_loading",
)


def preload() -> list[str]:
    """Import MODULES and the classes `assets.load_model` asks transformers for; returns the names imported."""
    done = []
    for name in MODULES:
        try:
            importlib.import_module(name)
            done.append(name)
        except ImportError:
            pass
    import transformers
    for cls in ("AutoModelForSequenceClassification", "AutoModelForCausalLM", "AutoTokenizer",
                "BertForSequenceClassification", "LlamaForCausalLM", "BertTokenizerFast", "PreTrainedTokenizerFast"):
        try:
            getattr(transformers, cls)
            done.append(f"transformers.{cls}")
        except (AttributeError, ImportError):
            pass
    return done


preload()
