"""Methods-table rows of the cross-task family (issue 17). A composition method's single-task trial trains
one LoRA adapter, the kind the library holds; its composition rule is tested on library adapters in
tests/test_cross_task.py. A mixture of LoRA experts trains its experts and router on the task like any method
(B = 0 at init: the base model's outputs)."""
from tests.methods.tester import Case

CASES = [
    Case("lorahub", {"rank": 4, "alpha": 8}),
    Case("lora-arithmetic", {"rank": 4, "alpha": 8}),
    Case("uniform-average", {"rank": 4, "alpha": 8}),
    Case("loraretriever", {"rank": 4, "alpha": 8, "top_k": 2}),
    Case("token-level", {"rank": 4, "alpha": 8}),
    Case("compeft", {"rank": 4, "alpha": 8}),
    # L-LoRA: a single-task trial fine-tunes one linearised LoRA (its merge in tests/test_cross_task_l_lora.py)
    Case("l-lora", {"rank": 4, "alpha": 8}),
    # PERU-LoRA: a single-task trial trains the library adapter it reuses (the reuse in tests/test_cross_task_reuse.py)
    Case("peru-lora", {"rank": 4, "alpha": 8, "keep_rank": 2}),
    # mixtures of LoRA experts (lorabench/methods/cross_task/mixture.py); their routers in tests/test_mixture.py
    Case("mixlora", {"experts": 3, "rank": 2}),
    Case("loramoe", {"experts": 4, "rank": 2}),
    Case("moelora", {"experts": 3, "rank": 2, "task_dim": 8}),
    Case("sira", {"experts": 4, "rank": 2}),
    Case("mola", {"rank": 2, "experts_by_depth": [2, 3]}),
    Case("multilora", {"experts": 3, "rank": 2}),
    Case("llava-mole", {"experts": 3, "rank": 2}),
    Case("octavius", {"experts": 3, "rank": 2}),
    Case("mtlora", {"experts": 3, "rank": 2}),
    Case("mixture-of-loras", {"experts": 3, "rank": 2}),
    Case("x-lora", {"experts": 3, "rank": 2}),
    Case("mixlora-cfs", {"factors": 6, "rank": 2}),
    Case("mocle", {"experts": 3, "rank": 2, "clusters": 4, "fit_examples": 16}),
    Case("fast-lora", {"adapters": 2, "rank": 2}),
    Case("moral", {"experts": 3, "rank": 2}),
    # MLoRE: a generic path, routed experts of different ranks, task 0's router and task-specific expert
    Case("mlore", {"expert_ranks": [1, 2, 3], "top_k": 2, "generic_rank": 2, "specific_rank": 1, "tasks": 2}),
    # LoRA ensembles: a single-task trial trains one member (a LoRA); the ensemble in tests/test_cross_task_ensemble.py
    Case("lora-ensemble", {"rank": 4, "alpha": 8, "members": 3}),
]
