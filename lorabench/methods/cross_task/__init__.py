"""Cross-task generalization (survey arXiv 2407.11046, sec. 4): rules that compose a library of task
adapters into one for a new task, which the multi-task scenario (lorabench/harness/multitask.py,
lorabench/harness/cross_task.py) drives; `merging.py` holds the weight-space merges they are compared with."""
