"""ApiQ: Finetuning of 2-Bit Quantized Large Language Model (Liao, Herold, Khadivi, Monz; arXiv 2402.05147).

QLoRA quantizes W to Q and starts LoRA at B = 0, so the quantized model starts from X Q, not X W,
and at 2-3 bits that start is far off; LoftQ matches weights, Q + B A ~ W. ApiQ instead matches
*activations*: it initialises the LoRA factors and the quantization jointly, layer after layer, so
that the quantized layer with its adapter reproduces the full-precision layer's output on
calibration inputs (sec. 3, the ApiQ-lw objective):

    argmin_{Q, A, B} || X W - X^q (Q + s B A) ||^2                        (ApiQ-lw, sec. 3.2)

where X is the layer's input in the full-precision model and X^q its input in the model whose
earlier layers are already quantized and initialised, so that later layers also correct the error
of earlier ones (error propagation, sec. 3.2). Q is uniform asymmetric b-bit quantization per group
with learnable weight clipping (sec. 3.2, after OmniQuant): the group range is
[sigmoid(beta) min W_g, sigmoid(gamma) max W_g], step s_g = range / (2^b - 1), zero z_g = round(-lo / s_g),
Q = (clamp(round(W / s_g) + z_g, 0, 2^b - 1) - z_g) s_g, rounded with a straight-through estimator;
gamma, beta, A and B are optimised with Adam on the objective, then Q is frozen and fine-tuning trains
A and B as LoRA does (the forward is QLoRA's: y = X^q Q^T + s X^q A^T B^T).

Scaled down to this harness: the calibration inputs are the first `calib_batches` training batches
of the task (the paper uses 128 WikiText-2 sequences; the benchmark has no general corpus per task),
at most `calib_tokens` of their token positions; each layer gets `calib_steps` full-batch Adam steps
(the paper: epochs over the calibration set). Layers that read the same input (q/k/v; gate/up) are
calibrated together, from one forward pass of the partly initialised model that stops at them.
The integer codes are kept unpacked (one uint8 per weight): the method measures the initialisation,
not the storage, which NF4/int4 (QLoRA, QA-LoRA) already cover.

Mechanism metrics (method_metrics): `act_rel_err_before` / `act_rel_err_after`, the mean over layers
of ||X W - X^q (Q + s B A)||^2 / ||X W||^2 at the QLoRA-like start (round-to-nearest with the clipping
factors at their start, sigmoid(4) = 0.98 of each group's min and max, and B = 0) and after ApiQ's
initialisation; `logit_rel_err_before` / `logit_rel_err_after`, the same for the whole model's
logits on the calibration batches against the full-precision model's; `calib_seconds`.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import TrainState
from lorabench.methods.lora import LoRA, LoraConfig, LoraLinear, LoraVariant
from lorabench.methods.efficiency_quantization.fake_quant import BITS, GROUP_SIZES, check_groups, grouped, round_ste

CLIP_INIT = 4.0  # sigmoid(4) = 0.982: the clipping factors start just inside min/max (as ApiQ's code)


def clipped_quantize(w: torch.Tensor, bits: int, group_size: int, gamma: torch.Tensor, beta: torch.Tensor):
    """ApiQ's quantizer with learnable weight clipping (sec. 3.2). gamma, beta: (out, in / group).
    Returns (Q dequantized (out, in), codes (out, in) in [0, 2^b - 1], scales, zeros (out, in / group))."""
    qmax = 2 ** bits - 1
    g = grouped(w, group_size)                                   # (out, G, group)
    hi = torch.sigmoid(gamma) * g.amax(-1)                       # clipped max of each group
    lo = torch.sigmoid(beta) * g.amin(-1)                        # clipped min
    scale = ((hi - lo) / qmax).clamp(min=1e-5)                   # s_g = (hi - lo) / (2^b - 1)
    zero = (-lo / scale).round()                                 # z_g = round(-lo / s_g)
    q = (round_ste(g / scale[..., None]) + zero[..., None]).clamp(0, qmax)   # clamp(round(W / s) + z, 0, 2^b - 1)
    deq = ((q - zero[..., None]) * scale[..., None]).reshape_as(w)           # Q = (q - z) s
    return deq, q.detach().reshape_as(w).to(torch.uint8), scale.detach(), zero.detach()


class UniformQuantLinear(nn.Module):
    """A frozen b-bit group-wise linear layer: W = (q - z) s per group; codes unpacked (uint8)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = in_features // group_size
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zeros", torch.zeros(out_features, groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> "UniformQuantLinear":
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size)
        mod = mod.to(linear.weight.device)
        clip = torch.full(mod.scales.shape, CLIP_INIT, device=linear.weight.device)
        with torch.no_grad():
            mod.load(*clipped_quantize(linear.weight.float(), bits, group_size, clip, clip)[1:])
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.float())
        return mod

    @torch.no_grad()
    def load(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        self.codes.copy_(codes)
        self.scales.copy_(scales)
        self.zeros.copy_(zeros)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        q = grouped(self.codes.float(), self.group_size)
        w = ((q - self.zeros[..., None]) * self.scales[..., None]).reshape(self.out_features, self.in_features)
        return w.to(dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")


class ApiQVariant(LoraVariant):
    """LoRA over the quantized base (QLoRA's forward). While ApiQ calibrates, `full_precision` makes the
    layer compute the original X W (the target of the objective); the fp weight is dropped after."""

    def __init__(self, fp_weight: torch.Tensor):
        self.fp_weight: torch.Tensor | None = fp_weight
        self.full_precision = False

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        if self.full_precision:
            bias = None if layer.base.bias is None else layer.base.bias.to(x.dtype)
            return F.linear(x, self.fp_weight.to(x.dtype), bias)
        return super().forward(layer, x)

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        return layer.scale * (layer.lora_B @ layer.lora_A)

    def merge(self, layer: LoraLinear) -> None:
        raise NotImplementedError("a b-bit base cannot absorb the adapter without re-quantizing it (lossy)")

    unmerge = merge


@dataclass
class ApiQConfig(LoraConfig):
    bits: int = option(2, "bit width b of the quantized weights (the paper: 2, 3 and 4)", choices=BITS)
    group_size: int = option(64, "inputs per quantization group (the paper: 64); must divide every adapted layer's "
                                 "input width", choices=GROUP_SIZES)
    calib_batches: int = option(1, "training batches used as calibration inputs X (the first ones of the stream; "
                                   "they are trained on afterwards like every other batch)", low=1, high=64)
    calib_tokens: int = option(512, "token positions of the calibration batches kept per layer (evenly spaced "
                                    "over the unpadded tokens): rows of X and X^q in the objective", low=8)
    calib_steps: int = option(100, "Adam steps per layer on the ApiQ-lw objective (full batch)", low=1, high=10000)
    calib_lr: float = option(1e-3, "Adam learning rate of A and B during the initialisation", low=0.0)
    clip_lr: float = option(5e-3, "Adam learning rate of the clipping factors gamma, beta during the "
                                  "initialisation", low=0.0)

    def __post_init__(self):
        super().__post_init__()
        if self.kernel != "reference":
            raise ValueError("apiq: kernel must be 'reference' (the fused lora_linear op needs a dense base weight; "
                             "ApiQ's base is b-bit)")
        if self.calib_lr == 0 and self.clip_lr == 0:
            raise ValueError("calib_lr and clip_lr are both 0: ApiQ's initialisation would change nothing; "
                             "use qlora for a plain quantized start")


class _Stop(Exception):
    """Raised by a capture hook to end a calibration forward pass once its layers have their input."""


def _positions(batch: dict, n: int) -> torch.Tensor:
    """Indices into the flattened (batch * seq) positions: n evenly spaced unpadded tokens."""
    mask = batch.get("attention_mask")
    valid = (mask.flatten() > 0).nonzero().squeeze(1) if mask is not None \
        else torch.arange(batch["input_ids"].numel())
    if len(valid) <= n:
        return valid
    return valid[torch.linspace(0, len(valid) - 1, n).round().long()]


def _rel_err(out: torch.Tensor, target: torch.Tensor) -> float:
    return ((out - target).pow(2).sum() / target.pow(2).sum().clamp(min=1e-12)).item()


class ApiQ(LoRA):
    name = "apiq"
    title = "ApiQ: Finetuning of 2-Bit Quantized Large Language Model"
    paper = "2402.05147"
    family = "efficiency-quantization"
    config_cls = ApiQConfig
    default_lr = 5e-4  # as qlora: fine-tuning after the initialisation is QLoRA's
    mergeable = False  # a b-bit base cannot absorb the adapter exactly
    mechanism_metrics = {
        "act_rel_err_before": "mean over layers of ||X W - X^q (Q + s B A)||^2 / ||X W||^2 at the QLoRA-like start "
                              "(round-to-nearest, B = 0)",
        "act_rel_err_after": "the same after ApiQ's activation-preserving initialisation (ApiQ-lw, sec. 3.2)",
        "logit_rel_err_before": "relative squared error of the model's logits against the full-precision model's "
                                "on the calibration batches, at the QLoRA-like start",
        "logit_rel_err_after": "the same after ApiQ's initialisation",
        "layers_initialised": "adapted layers initialised by ApiQ",
        "calib_seconds": "wall time of the initialisation",
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.calibrated = False

    def make_layer(self, base: nn.Linear) -> nn.Module:
        c = self.config
        check_groups(base.in_features, c.group_size, self.name)
        quant = UniformQuantLinear.from_linear(base, c.bits, c.group_size)
        return LoraLinear(quant, c.rank, self.scale(), c.dropout, c.init, c.kernel,
                          variant=ApiQVariant(base.weight.detach()), zero_init=c.zero_init)

    def apiq_layers(self, model: nn.Module) -> list[tuple[str, LoraLinear]]:
        return [(n, m) for n, m in model.named_modules()
                if isinstance(m, LoraLinear) and isinstance(m.variant, ApiQVariant)]

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A, B, and the quantized base: its codes, scales and zeros come from the calibration data, so
        applying the method to the base model cannot rebuild them."""
        out = super().adapter_state_dict(model)
        for name, layer in self.apiq_layers(model):
            for b in ("codes", "scales", "zeros"):
                out[f"{name}.base.{b}"] = getattr(layer.base, b).detach()
        return out

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().load_adapter_state_dict(model, state)
        for _, layer in self.apiq_layers(model):
            layer.variant.fp_weight = None  # the loaded quantization replaces the initialisation
        self.calibrated = True

    # -- the initialisation, on the first training batches -------------------------------------
    def train_batches(self, state: TrainState, task, tokenizer, batch_size: int, seed: int):
        stream = task.train_batches(tokenizer, batch_size, seed)
        if self.calibrated:
            return stream
        calib = [next(stream) for _ in range(self.config.calib_batches)]
        self.calibrate(state.model, calib, state.metrics)
        return itertools.chain(calib, stream)  # the calibration batches are trained on as well

    def _inputs(self, model: nn.Module, batch: dict, layers: list[tuple[str, LoraLinear]],
                stop_at: set[str] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """One forward pass: the input of each of `layers` (in the order they are called) and the logits;
        with `stop_at`, the pass ends as soon as those layers have their input (no logits)."""
        seen: dict[str, torch.Tensor] = {}

        def hook(mod, args, name):
            seen[name] = args[0]
            if stop_at is not None and stop_at <= seen.keys():
                raise _Stop

        hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: hook(mod, args, name))
                 for n, m in layers if stop_at is None or n in stop_at]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        try:
            logits = model(**inputs).logits
        except _Stop:
            logits = None
        finally:
            for h in hooks:
                h.remove()
        return seen, logits

    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches: list[dict], metrics: dict) -> None:
        c = self.config
        t0 = time.perf_counter()
        layers = self.apiq_layers(model)
        if any(m.variant.fp_weight is None for _, m in layers):
            raise RuntimeError("apiq: the full-precision weights were already dropped; apply the method afresh")
        was_training = model.training
        model.eval()
        per_batch = max(1, c.calib_tokens // len(batches))
        positions = [_positions(b, per_batch) for b in batches]

        def rows(x: torch.Tensor, i: int) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
            if flat.shape[0] != batches[i]["input_ids"].numel():  # not one row per token (BERT's pooler: [CLS])
                return flat[torch.linspace(0, len(flat) - 1, min(len(flat), per_batch)).round().long()].float()
            return flat[positions[i]].float()

        # 1. the full-precision model: each layer's input X, its stages, its logits
        for _, m in layers:
            m.variant.full_precision = True
        X_fp: dict[str, list[torch.Tensor]] = {}
        fp_logits, stages = [], []
        for i, b in enumerate(batches):
            seen, logits = self._inputs(model, b, layers)
            fp_logits.append(logits)
            for n, x in seen.items():
                X_fp.setdefault(n, []).append(rows(x, i))
            if i == 0:  # dict order = order of the first call; layers reading the very same tensor share a stage
                for n in seen:
                    if stages and seen[stages[-1][0]] is seen[n]:
                        stages[-1].append(n)
                    else:
                        stages.append([n])
        for _, m in layers:
            m.variant.full_precision = False
        before_logits = [self._inputs(model, b, [])[1] for b in batches]  # the QLoRA-like start (B = 0)

        # 2. stage after stage (ApiQ-lw): X^q from the partly initialised model, then the joint optimisation
        by_name = dict(layers)
        before, after = [], []
        for stage in stages:
            X_q: dict[str, list[torch.Tensor]] = {}
            for i, b in enumerate(batches):
                for n, x in self._inputs(model, b, layers, stop_at=set(stage))[0].items():
                    X_q.setdefault(n, []).append(rows(x, i))
            for n in stage:
                e0, e1 = self._init_layer(by_name[n], torch.cat(X_fp.pop(n)), torch.cat(X_q[n]))
                before.append(e0)
                after.append(e1)
        after_logits = [self._inputs(model, b, [])[1] for b in batches]
        for _, m in layers:
            m.variant.fp_weight = None  # ApiQ keeps only Q, A, B
        self.calibrated = True
        model.train(was_training)

        def logit_err(outs):
            return sum(_rel_err(o.float(), f.float()) for o, f in zip(outs, fp_logits)) / len(outs)
        metrics.update({"act_rel_err_before": sum(before) / len(before), "act_rel_err_after": sum(after) / len(after),
                        "logit_rel_err_before": logit_err(before_logits), "logit_rel_err_after": logit_err(after_logits),
                        "layers_initialised": len(after), "calib_stages": len(stages),
                        "calib_seconds": round(time.perf_counter() - t0, 3)})

    def _init_layer(self, layer: LoraLinear, X: torch.Tensor, X_q: torch.Tensor) -> tuple[float, float]:
        """Minimise || X W - X^q (Q + s B A) ||^2 over the clipping factors, A and B (ApiQ-lw, sec. 3.2)."""
        c = self.config
        base: UniformQuantLinear = layer.base
        W = layer.variant.fp_weight.float()
        target = X @ W.T                                                       # X W (bias on both sides: dropped)
        gamma = torch.full(base.scales.shape, CLIP_INIT, requires_grad=True)
        beta = torch.full(base.scales.shape, CLIP_INIT, requires_grad=True)
        A = layer.lora_A.detach().float().clone().requires_grad_(True)
        B = layer.lora_B.detach().float().clone().requires_grad_(True)
        s = layer.scale

        def output(Q, A, B):
            return X_q @ Q.T + s * (X_q @ A.T) @ B.T                            # X^q (Q + s B A)

        with torch.no_grad():
            err0 = _rel_err(output(base.dequantize(), A, B), target)
        opt = torch.optim.Adam([{"params": [A, B], "lr": c.calib_lr}, {"params": [gamma, beta], "lr": c.clip_lr}])
        with torch.enable_grad():
            for _ in range(c.calib_steps):
                Q = clipped_quantize(W, c.bits, c.group_size, gamma, beta)[0]
                loss = (output(Q, A, B) - target).pow(2).mean()                 # the ApiQ-lw objective
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            Q, codes, scales, zeros = clipped_quantize(W, c.bits, c.group_size, gamma, beta)
            base.load(codes, scales, zeros)
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            err1 = _rel_err(output(base.dequantize(), A, B), target)
        return err0, err1
