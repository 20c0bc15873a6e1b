"""The multi-task scenario's adapter library (issue 17; docs/cross-task.md): one LoRA per pool task
(`lorabench/harness/task_pool.py`), trained once, cached by its trial id as safetensors, and reused by
every composition method (`lorabench/methods/cross_task/`).

The library trains the way ASPEN does (Ye et al., "ASPEN: High-Throughput LoRA Fine-Tuning of Large Language
Models with a Single GPU", arXiv 2312.02515; the survey's "parallel LoRA computing"): many
adapters in one job over one frozen base model. Each step takes one batch per adapter from that
adapter's own task, stacks the rows into one batch (the rows of adapter l contiguous), runs the frozen
base once over all of them, and adds each adapter's low-rank term to its own rows only through the
multi-adapter SGMV kernels (`lorabench.ops.multi_lora`, after Punica arXiv 2310.18547):

    h[i] = W0 x[i] + s B_l A_l x[i]          l = the adapter of row i   (eq. (3) of LoRA, per row)

The loss of the step is the sum of the adapters' own losses (each the mean over its rows' target
tokens, as the single-task loop's); adapters share no parameter and rows do not interact (causal
attention within a row), so the gradient of adapter l is the gradient of its own loss. AdamW acts
element-wise and gradient clipping is done per adapter, so each adapter follows the same trajectory as
training it alone with `lorabench.harness.train.train` (tests/test_multitask.py checks the losses step
by step, within rounding).

The SGMV ops are inference ops; `SgmvLoRA` gives them a backward: the input gradient goes back through
the same two kernels with the slots transposed (g B_l then A_l), and each adapter's weight gradients
are one GEMM over its own segment of rows.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.harness.train import TrainConfig, lr_lambda
from lorabench.tasks.causal import IGNORE

LIBRARY_VERSION = 2   # part of every library adapter's id: bump when the way adapters are trained changes (2: init seeded by id)


# ---- the fused layer -------------------------------------------------------------------------------------

class SgmvLoRA(torch.autograd.Function):
    """delta[i] = s_l B_l A_l x[i] for the tokens of segment l, with its backward (eq. (3) of LoRA):

        forward:   y = s x A_l^T  (sgmv_shrink),   delta = y B_l^T   (sgmv_expand)
        backward:  u = s g B_l    (sgmv_shrink with B_l^T as the slot),  dx = u A_l  (sgmv_expand with A_l^T)
                   dB_l = g_seg^T y_seg,   dA_l = u_seg^T x_seg          (one GEMM per segment)
    """

    @staticmethod
    def forward(ctx, x, A, B, seg_starts, seg_idx, ranks, scales):
        from lorabench.ops import multi_lora
        y = multi_lora.sgmv_shrink(x, A, seg_starts, seg_idx, ranks, scales)          # (T, R) fp32
        delta = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)  # (T, out)
        multi_lora.sgmv_expand(delta, y, B, seg_starts, seg_idx, ranks)
        ctx.save_for_backward(x, A, B, seg_starts, seg_idx, ranks, scales, y)
        return delta

    @staticmethod
    def backward(ctx, g):
        from lorabench.ops import multi_lora
        x, A, B, seg_starts, seg_idx, ranks, scales, y = ctx.saved_tensors
        g = g.contiguous()
        Bt = B.transpose(1, 2).contiguous()                                           # (L, R, out): a shrink slot
        u = multi_lora.sgmv_shrink(g, Bt, seg_starts, seg_idx, ranks, scales)         # (T, R) = s g B_l
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.zeros_like(x)
            multi_lora.sgmv_expand(dx, u, A.transpose(1, 2).contiguous(), seg_starts, seg_idx, ranks)  # u A_l
        dA, dB = torch.zeros_like(A), torch.zeros_like(B)
        starts = seg_starts.tolist()
        for s, l in enumerate(seg_idx.tolist()):
            a, b = starts[s], starts[s + 1]
            if l < 0 or a == b:
                continue
            r = int(ranks[l])
            dB[l, :, :r] += (g[a:b].T.float() @ y[a:b, :r]).to(B.dtype)               # (out, r)
            dA[l, :r] += (u[a:b, :r].T @ x[a:b].float()).to(A.dtype)                  # (r, in)
        return dx, dA, dB, None, None, None, None


class MultiLoraLinear(nn.Module):
    """A frozen linear layer with L LoRA adapters stacked in slots, `lora_A: (L, r, in)` and
    `lora_B: (L, out, r)` (the SGMV weight layout); `segments` (set for each batch by `FusedLibrary`) says
    which rows use which slot."""

    def __init__(self, base: nn.Linear, n_adapters: int, rank: int, scale: float,
                 generators: list[torch.Generator | None] | None = None):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, scale
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.zeros(n_adapters, rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(n_adapters, base.out_features, rank, dtype=w.dtype, device=w.device))
        for l in range(n_adapters):  # as LoraLinear: A kaiming-uniform (nn.Linear's, PEFT's), B = 0
            nn.init.kaiming_uniform_(self.lora_A.data[l], a=math.sqrt(5),
                                     generator=generators[l] if generators else None)
        self.register_buffer("ranks", torch.full((n_adapters,), rank, dtype=torch.int64), persistent=False)
        self.register_buffer("scales", torch.full((n_adapters,), float(scale), dtype=torch.float32), persistent=False)
        self.segments: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.segments is None:
            raise RuntimeError("MultiLoraLinear: no segments set; run the model through FusedLibrary")
        x2 = x.reshape(-1, x.shape[-1])                                               # (T, in), T = rows * length
        delta = SgmvLoRA.apply(x2, self.lora_A, self.lora_B, *self.segments, self.ranks, self.scales)
        return self.base(x) + delta.reshape(*x.shape[:-1], -1)


# ---- the fused model and its training loop ---------------------------------------------------------------

@dataclass
class LibraryConfig:
    """How every adapter of the library is trained (one LoRA per task, the same recipe for each)."""
    rank: int = option(8, "LoRA rank of every library adapter", low=1, high=256)
    alpha: float = option(16.0, "LoRA alpha (scale alpha / rank, eq. (3) of LoRA)", low=0.0)
    target_modules: list[str] | None = option(
        None, "modules to adapt (name suffixes); None = every linear layer of the transformer blocks")
    adapters_per_job: int = option(4, "adapters trained together in one fused job (ASPEN-style)", low=1)
    tokens_per_job: int = option(
        2048, "a fused job's padded tokens per step at most (its adapters' rows x the longest task's max_length): "
              "short tasks train adapters_per_job at a time, long ones fewer, one above it alone", low=1)


def stack_rows(batches: list[dict], pad_id: int) -> tuple[dict, list[int]]:
    """One right-padded batch of every adapter's rows, adapter by adapter; the row count of each."""
    width = max(b["input_ids"].shape[1] for b in batches)

    def pad(t, value):
        return F.pad(t, (0, width - t.shape[1]), value=value)
    out = {"input_ids": torch.cat([pad(b["input_ids"], pad_id) for b in batches]),
           "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batches]),
           "labels": torch.cat([pad(b["labels"], IGNORE) for b in batches])}
    return out, [b["input_ids"].shape[0] for b in batches]


def plan_jobs(tasks: list[str], lengths: dict[str, int], batch_size: int, lib: LibraryConfig) -> list[list[str]]:
    """The library's fused jobs: tasks in order of their max_length (the pool's order among equals), each job
    filled while it holds at most `adapters_per_job` adapters and `tokens_per_job` padded tokens a step (rows x the
    longest of its tasks, which every row is padded to: stack_rows). Grouping by length keeps a 64-token task's rows
    from being padded to a 512-token one's, and bounds a job's activations: 4 adapters x 8 rows x 256 tokens on
    SmolLM2-135M in fp32 grew past 21 GB and the kernel's OOM killer ended the trial. Which adapters share a job
    does not change their ids (adapter_id) nor, beyond rounding, their training (module docstring)."""
    order = sorted(tasks, key=lambda t: (lengths[t], tasks.index(t)))
    jobs: list[list[str]] = []
    for t in order:
        job = jobs[-1] if jobs else None
        if job and len(job) < lib.adapters_per_job and (len(job) + 1) * batch_size * lengths[t] <= lib.tokens_per_job:
            job.append(t)
        else:
            jobs.append([t])
    return jobs


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: mean cross-entropy of token t+1 from position t, ignoring -100."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


class FusedLibrary:
    """L LoRA adapters over one frozen causal LM, trained together (module docstring)."""

    def __init__(self, model: nn.Module, n_adapters: int, rank: int, alpha: float,
                 target_modules: list[str] | None = None, init_seeds: list[int] | None = None):
        """`init_seeds`: one per adapter, so that an adapter's initial A depends on its own seed only, not on
        which slot or job it trains in (None: torch's global generator)."""
        from lorabench.methods.base import ApplyContext, replace_module, resolve_targets
        for p in model.parameters():
            p.requires_grad_(False)
        self.model, self.n = model, n_adapters
        self.names = resolve_targets(model, target_modules, ApplyContext(model.config.model_type, []))
        if init_seeds is not None and len(init_seeds) != n_adapters:
            raise ValueError(f"init_seeds has {len(init_seeds)} seeds for {n_adapters} adapters")
        gens = None if init_seeds is None else [torch.Generator().manual_seed(s) for s in init_seeds]
        self.layers: list[MultiLoraLinear] = []
        for name in self.names:
            layer = MultiLoraLinear(model.get_submodule(name), n_adapters, rank, alpha / rank, gens)
            replace_module(model, name, layer)
            self.layers.append(layer)

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in (layer.lora_A, layer.lora_B)]

    def set_rows(self, rows: list[int], length: int) -> None:
        """Rows are stacked adapter by adapter: adapter l's tokens are one segment of the flattened batch."""
        counts = torch.tensor([r * length for r in rows], dtype=torch.int64)
        seg_starts = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        seg_idx = torch.arange(len(rows), dtype=torch.int64)
        for layer in self.layers:
            layer.segments = (seg_starts, seg_idx)

    def adapter_state(self, slot: int) -> dict[str, torch.Tensor]:
        """Slot `slot` as a plain `lora` adapter (the names LoRA.adapter_state_dict gives)."""
        out = {}
        for name, layer in zip(self.names, self.layers):
            out[f"{name}.lora_A"] = layer.lora_A.detach()[slot].clone()
            out[f"{name}.lora_B"] = layer.lora_B.detach()[slot].clone()
        return out

    @torch.no_grad()
    def load_adapter_state(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        for name, layer in zip(self.names, self.layers):
            layer.lora_A[slot].copy_(state[f"{name}.lora_A"])
            layer.lora_B[slot].copy_(state[f"{name}.lora_B"])

    def losses(self, batches: list[dict], pad_id: int) -> list[torch.Tensor]:
        """Each adapter's own loss on its own batch, from one forward pass over all the rows."""
        batch, rows = stack_rows(batches, pad_id)
        self.set_rows(rows, batch["input_ids"].shape[1])
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        if getattr(self.model.config, "final_logit_softcapping", None) is not None or decoder is None or head is None:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out, start = [], 0
            for r in rows:
                out.append(causal_lm_loss(logits[start:start + r], batch["labels"][start:start + r]))
                start += r
            return out
        # causal_lm_loss's cross-entropy, with the output layer applied only where a target follows: the same mean
        # over the rows' target tokens without the (rows x length x vocabulary) logits, whose copies were the
        # largest tensors of a step (49,152 logits a token on SmolLM2) and a fifth of its arithmetic
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        targets = batch["labels"][:, 1:]
        out, start = [], 0
        for r in rows:
            keep = targets[start:start + r] != IGNORE
            logits = head(hidden[start:start + r, :-1][keep]).float()
            out.append(F.cross_entropy(logits, targets[start:start + r][keep]))
            start += r
        return out

    def clip_per_adapter(self, max_norm: float) -> None:
        """torch.nn.utils.clip_grad_norm_ applied to each adapter's own gradients (its slot of every layer)."""
        for l in range(self.n):
            grads = [g[l] for layer in self.layers for g in (layer.lora_A.grad, layer.lora_B.grad)]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef)


@dataclass
class FusedResult:
    losses: list[list[float]] = field(default_factory=list)   # [adapter][step]
    tokens_per_s: float | None = None                          # median over steps after warm-up
    seconds: float = 0.0


def train_fused(fused: FusedLibrary, tasks: list, tokenizer, cfg: TrainConfig, seeds: list[int],
                pad_id: int) -> FusedResult:
    """The single-task loop of lorabench/harness/train.py, for L adapters at once: the same optimizer
    (AdamW), schedule, per-adapter clipping and batches (task l's `train_batches` at seed l)."""
    if len(tasks) != fused.n or len(seeds) != fused.n:
        raise ValueError(f"{fused.n} adapters need {fused.n} tasks and seeds, got {len(tasks)} and {len(seeds)}")
    lr = cfg.lr if cfg.lr is not None else 5e-4
    optimizer = torch.optim.AdamW(fused.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    streams = [t.train_batches(tokenizer, cfg.batch_size, s) for t, s in zip(tasks, seeds)]
    fused.model.train()
    result, rates, t_start = FusedResult(losses=[[] for _ in tasks]), [], time.perf_counter()
    for step in range(cfg.steps):
        batches = [next(s) for s in streams]
        t0 = time.perf_counter()
        losses = fused.losses(batches, pad_id)
        total = torch.stack(losses).sum()   # adapters share no parameter: d total / d adapter l = d loss_l
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at step {step} (diverged); lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.max_grad_norm is not None:
            fused.clip_per_adapter(cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        dt = time.perf_counter() - t0
        if step >= cfg.warmup_steps_for_throughput:
            rates.append(sum(int(b["attention_mask"].sum()) for b in batches) / dt)
        for l, loss in enumerate(losses):
            result.losses[l].append(loss.item())
    fused.model.eval()
    result.tokens_per_s = statistics.median(rates) if rates else None
    result.seconds = time.perf_counter() - t_start
    return result


# ---- the library: ids, cache, training ------------------------------------------------------------------

def adapter_id(task: str, model: str, split_hash: str, lib: LibraryConfig, train: TrainConfig, seed: int,
               variant: str | None = None) -> str:
    """The trial id of a library adapter: a hash of everything that defines it (not of how many adapters
    shared its job: each adapter's initial factors come from a generator seeded by its id, and fused training
    gives it the losses it would have alone). `variant` names a library trained otherwise ("l-lora": linearised,
    `build_linearized_library`); None keeps the plain library's ids."""
    spec = {"scenario": "cross-task-library", "version": LIBRARY_VERSION, "task": task, "model": model,
            "split_hash": split_hash, "rank": lib.rank, "alpha": lib.alpha, "target_modules": lib.target_modules,
            "train": {k: v for k, v in asdict(train).items()
                      if k in ("steps", "batch_size", "lr", "weight_decay", "warmup_ratio", "schedule",
                               "max_grad_norm", "autocast")},
            "seed": seed}
    if variant is not None:
        spec["variant"] = variant
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def initial_factors(model: nn.Module, lib: LibraryConfig, init_seed: int) -> dict[str, torch.Tensor]:
    """The initial A of a library adapter, `{layer}.lora_A` (B starts at 0): rebuilt as FusedLibrary draws it, each
    adapted layer's A kaiming-uniform in turn from one generator seeded by the adapter's init seed (its id's first
    8 hex digits, `build_library`). What an update is measured from (ComPEFT, methods/cross_task/compeft.py)."""
    from lorabench.methods.base import ApplyContext, resolve_targets
    gen = torch.Generator().manual_seed(init_seed)
    out = {}
    for name in resolve_targets(model, lib.target_modules, ApplyContext(model.config.model_type, [])):
        A = torch.zeros(lib.rank, model.get_submodule(name).in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
        out[f"{name}.lora_A"] = A
    return out


def library_dir() -> Path:
    from lorabench.assets.specs import home
    return home() / "adapter-library"


LIBRARY_PATH_ENV = "LORABENCH_LIBRARY_PATH"
MANIFEST = "MANIFEST.json"
# The library committed beside the cross-task records (export_library writes it); searched when
# $LORABENCH_LIBRARY_PATH is unset.
COMMITTED_LIBRARY = Path(__file__).resolve().parent.parent.parent / "results" / "cross-task" / "library"


def library_search_path() -> list[Path]:
    """Read-only folders of library adapters trained elsewhere (another machine's cache, a library committed beside
    the records), searched after the cache ($LORABENCH_HOME/adapter-library) and before anything is trained:
    $LORABENCH_LIBRARY_PATH (folders separated by os.pathsep; set but empty: none), else results/cross-task/library
    where it exists. A file there is named by its adapter id, a hash of everything that defines the adapter
    (adapter_id), so the file found under that name is the adapter this code would train; it is used only after
    its folder's MANIFEST.json (export_library) vouches for its bytes (sha256)."""
    value = os.environ.get(LIBRARY_PATH_ENV)
    if value is None:
        return [COMMITTED_LIBRARY] if COMMITTED_LIBRARY.is_dir() else []
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p]


def verify_exported(path: Path) -> None:
    """Check an adapter found on the search path against its folder's MANIFEST.json; a clear error otherwise
    (a Git LFS pointer, a truncated or edited copy), naming the file and what to do. The cache is not checked:
    this process's own library wrote it."""
    from lorabench.assets.download import sha256_file
    from lorabench.errors import UserError
    manifest_path = path.parent / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"library adapter {path}: its folder has no readable {MANIFEST} ({e}); export a library "
                        f"with `python -m lorabench library export --out DIR`, or set {LIBRARY_PATH_ENV} to "
                        f"folders written by it (empty: search none)") from None
    entry = manifest.get("adapters", {}).get(path.name)
    if entry is None:
        raise UserError(f"library adapter {path} is not listed in {manifest_path}: a file in an exported library "
                        f"must come from `python -m lorabench library export` (which lists it with its sha256)")
    got = sha256_file(path)
    if got != entry["sha256"]:
        raise UserError(f"library adapter {path}: sha256 {got[:16]}... does not match {manifest_path}'s "
                        f"{entry['sha256'][:16]}... ({path.stat().st_size} bytes on disk, {entry['bytes']} exported; "
                        f"a Git LFS pointer or a truncated copy?). Restore the file, or remove it and its entry so "
                        f"that the adapter is trained again")


def locate_adapter(root: Path, name: str) -> Path:
    """Where the library adapter file `name` is: root/name if it exists (the cache, where a new adapter is trained
    to), else its verified copy on library_search_path(), else root/name (not there yet: train it). Only the
    cache is ever written."""
    cached = root / name
    if cached.exists():
        return cached
    for folder in library_search_path():
        if (folder / name).exists():
            verify_exported(folder / name)
            return folder / name
    return cached


def library_entries(folder: Path) -> list[dict]:
    """The adapters in a library folder (a cache or an export): file name, bytes and the training facts each
    stores in its safetensors metadata (`save_library_adapter`: task, model, seed, variant, final loss, ...)."""
    from safetensors import safe_open
    out = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        info = json.loads(meta.get("library", "{}"))
        out.append({"file": path.name, "bytes": path.stat().st_size, "library": info,
                    "config": json.loads(meta.get("config", "{}"))})
    return out


def export_library(out: Path, source: Path | None = None, ids: list[str] | None = None) -> list[str]:
    """Copy library adapters from `source` (default: the cache) into `out`, beside a MANIFEST.json listing each
    file with its sha256, size and training facts, so another machine (or a later session, from a committed
    folder) finds them through library_search_path() instead of training them again. `ids`: the adapter ids
    (file stems) to copy, default every adapter in `source`. Entries already in `out` are kept. Returns the file
    names copied."""
    import shutil

    from lorabench.assets.download import sha256_file
    from lorabench.errors import UserError
    source = source or library_dir()
    entries = {e["file"]: e for e in library_entries(source)} if source.is_dir() else {}
    wanted = sorted(entries) if ids is None else [i if i.endswith(".safetensors") else f"{i}.safetensors" for i in ids]
    missing = [w for w in wanted if w not in entries]
    if missing:
        raise UserError(f"library export: {', '.join(missing)} not in {source} (it holds {len(entries)} adapter(s)"
                        f"{': ' + ', '.join(sorted(entries)) if entries else ''}); nothing was copied")
    if not wanted:
        raise UserError(f"library export: {source} holds no library adapter; nothing was copied")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
    adapters = manifest.setdefault("adapters", {})
    for name in wanted:
        shutil.copyfile(source / name, out / f"{name}.tmp")
        os.replace(out / f"{name}.tmp", out / name)
        adapters[name] = {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size,
                          "library": entries[name]["library"], "config": entries[name]["config"]}
    manifest["format"] = ("lorabench adapter library: <adapter id>.safetensors, a plain lora adapter each "
                          "(lorabench/harness/multitask.py, adapter_id and export_library)")
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    return wanted


def save_library_adapter(path: Path, state: dict[str, torch.Tensor], lib: LibraryConfig, info: dict) -> None:
    """As a plain `lora` adapter (lorabench.methods.base.load_adapter reads it), written atomically."""
    from safetensors.torch import save_file
    config = {"target_modules": lib.target_modules, "rank": lib.rank, "alpha": lib.alpha}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
              metadata={"method": "lora", "config": json.dumps(config), "library": json.dumps(info, sort_keys=True)})
    os.replace(tmp, path)


def load_library_adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def build_library(tasks: list[str], model_name: str, lib: LibraryConfig, train: TrainConfig, seed: int = 0,
                  root: Path | None = None, progress: bool = True) -> dict[str, Path]:
    """The library adapter of each task, trained (fused, in the jobs plan_jobs forms) unless cached."""
    from lorabench import assets
    from lorabench.harness.trial import seed_everything
    from lorabench.tasks import get_task
    root = root or library_dir()
    objs = {t: get_task(t).from_options({}, where=f"task {t}") for t in tasks}
    paths = {t: locate_adapter(root, f"{adapter_id(t, model_name, objs[t].split().hash, lib, train, seed)}.safetensors")
             for t in tasks}
    todo = [t for t in tasks if not paths[t].exists()]
    for group in plan_jobs(todo, {t: objs[t].max_length for t in todo}, train.batch_size, lib):
        seed_everything(seed)
        loaded = assets.load_model(model_name, head="causal-lm", seed=seed)
        fused = FusedLibrary(loaded.model, len(group), lib.rank, lib.alpha, lib.target_modules,
                             init_seeds=[int(paths[t].stem[:8], 16) for t in group])   # from the adapter id
        res = train_fused(fused, [objs[t] for t in group], loaded.tokenizer, train, [seed] * len(group),
                          loaded.tokenizer.pad_token_id)
        for l, t in enumerate(group):
            info = {"task": t, "model": model_name, "seed": seed, "final_loss": res.losses[l][-1],
                    "fused_with": group, "tokens_per_s_job": res.tokens_per_s}
            save_library_adapter(paths[t], fused.adapter_state(l), lib, info)
            if progress:
                print(f"library: {t} trained (final loss {res.losses[l][-1]:.4f}) -> {paths[t]}", flush=True)
    return paths


def build_multitask_adapter(tasks: list[str], model_name: str, lib: LibraryConfig, train: TrainConfig, seed: int = 0,
                            root: Path | None = None, progress: bool = True) -> Path:
    """The multi-task LoRA reference of the cross-task table (issue 17; LoRAHub's upper reference, arXiv 2307.13269
    sec. 4, "multi-task learning" over all tasks): one LoRA on the library's layers, rank and alpha, trained on
    round-robin batches of every task in `tasks` (the held-out task among them: what composing without its data
    is measured against), for len(tasks) x the library's steps at the library's recipe, so each task contributes
    a library adapter's worth of examples. Trained once and cached beside the library, by an id of its own."""
    import dataclasses

    from lorabench import assets
    from lorabench.harness.mixture import MixedTask
    from lorabench.harness.train import train as train_loop
    from lorabench.harness.trial import seed_everything
    from lorabench.methods import get_method
    from lorabench.methods.base import ApplyContext, resolve_targets
    from lorabench.tasks import get_task
    root = root or library_dir()
    objs = [get_task(t).from_options({}, where=f"task {t}") for t in tasks]
    mt = dataclasses.replace(train, steps=train.steps * len(tasks))
    splits = hashlib.sha256("+".join(o.split().hash for o in objs).encode()).hexdigest()[:16]
    path = locate_adapter(root, f"{adapter_id('+'.join(tasks), model_name, splits, lib, mt, seed, variant='multitask')}"
                                ".safetensors")
    if path.exists():
        return path
    seed_everything(seed)
    loaded = assets.load_model(model_name, head="causal-lm", seed=seed)
    ctx = ApplyContext(loaded.model.config.model_type, [])
    layers = resolve_targets(loaded.model, lib.target_modules, ctx)   # the library's layers, exactly
    method = get_method("lora").from_options({"rank": lib.rank, "alpha": lib.alpha, "target_modules": layers})
    model = method.apply(loaded.model, ctx)
    res = train_loop(model, method, MixedTask(objs, with_ids=False), loaded.tokenizer, mt, seed, progress=progress)
    state = {k: v.clone() for k, v in method.adapter_state_dict(model).items()}
    save_library_adapter(path, state, lib, {"tasks": tasks, "model": model_name, "seed": seed, "steps": mt.steps,
                                            "final_loss": res.final_loss, "variant": "multitask"})
    if progress:
        print(f"multi-task reference: {len(tasks)} tasks, {mt.steps} steps (final loss {res.final_loss}) -> {path}",
              flush=True)
    return path


def build_linearized_library(tasks: list[str], model_name: str, lib: LibraryConfig, train: TrainConfig, seed: int = 0,
                             root: Path | None = None, progress: bool = True) -> dict[str, Path]:
    """L-LoRA's library (lorabench/methods/cross_task/l_lora.py): each task's LoRA fine-tuned linearised around one
    initialisation shared by every task (A0 drawn at `seed`, B0 = 0: the paper fine-tunes every task from the same
    init, so that task vectors add), one adapter at a time through the single-task loop (lorabench/harness/train.py;
    the fused SGMV path has no forward-mode rule for the linearisation's jvp), cached by its own id (variant
    "l-lora"), stored as the plain `lora` adapter (A0, B) that computes the linearised modules exactly."""
    from lorabench import assets
    from lorabench.harness.train import train as train_loop
    from lorabench.harness.trial import seed_everything
    from lorabench.methods import get_method
    from lorabench.methods.base import ApplyContext
    from lorabench.methods.cross_task.l_lora import library_state
    from lorabench.tasks import get_task
    root = root or library_dir()
    objs = {t: get_task(t).from_options({}, where=f"task {t}") for t in tasks}
    ids = {t: adapter_id(t, model_name, objs[t].split().hash, lib, train, seed, variant="l-lora") for t in tasks}
    paths = {t: locate_adapter(root, f"{ids[t]}.safetensors") for t in tasks}
    for t in [t for t in tasks if not paths[t].exists()]:
        seed_everything(seed)
        loaded = assets.load_model(model_name, head="causal-lm", seed=seed)
        method = get_method("l-lora").from_options({"rank": lib.rank, "alpha": lib.alpha,
                                                    "target_modules": lib.target_modules})
        torch.manual_seed(seed)   # φ0: the same A0 for every task of the library
        model = method.apply(loaded.model, ApplyContext(loaded.model.config.model_type, [], seed))
        res = train_loop(model, method, objs[t], loaded.tokenizer, train, seed=seed, progress=False)
        info = {"task": t, "model": model_name, "seed": seed, "variant": "l-lora", "final_loss": res.final_loss,
                "train_tokens_per_s": res.train_tokens_per_s, "train_seconds": round(res.train_seconds, 3),
                **res.method_metrics}
        save_library_adapter(paths[t], library_state(method.adapter_state_dict(model)), lib, info)
        if progress:
            print(f"library (linearised): {t} trained (final loss {res.final_loss:.4f}) -> {paths[t]}", flush=True)
    return paths


# ---- throughput: fused against one adapter at a time ------------------------------------------------------

def bench_fused_vs_alone(model_name: str, tasks: list[str], rank: int = 8, batch_size: int = 2, rounds: int = 3,
                         seed: int = 0) -> dict:
    """Training tokens/s of one fused step over len(tasks) adapters against the same batches trained one
    adapter at a time through the single-task path (a `lora` model, F.linear), rounds interleaved; each
    side's median step time over `rounds`. Forward, backward and AdamW step are timed on both sides."""
    from lorabench import assets
    from lorabench.harness.trial import seed_everything
    from lorabench.methods import get_method
    from lorabench.methods.base import ApplyContext
    from lorabench.tasks import get_task
    import copy
    seed_everything(seed)
    loaded = assets.load_model(model_name, head="causal-lm", seed=seed)
    tok = loaded.tokenizer
    objs = [get_task(t).from_options({}, where=f"task {t}") for t in tasks]
    streams = [t.train_batches(tok, batch_size, seed) for t in objs]
    method = get_method("lora").from_options({"rank": rank, "alpha": 2.0 * rank})
    solo = method.apply(copy.deepcopy(loaded.model), ApplyContext(loaded.model.config.model_type, [], seed))
    fused = FusedLibrary(loaded.model, len(tasks), rank, 2.0 * rank)
    opt_fused = torch.optim.AdamW(fused.parameters(), lr=1e-4)
    opt_solo = torch.optim.AdamW([p for _, p in method.trainable_parameters(solo)], lr=1e-4)
    fused.model.train()
    solo.train()

    def fused_step(batches):
        loss = torch.stack(fused.losses(batches, tok.pad_token_id)).sum()
        opt_fused.zero_grad(set_to_none=True)
        loss.backward()
        opt_fused.step()

    def solo_steps(batches):
        for b in batches:   # the adapter's state would be swapped in here; its step is what is timed
            loss = solo(**b).loss
            opt_solo.zero_grad(set_to_none=True)
            loss.backward()
            opt_solo.step()

    fused_s, solo_s, tokens, computed_fused, computed_alone = [], [], [], [], []
    for r in range(rounds + 1):   # round 0 warms up both
        batches = [next(s) for s in streams]
        n = sum(int(b["attention_mask"].sum()) for b in batches)
        computed_fused.append(sum(b["input_ids"].shape[0] for b in batches) * max(b["input_ids"].shape[1] for b in batches))
        computed_alone.append(sum(b["input_ids"].numel() for b in batches))   # positions run, padding included
        first, second = (fused_step, solo_steps) if r % 2 == 0 else (solo_steps, fused_step)
        times = {}
        for f in (first, second):
            t0 = time.perf_counter()
            f(batches)
            times[f] = time.perf_counter() - t0
        if r > 0:
            fused_s.append(times[fused_step])
            solo_s.append(times[solo_steps])
            tokens.append(n)
    fused_tps = statistics.median(n / t for n, t in zip(tokens, fused_s))
    solo_tps = statistics.median(n / t for n, t in zip(tokens, solo_s))
    return {"model": model_name, "tasks": tasks, "rank": rank, "rows_per_adapter": batch_size, "rounds": rounds,
            "threads": torch.get_num_threads(), "fused_tokens_per_s": round(fused_tps, 1),
            "alone_tokens_per_s": round(solo_tps, 1), "ratio": round(fused_tps / solo_tps, 3),
            # padding: the fused batch pads every row to the longest row of all the adapters' batches
            "positions_per_token_fused": round(sum(computed_fused[1:]) / sum(tokens), 3),
            "positions_per_token_alone": round(sum(computed_alone[1:]) / sum(tokens), 3)}
