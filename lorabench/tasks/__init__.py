"""The task registry (DESIGN "Tasks"); sizes of every split are in docs/tasks.md."""
from lorabench.registry import Registry

TASKS: Registry = Registry("task")
TASKS.register_lazy("rt-sentiment", "lorabench.tasks.classification:RTSentiment")
TASKS.register_lazy("sarcasm", "lorabench.tasks.classification:Sarcasm")
TASKS.register_lazy("quartz", "lorabench.tasks.multiple_choice:QuaRTz")
TASKS.register_lazy("socialiqa", "lorabench.tasks.multiple_choice:SocialIQA")
TASKS.register_lazy("arith", "lorabench.tasks.generation:Arith")
TASKS.register_lazy("shakespeare-lm", "lorabench.tasks.lm:ShakespeareLM")
TASKS.register_lazy("kv-retrieval", "lorabench.tasks.longctx:KVRetrieval")


def get_task(name: str):
    return TASKS.get(name)
