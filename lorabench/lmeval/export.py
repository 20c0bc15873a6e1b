"""Export lorabench's decoder tasks as lm-eval task YAML over local JSONL (no hub, no network).

`export_task(task, out_dir)` writes `out_dir/<task>/{test,train}.jsonl` and
`out_dir/<task>/lorabench_<task>.yaml` (`dataset_path: json`, `dataset_kwargs.data_files` with
absolute paths, because `datasets` resolves relative ones against the working directory, not the
YAML: move the folder and export again). The YAML reproduces lorabench's own evaluation:

- quartz, socialiqa and the cross-task pool's tasks (`multiple_choice`): the eval split, prompt `Question: ...\nAnswer:`, options
  scored as " " + option (lm-eval's default `target_delimiter`). `acc` is lorabench's `accuracy`.
  lm-eval's `acc_norm` divides by the option's length in characters without the space, lorabench's
  `accuracy_norm` by its length in UTF-8 bytes with the space: the two may differ on a few questions.
- arith (`generate_until`): greedy, stop at a newline, at most `Arith.max_new_tokens` tokens, the
  first integer of the answer (regex filter) compared exactly, as `Arith.evaluate`.
- shakespeare-lm (`loglikelihood_rolling`): one document per evaluation window (the same
  `n_eval` windows of `max_length` tokens, decoded to text with the exporting tokenizer);
  lm-eval's word/byte perplexity and bits per byte. See docs/lm-eval.md for how its token
  perplexity relates to lorabench's.

Encoder classification tasks (rt-sentiment, sarcasm) are scored by a trained classification
head, not by a prompt: they have no lm-eval equivalent and are refused with that reason.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from lorabench.errors import UserError

TASK_PREFIX = "lorabench_"  # lm-eval task name = prefix + lorabench name (no clash with lm-eval's own)
FORMAT_VERSION = 1          # lm-eval `metadata.version` of every exported task


def lm_eval_name(task_name: str) -> str:
    return TASK_PREFIX + task_name.replace("-", "_")


def decoder_task_names() -> list[str]:
    from lorabench.tasks import TASKS
    return [n for n, cls in TASKS.items() if cls.head == "causal-lm"]


def get_decoder_task(name: str, options: dict | None = None):
    """The lorabench task instance, or a UserError naming the exportable tasks."""
    from lorabench.tasks import TASKS
    valid = ", ".join(decoder_task_names())
    if name not in TASKS:
        raise UserError(f"{TASKS.unknown_message(name)} Tasks with an lm-eval export: {valid}")
    cls = TASKS.get(name)
    if cls.head != "causal-lm":
        raise UserError(f"task {name!r} is a {cls.kind} task scored by a trained {cls.head} head, which lm-eval "
                        f"cannot run; tasks with an lm-eval export: {valid}")
    return cls.from_options(options, where=f"task {name}")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def task_config(task, files: dict[str, Path]) -> dict:
    """The lm-eval task config (a YAML mapping) for a lorabench task whose splits are in `files`."""
    split = task.split()
    cfg: dict = {
        "task": lm_eval_name(task.name),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {k: str(p.resolve()) for k, p in files.items()}},
        "test_split": "test",
    }
    if "train" in files:
        cfg |= {"training_split": "train", "fewshot_split": "train"}
    if task.kind == "multiple-choice":
        cfg |= {
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",   # MultipleChoiceTask.prompt
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "label",
            "target_delimiter": " ",                              # MultipleChoiceTask.option_text
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")],
        }
    elif task.kind == "generation":
        cfg |= {
            "output_type": "generate_until",
            "doc_to_text": "Question: {{question}}\nAnswer:",   # Arith.prompt
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": task.max_new_tokens, "do_sample": False},
            "filter_list": [{"name": "first-integer",          # lorabench.tasks.generation.first_number
                             "filter": [{"function": "regex", "regex_pattern": r"-?\d+"},
                                        {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        }
    elif task.kind == "perplexity":
        cfg |= {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        }
    else:
        raise AssertionError(f"no lm-eval export for task kind {task.kind!r}")
    cfg["metadata"] = {"version": FORMAT_VERSION, "lorabench_task": task.name, "split_hash": split.hash,
                       "task_options": {k: v for k, v in vars(task.config).items() if v is not None}}
    return cfg


def export_task(task, out_dir: str | Path, tokenizer=None) -> Path:
    """Write one task's JSONL splits and YAML under out_dir/<task name>/; returns the YAML path.

    tokenizer: only the perplexity task needs one (its windows are tokens); default the task's
    default model's tokenizer.
    """
    folder = Path(out_dir) / task.name
    folder.mkdir(parents=True, exist_ok=True)
    split = task.split()
    files = {"test": folder / "test.jsonl"}
    if task.kind == "perplexity":
        if tokenizer is None:
            from lorabench import assets
            tokenizer = assets.load_tokenizer(task.default_model)
        windows = task.windows(split.eval, tokenizer, task.config.n_eval or task.default_eval_windows)
        _write_jsonl(files["test"], [{"text": tokenizer.decode(w)} for w in windows])
    else:
        files["train"] = folder / "train.jsonl"
        _write_jsonl(files["test"], split.eval)
        _write_jsonl(files["train"], split.train)
    path = folder / f"{lm_eval_name(task.name)}.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(f"# Exported by `python -m lorabench export lm-eval-tasks`; lorabench task {task.name!r}.\n"
                   + yaml.safe_dump(task_config(task, files), sort_keys=False, allow_unicode=True),
                   encoding="utf-8")
    tmp.replace(path)
    return path


def export_tasks(names: list[str] | None, out_dir: str | Path, tokenizer=None,
                 options: dict | None = None) -> dict[str, Path]:
    """Export the named decoder tasks (default: all of them); returns {lorabench name: YAML path}."""
    names = names or decoder_task_names()
    tasks = [get_decoder_task(n, options) for n in names]  # every name checked before anything is written
    return {t.name: export_task(t, out_dir, tokenizer) for t in tasks}
