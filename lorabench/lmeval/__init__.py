"""lm-evaluation-harness integration (issue 9): score any base model + lorabench adapter with lm-eval, offline.

- `lorabench.lmeval.model.LorabenchLM`: the `lm_eval.api.model.LM` registered as `lorabench`;
- `lorabench.lmeval.export`: lorabench's decoder tasks as lm-eval YAML over local JSONL;
- `lorabench.lmeval.run`: `simple_evaluate` offline (the `eval` command, the suite option `lm_eval`).

lm-eval is an optional dependency (`pip install lorabench[lm-eval]`); nothing here imports it at
package import time, so `import lorabench.lmeval` works without it and fails only when used.
"""
