"""LoRA for federated learning (survey arXiv 2407.11046, sec. 6): the aggregation rules and client-side
mechanisms that the clients scenario (lorabench/harness/clients.py) drives on Flower's simulation."""
