"""FedIT: FedAvg of the LoRA factors, the federated baseline (Zhang et al., "Towards Building the
Federated GPT: Federated Instruction Tuning", arXiv 2305.05644). Each client trains LoRA on its own
data; the server averages A and B separately, weighted by the clients' example counts, which is not
the average of the products B_i A_i (the clients scenario records by how much). The machinery every
federated method shares is in `lorabench/methods/federated/base.py`."""
from __future__ import annotations

from lorabench.methods.federated.base import FederatedLoRA


class FedIT(FederatedLoRA):
    __doc__ = __doc__
    name = "fedit"
