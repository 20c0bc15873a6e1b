"""The LoRA part of "A Fast, Performant, Secure Distributed Training Framework For Large Language Model"
(Huang et al., arXiv 2401.09796).

The framework keeps the fine-tuned structure (the LoRA adapter) inside trusted execution environments (TEEs)
on the clients and the server, and what leaves an enclave is encrypted with a one-time pad (sec. 3 of the
paper, "lightweight encryption"): the clients' LoRA updates cross the network and the server's untrusted
memory only as ciphertext, and the server's enclave decrypts them and aggregates (FedAvg, as FedIT).

What is built and measured here: the one-time pad on every tensor that travels, both ways. Each tensor's
bits (its float32 words) are XORed with a pad drawn from a key shared by the enclaves and a fresh nonce per
message (sent with it, 8 bytes), so the ciphertext has the plaintext's size and decrypts exactly; the server
decrypts before it aggregates, so the aggregation and the accuracy are FedIT's. Per round the record shows
what an observer of the network sees: the share of bytes of the ciphertext equal to the plaintext's
(`wire_equal_bytes`, 1/256 for a uniform pad, 1 without encryption) and the bytes sent, with the nonce.
Not built: the TEEs themselves (attestation, the key exchange that gives the enclaves their shared key:
here it comes from the trial's seed) and the paper's split fine-tuning (the latter layers in a server-side
TEE, with its sparsification, SPF): enclaves cannot be measured on this machine.
"""
from __future__ import annotations

import hashlib
import os

import torch

from lorabench.methods.federated.base import FederatedLoRA, State

NONCE = "otp.nonce"


def pad_for(key: int, nonce: int, name: str, numel: int) -> torch.Tensor:
    """The pad of one tensor: int32 words from a generator seeded by (key, nonce, tensor name)."""
    tag = hashlib.sha256(f"otp:{key}:{nonce}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(tag[:8], "little"))
    return torch.randint(-2**31, 2**31, (numel,), dtype=torch.int64, generator=g).to(torch.int32)


def xor(state: State, key: int, nonce: int) -> State:
    """XOR every tensor's float32 words with its pad: encrypts a plaintext state, decrypts a ciphertext one."""
    out = {}
    for name, t in state.items():
        words = t.contiguous().view(torch.int32) if t.dtype == torch.int32 else t.float().contiguous().view(torch.int32)
        out[name] = torch.bitwise_xor(words.flatten(), pad_for(key, nonce, name, words.numel())).view(t.shape)
    return out


def encrypt(state: State, key: int) -> State:
    nonce = int.from_bytes(os.urandom(7), "little")  # fresh per message: a pad is never used twice
    return {**xor(state, key, nonce), NONCE: torch.tensor([nonce], dtype=torch.int64)}


def decrypt(message: State, key: int) -> State:
    nonce = int(message[NONCE][0])
    plain = xor({k: v for k, v in message.items() if k != NONCE}, key, nonce)
    return {k: v.view(torch.float32) for k, v in plain.items()}


def equal_bytes(cipher: State, plain: State) -> float:
    """Share of the bytes of a ciphertext that equal the plaintext's (what the encryption leaves in the clear)."""
    same = total = 0
    for k, v in plain.items():
        a = v.float().contiguous().view(torch.uint8)
        b = cipher[k].contiguous().view(torch.uint8)
        same += int((a == b).sum())
        total += a.numel()
    return same / total if total else 0.0


class OtpLoRA(FederatedLoRA):
    name = "otp-lora"
    title = "A fast, performant, secure distributed training framework for large language model"
    paper = "2401.09796"
    round_metrics = {"wire_equal_bytes": "share of the uploaded ciphertext's bytes equal to the plaintext's "
                                         "(1/256 expected for a one-time pad)"}
    key: int | None = None

    def enclave_key(self) -> int:
        # stands for the key the enclaves agree on after attestation (not built): the same on every party
        if self.key is None:
            self.key = int.from_bytes(hashlib.sha256(f"enclave:{self.seed}".encode()).digest()[:7], "little")
        return self.key

    def apply(self, model, ctx):
        self.seed = ctx.seed
        return super().apply(model, ctx)

    def download(self, global_state: State, slot: int, n_clients: int) -> State:
        return encrypt(super().download(global_state, slot, n_clients), self.enclave_key())

    def load_state(self, model, state: State) -> None:
        super().load_state(model, decrypt(state, self.enclave_key()) if NONCE in state else state)

    def upload(self, model) -> State:
        return encrypt(super().upload(model), self.enclave_key())

    def aggregate(self, global_state, uploads, weights, slots, n_clients):
        plain = [decrypt(u, self.enclave_key()) for u in uploads]  # inside the server's enclave
        self.last_equal = sum(equal_bytes(u, p) for u, p in zip(uploads, plain)) / len(plain)
        return super().aggregate(global_state, plain, weights, slots, n_clients)

    def round_summary(self, slots: list[int]) -> dict:
        return {"wire_equal_bytes": round(getattr(self, "last_equal", 0.0), 6)}

    def delta_weights(self, state: State) -> dict[str, torch.Tensor]:
        if NONCE in state:  # a client's upload merged over the global state: decrypt its part (the int32 words)
            cipher = {k: v for k, v in state.items() if v.dtype == torch.int32}
            plain = {k: v for k, v in state.items() if k != NONCE and k not in cipher}
            state = {**plain, **decrypt({**cipher, NONCE: state[NONCE]}, self.enclave_key())}
        return super().delta_weights(state)
