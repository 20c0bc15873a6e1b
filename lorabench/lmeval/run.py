"""Run lm-evaluation-harness offline on a `LorabenchLM`: the `eval` command and the suite option.

Task names are lorabench decoder tasks (exported on the fly to a temporary folder, or read from
a folder written by `python -m lorabench export lm-eval-tasks DIR`, given as `tasks_dir`) or
lm-eval task names defined in that folder. lm-eval's own task catalogue (which would download
from the hub, and takes ~40 s to index) is never loaded: `TaskManager(include_defaults=False)`.
"""
from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path

from lorabench.errors import UserError
from lorabench.lmeval.export import decoder_task_names, export_tasks, get_decoder_task, lm_eval_name

OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
BOOTSTRAP_ITERS = 1000  # stderr of the perplexities by bootstrap; lm-eval's 100,000 takes minutes on 2 cores


def go_offline() -> None:
    """Tell `datasets` and `huggingface_hub` not to reach the hub (set before lm-eval imports them)."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


def _data_files(cfg: dict) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or []
    if isinstance(files, dict):
        files = list(files.values())
    if isinstance(files, str):
        files = [files]
    out = []
    for f in files:
        out.extend([f] if isinstance(f, str) else list(f))
    return out


def resolve_tasks(names: list[str], task_manager, tasks_dir: Path | None) -> list[str]:
    """lm-eval task names for `names`, with one clear error for an unknown name or a missing data file."""
    known = set(task_manager.all_tasks)
    out = []
    for name in names:
        lm_name = lm_eval_name(name) if lm_eval_name(name) in known else name
        if lm_name not in known:
            valid = sorted(set(decoder_task_names()) | known)
            close = difflib.get_close_matches(name, valid, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            where = (f"a task defined in {tasks_dir} ({', '.join(sorted(known)) or 'none'})" if tasks_dir
                     else "an lm-eval task in a folder given with --tasks-dir")
            raise UserError(f"unknown lm-eval task {name!r}.{hint} Valid: lorabench tasks "
                            f"{', '.join(decoder_task_names())}, or {where}. lm-eval's own catalogue is not "
                            f"loaded: its tasks download from the hub; put them on local JSONL first.")
        entry = task_manager.task_index[lm_name]
        for f in _data_files(entry.cfg or {}):
            if "://" not in f and not any(c in f for c in "*?[") and not Path(f).exists():
                raise UserError(f"task {name!r} ({entry.yaml_path}) reads {f}, which does not exist; "
                                f"export the tasks again: python -m lorabench export lm-eval-tasks {tasks_dir}")
        out.append(lm_name)
    return out


def evaluate(lm, names: list[str], tasks_dir: str | Path | None = None, task_options: dict | None = None,
             limit: int | None = None, num_fewshot: int | None = None, apply_chat_template: bool = False,
             tokenizer=None) -> dict:
    """`lm_eval.simple_evaluate` of `lm` on `names`, offline; returns lm-eval's results dict.

    tasks_dir None: the lorabench tasks among `names` are exported (with `task_options`, and
    `tokenizer` for the perplexity windows) to a temporary folder. Otherwise the tasks are read
    from `tasks_dir` as they are.
    """
    go_offline()
    check_names(names, tasks_dir, task_options)
    if tasks_dir is not None:
        return _evaluate_in(lm, names, Path(tasks_dir), limit, num_fewshot, apply_chat_template)
    ours = [n for n in names if n in decoder_task_names()]
    with tempfile.TemporaryDirectory(prefix="lorabench-lm-eval-") as d:
        export_tasks(ours, d, tokenizer=tokenizer, options=task_options)
        return _evaluate_in(lm, names, Path(d), limit, num_fewshot, apply_chat_template)


def check_names(names: list[str], tasks_dir: str | Path | None, task_options: dict | None = None) -> None:
    """Every name is a lorabench decoder task (with valid options) or, with tasks_dir, a task defined there."""
    from lorabench.tasks import TASKS
    if not names:
        raise UserError(f"no tasks given; lorabench tasks with an lm-eval export: {', '.join(decoder_task_names())}")
    for n in names:
        if n in TASKS:
            get_decoder_task(n, task_options)
    if tasks_dir is None:
        tm = _EmptyIndex()
    else:
        if not Path(tasks_dir).is_dir():
            raise UserError(f"tasks folder {tasks_dir} does not exist; write it with "
                            f"python -m lorabench export lm-eval-tasks {tasks_dir}")
        from lm_eval.tasks import TaskManager
        tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        resolve_tasks(unknown, tm, tasks_dir)


class _EmptyIndex:
    """What `resolve_tasks` sees when no tasks folder is given: no lm-eval tasks beyond lorabench's."""
    all_tasks: list[str] = []
    task_index: dict = {}


def _evaluate_in(lm, names, tasks_dir: Path, limit, num_fewshot, apply_chat_template) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    tasks = resolve_tasks(names, tm, tasks_dir)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                                      apply_chat_template=apply_chat_template, log_samples=False,
                                      bootstrap_iters=BOOTSTRAP_ITERS, batch_size=lm.batch_size)
    if results is None:  # only on a non-zero rank of a distributed run, which this never is
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return results


def summary(results: dict) -> dict:
    """The part of lm-eval's results that goes into a lorabench record (JSON-safe, no samples)."""
    import lm_eval

    metrics = {}
    for task, row in results["results"].items():
        metrics[task] = {k: (None if v == "N/A" else v) for k, v in row.items() if k != "alias"}
    return {"results": metrics, "versions": results.get("versions", {}), "n-shot": results.get("n-shot", {}),
            "higher_is_better": results.get("higher_is_better", {}), "lm_eval_version": lm_eval.__version__,
            "config": {k: results.get("config", {}).get(k) for k in ("limit", "bootstrap_iters", "batch_size")}}


def score_in_trial(model, tokenizer, task, batch_size: int) -> dict:
    """The suite option `lm_eval: true`: score a trained trial's model on its own task through lm-eval."""
    from lorabench.lmeval.model import LorabenchLM

    # Multiple choice and generation truncate like the task; perplexity documents are whole windows
    # re-tokenised from text, which may come out a few tokens longer: the model's own context then.
    max_length = None if task.kind == "perplexity" else task.max_length
    lm = LorabenchLM(model=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    go_offline()
    with tempfile.TemporaryDirectory(prefix="lorabench-lm-eval-") as d:
        from lorabench.lmeval.export import export_task
        export_task(task, d, tokenizer=tokenizer)  # the trial's own split and options
        return summary(_evaluate_in(lm, [task.name], Path(d), None, None, False))


def eval_command(names: list[str], model: str, adapter: str | None = None, tasks_dir: str | None = None,
                 task_options: dict | None = None, batch_size: int = 16, limit: int | None = None,
                 num_fewshot: int | None = None, apply_chat_template: bool = False, max_length: int | None = None,
                 output: str | None = None) -> int:
    """`python -m lorabench eval --lm-eval TASKS --model ASSET [--adapter PATH]`: prints lm-eval's table."""
    import json
    import time

    from lm_eval.utils import make_table

    from lorabench.lmeval.model import LorabenchLM, load_for_eval

    names = [n.strip() for n in names if n.strip()]
    check_names(names, tasks_dir, task_options)  # before the model is loaded: a typo fails in a second
    if adapter is not None and not Path(adapter).is_file():
        raise UserError(f"adapter file {adapter} does not exist")
    t0 = time.perf_counter()
    lm_model, tokenizer = load_for_eval(model, adapter)
    lm = LorabenchLM(model=lm_model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                     name=model + (f"+{adapter}" if adapter else ""))
    if apply_chat_template:
        try:
            lm.chat_template(True)
        except ValueError as e:
            raise UserError(str(e)) from None
    results = evaluate(lm, names, tasks_dir=tasks_dir, task_options=task_options, limit=limit,
                       num_fewshot=num_fewshot, apply_chat_template=apply_chat_template, tokenizer=tokenizer)
    print(f"lorabench (model={model}, adapter={adapter or 'none'}, batch_size={batch_size}, "
          f"chat_template={apply_chat_template}), lm-eval {summary(results)['lm_eval_version']}, "
          f"limit: {limit}, num_fewshot: {num_fewshot or 0}, {time.perf_counter() - t0:.1f} s")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if output:
        Path(output).write_text(json.dumps(summary(results), indent=2, default=str))
    return 0
