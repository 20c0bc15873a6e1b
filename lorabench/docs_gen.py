"""Generate docs/methods.md from the method registry and the survey's paper list.

The survey "A Survey on LoRA of Large Language Models" (arXiv 2407.11046) keeps its paper list in
an awesome-list README. `extract` turns that Markdown into `docs/survey-papers.tsv` (section,
title, venue, link: facts only, one row per entry, commented-out examples skipped); `render` joins
that table with the registry: an entry is *implemented* when a registered method cites its arXiv id
(or has its title), otherwise *planned*, or *out of scope* with the reason of its section.

    python -m lorabench.docs_gen                       # rewrite docs/methods.md
    python -m lorabench.docs_gen --check               # exit 1 if docs/methods.md is stale
    python -m lorabench.docs_gen --extract LIST.md     # refresh docs/survey-papers.tsv from the list

tests/test_docs_methods.py checks that the committed docs/methods.md equals `render()`.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAPERS_TSV = ROOT / "docs" / "survey-papers.tsv"
METHODS_MD = ROOT / "docs" / "methods.md"

# Sections whose entries lorabench does not implement, and why (matched on the section path).
OUT_OF_SCOPE = [
    ("Theoretical Analysis", "analysis of LoRA, not a method to run"),
    ("Parallel LoRA Computing Frameworks", "a multi-GPU training/serving system; lorabench implements the kernels "
                                           "such systems use (BGMV/SGMV), not the systems"),
    ("Vision Tasks", "vision models and image data are not available from the registries lorabench can reach"),
    ("Multimodal Tasks", "multimodal models and data are not available from the registries lorabench can reach"),
    ("Applications of LoRA", "an application of LoRA to a domain, not a new adaptation method"),
]

# Entries not implemented yet and what each needs, shown as the reason of its "planned" row (title prefix -> reason;
# none at present: the last, MLoRE, is implemented on the text pool).
PLANNED_NOTES: dict[str, str] = {}

# Implemented entries whose paper has more than lorabench builds: what is not built, shown beside the method.
IMPLEMENTED_NOTES = {
    # mixtures of LoRA experts (issue 17) built here, and where they differ from their papers
    "X-LoRA": "its experts are trained in the same run, one per training task (first stage), then frozen while the "
              "scaling head trains (the paper loads experts fine-tuned beforehand; loading them from the adapter "
              "library is not built)",
    "MixLoRA: Multimodal": "the factor selection runs on the text pool (the paper: LLaVA on Vision-Flan); the selected "
                           "factors are weighted by their renormalised probabilities by default (the released script "
                           "selects hard, `scored=false` here); not the top-k experts of `mixlora` (Li et al.)",
    "MoCLE": "an example's embedding is the mean of the model's own frozen input embeddings over the whole sequence "
             "(the paper: all-MiniLM-L6-v2 of the instruction text; not built); the routed expert enters with weight "
             "w² as in the released code",
    "Effective and parameter-efficient reusing": (
        "run by the reuse protocol (lorabench/harness/reuse.py, suites/reuse.yaml): the merged model by task "
        "arithmetic at a fixed λ (the paper: chosen on validation data) plus each task's own update cut to rank q; "
        "the single-task compression alone is `byom-lora`"),
    "MLoRE": "a vision paper (multi-task dense prediction, arXiv 2403.17749) implemented on the text pool and run by "
             "protocol (b): carried over are its task-sharing generic path (here W0 plus a shared low-rank path, its "
             "input detached as in the released code), routed linear low-rank experts of different ranks chosen by "
             "each task's own noisy top-k router from the example's pooled input, a task-specific low-rank expert per "
             "task scaled by its router, the CV² load-balancing loss, and the per-example re-parameterisation of all "
             "paths into one linear (measured: `reparam_max_abs_diff`); not carried over: the convolutions' spatial "
             "kernels, the BatchNorms, GELU and output projection around the module, the router's own small network "
             "(a linear map here), the per-task projection of the backbone feature, and the dense-prediction tasks",
    "MoRAL": "top-2 LoRA experts in the feed-forward layers on the shared mixture layer, run by protocol (b) "
             "(`moral`) and, trained task after task, by the sequence scenario (`moral-cl`); not built: its "
             "lifelong-learning protocol (5L-bench: QA pairs from recent arXiv papers scored closed-book and "
             "open-book, forgetting on HotpotQA), whose data no reachable registry carries",
    "L-LoRA": "each LoRA module linearised around its init by torch.func.jvp, as the released code; at LoRA's B0 = 0 "
              "the Jacobian in A vanishes, so only B is fine-tuned (A stays at the init all tasks share) and the "
              "task-arithmetic merge is the exact sum of the updates; λ by k-shot loss in the leave-one-task-out "
              "protocol (the paper: validation data); its library is trained one adapter at a time, not fused",
    "Fast LoRA": "an example's adapter is its task's (protocol (b)); throughput against BGMV and a loop over adapters: "
                 "lorabench/bench/fast_lora.py, docs/cross-task.md",
    "FedMS": "not built: separate foundation models as experts (here each expert is the one backbone with its own "
             "LoRA), a gate that is itself a foundation model with a gate adapter (here a linear map of the mean "
             "token embedding), and the sparsely activated LoRA (SAL) that switches LoRA on in more blocks as "
             "training goes on",
    "A fast, performant, secure distributed training framework": (
        "its LoRA part: one-time-pad encryption of every adapter message, aggregation as FedIT's; not built: the "
        "trusted execution environments (attestation, key exchange) and its split fine-tuning with SPF"),
    "PrivateLoRA": "measured, not built: the split computation itself (cloud and device as two machines); the trial "
                   "records the activations per token the split would send",
    "pFedLoRA": "model heterogeneity as the clients' local adapters of different ranks on one backbone (the paper's "
                "clients run heterogeneous model architectures; its experiments are on CIFAR-10/100)",
}

ENTRY = re.compile(r"^\s*\d+\.\s+\*\*(?P<title>.+?)\*\*\s*(?:`(?P<venue>[^`]*)`)?")
LINK = re.compile(r"\[\[PDF\]\((?P<url>[^)]+)\)\]")
ARXIV = re.compile(r"(\d{4}\.\d{4,5})")


def extract(list_md: str) -> list[dict]:
    """Entries of the awesome list: section path, title, venue, PDF link (HTML comments skipped)."""
    text = re.sub(r"<!--.*?-->", "", list_md, flags=re.S)
    lines = text.splitlines()
    heads: dict[int, str] = {}
    rows = []
    started = False
    for i, line in enumerate(lines):
        h = re.match(r"^(#{2,4})\s+(.*)$", line)
        if h:
            level = len(h.group(1))
            name = re.sub(r"<img[^>]*>", "", h.group(2)).strip()
            if name in ("Contribution", "Citations"):
                started = False
                continue
            if level == 2:
                started = name not in ("LoRA of LLMs", "Contents")
            heads = {k: v for k, v in heads.items() if k < level}
            heads[level] = name
            continue
        m = ENTRY.match(line)
        if not (started and m):
            continue
        nxt = " ".join(lines[i:i + 3])
        link = LINK.search(nxt)
        rows.append({"section": " / ".join(heads[k] for k in sorted(heads)),
                     "title": m.group("title").strip().rstrip("."),
                     "venue": (m.group("venue") or "").strip(),
                     "url": link.group("url") if link else ""})
    return rows


def read_papers(path: Path = PAPERS_TSV) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def write_papers(rows: list[dict], path: Path = PAPERS_TSV) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["section", "title", "venue", "url"], delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _norm(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", title.lower()).strip()


def registered_methods() -> list:
    from lorabench.methods import METHODS, get_method
    return [get_method(n) for n in sorted(METHODS.names())]


def status_of(row: dict, by_arxiv: dict, by_title: dict) -> tuple[str, list]:
    m = ARXIV.search(row["url"]) if "arxiv" in row["url"] else None
    hits = by_arxiv.get(m.group(1), []) if m else []
    if not m:  # no arXiv link in the list: match the title, or its short name before the colon ...
        hits = by_title.get(_norm(row["title"]), []) or by_title.get(_norm(row["title"].split(":")[0]), [])
        # ... and every method that cites the paper a matched one cites (moral and moral-cl: one paper, two scenarios)
        hits = [c for h in hits for c in ([h] + by_arxiv.get(h.paper, []) if h.paper else [h])]
    if hits:
        return "implemented", list(dict.fromkeys(hits))  # a title without a colon is indexed twice
    for key, reason in OUT_OF_SCOPE:
        if key in row["section"]:
            return "out of scope", reason
    for key, note in PLANNED_NOTES.items():
        if row["title"].startswith(key):
            return "planned", note
    return "planned", ""


def render() -> str:
    from lorabench.config import fields_help
    from lorabench.methods.base import FAMILIES
    methods = [c for c in registered_methods()]
    by_arxiv: dict[str, list] = {}
    by_title: dict[str, list] = {}
    for c in methods:
        if c.paper:
            by_arxiv.setdefault(c.paper, []).append(c)
        by_title.setdefault(_norm(c.title.split(":")[0]), []).append(c)
        by_title.setdefault(_norm(c.title), []).append(c)
    papers = read_papers()
    counts: dict[str, int] = {}
    out = ["# Methods", "",
           "<!-- generated by `python -m lorabench.docs_gen` from the method registry and docs/survey-papers.tsv;"
           " do not edit by hand -->", "",
           "Every method registered in lorabench, then every entry of the paper list of the survey "
           "\"A Survey on LoRA of Large Language Models\" (arXiv 2407.11046) with its status. Each method's code is "
           "one file, `lorabench/methods/<family>/<name>.py`, in the folder of its survey family (the *code* "
           "column; docs/architecture.md, \"Where things live\").", "",
           "Every method that is more than LoRA with a static change (init, scaling, forward) declares its "
           "*mechanism metrics* (`Method.mechanism_metrics`): the quantities, recorded in each trial's "
           "`method_metrics`, that show its defining mechanism acting in the run (ReLoRA's restarts, SoRA's "
           "ranks, LoRA-drop's kept layers, ...). `tests/methods/test_behaviour.py` trains every method on a "
           "tiny model through the real training loop and checks that the mechanism fires (also at 10 steps), "
           "that the declared metrics are recorded, and that the outputs differ from plain LoRA's "
           "(docs/adding-a-method.md, step 5).", "",
           "## Registered methods", "",
           "| name | method | paper | survey family | code | mergeable | default lr |",
           "|---|---|---|---|---|---|---|"]
    for c in methods:
        paper = f"[{c.paper}](https://arxiv.org/abs/{c.paper})" if c.paper else "-"
        # the method's one home, lorabench/methods/<family>/<name>.py (docs/architecture.md)
        home = c.__module__.removeprefix("lorabench.methods.").replace(".", "/") + ".py"
        out.append(f"| `{c.name}` | {c.title} | {paper} | {FAMILIES.get(c.family, c.family)} | "
                   f"[{home}](../lorabench/methods/{home}) | {'yes' if c.mergeable else 'no'} | {c.default_lr:g} |")
    out += ["", "### Mechanism metrics", "",
            "| name | metric in `method_metrics` | meaning |", "|---|---|---|"]
    for c in methods:
        for k, meaning in c.mechanism_metrics.items():
            out.append(f"| `{c.name}` | `{k}` | {meaning.replace('|', '/')} |")
    static = [c.name for c in methods if not c.mechanism_metrics]
    out += ["", "Methods with nothing that acts during training record no mechanism metrics: their difference "
            "from LoRA lies in the initialisation, the scaling, the forward pass or the parameters trained, "
            "and tests/methods/test_behaviour.py checks that their trained outputs differ from LoRA's at the "
            "same seed (only `lora` itself may equal them): "
            + ", ".join(f"`{n}`" for n in static) + "."]
    out += ["", "### Options", ""]
    for c in methods:
        out += [f"#### `{c.name}`", ""]
        rows = fields_help(c.config_cls)
        if not rows:
            out += ["No options.", ""]
            continue
        out += ["| option | type | default | help |", "|---|---|---|---|"]
        for name, tp, default, help_ in rows:
            out.append(f"| `{name}` | {tp.replace('|', 'or')} | `{default!r}` | {help_.replace('|', '/')} |")
        out.append("")
    out += ["## The survey's paper list", ""]
    table, listed = [], set()
    for row in papers:
        status, note = status_of(row, by_arxiv, by_title)
        if status == "implemented":
            listed |= {c.name for c in note}
            note = ", ".join(f"`{c.name}`" for c in note)
            note += "".join(f"; {extra}" for key, extra in IMPLEMENTED_NOTES.items() if row["title"].startswith(key))
        counts[status] = counts.get(status, 0) + 1
        link = f"[{row['title']}]({row['url']})" if row["url"] else row["title"]
        table.append(f"| {row['section']} | {link} | {row['venue']} | {status} | {note} |")
    out.append(", ".join(f"{k}: {counts.get(k, 0)}" for k in ("implemented", "planned", "out of scope"))
               + f" (of {len(papers)} entries).")
    out += ["", "| section | paper | venue | status | methods / reason |", "|---|---|---|---|---|"] + table
    extra = [c for c in methods if c.paper and c.name not in listed]
    if extra:
        out += ["", "## Implemented methods beyond the survey's list", "",
                "| name | paper |", "|---|---|"]
        out += [f"| `{c.name}` | [{c.paper}](https://arxiv.org/abs/{c.paper}) {c.title} |" for c in extra]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lorabench.docs_gen", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/methods.md differs from the generated text")
    ap.add_argument("--extract", metavar="LIST_MD", help="refresh docs/survey-papers.tsv from the survey's list")
    args = ap.parse_args(argv)
    if args.extract:
        rows = extract(Path(args.extract).read_text(encoding="utf-8"))
        write_papers(rows)
        print(f"wrote {len(rows)} entries to {PAPERS_TSV}")
    text = render()
    if args.check:
        same = METHODS_MD.exists() and METHODS_MD.read_text(encoding="utf-8") == text
        if not same:
            print(f"{METHODS_MD} is stale: run `python -m lorabench.docs_gen`", file=sys.stderr)
        return 0 if same else 1
    METHODS_MD.write_text(text, encoding="utf-8")
    print(f"wrote {METHODS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
