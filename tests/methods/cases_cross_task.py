"""Methods-table rows of the cross-task family (issue 17). A composition method's single-task trial trains
one LoRA adapter, the kind the library holds; its composition rule is tested on library adapters in
tests/test_cross_task.py."""
from tests.methods.tester import Case

CASES = [
    Case("lorahub", {"rank": 4, "alpha": 8}),
    Case("lora-arithmetic", {"rank": 4, "alpha": 8}),
    Case("uniform-average", {"rank": 4, "alpha": 8}),
]
