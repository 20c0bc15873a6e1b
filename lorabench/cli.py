"""Command line: `python -m lorabench {run,list,assets,env,bench,report,eval,export} ...`."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from lorabench.errors import UserError

# The shipped suite files: lorabench.runner.suite.SUITES_DIR, which `list suites` reads without
# importing that module (it imports torch); a test checks that both name the same folder.
SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"


def cmd_run(args) -> int:
    from lorabench.runner.suite import load_suite
    if args.backend != "ray":
        for flag, value in (("--address", args.address), ("--retries", args.retries)):
            if value is not None:
                raise UserError(f"{flag} is an option of --backend ray (trials as Ray tasks on a cluster: "
                                f"docs/scale.md); the local backend runs trials on this machine")
    elif args.jobs is not None:
        raise UserError("--jobs sets the trials run at once on this machine (the local backend); with --backend ray "
                        "the cluster runs as many as its CPUs hold, each trial taking its train.threads CPUs (else 1)")
    if args.records:
        check_records_path(Path(args.records), "--records")
    suite = load_suite(args.suite, args.overrides)  # validates everything before any trial runs
    records_path = Path(args.records or Path("runs") / suite.name / "records.jsonl")
    check_records_path(records_path, "--records")
    # imported after the input is checked: pandas and the trial machinery take seconds to import
    from lorabench.report.leaderboard import render
    from lorabench.runner.records import read_records
    from lorabench.runner.run import run_suite

    class Stopped(KeyboardInterrupt):
        """SIGTERM or SIGHUP (`kill`, a closed terminal): stopped as Ctrl-C stops a run, so the trials
        running in their own processes are killed too, not left training as orphans."""

    def stop(signum, frame):
        raise Stopped(signum)
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if args.backend == "ray":
            with ray_backend(args.address, args.retries) as backend:
                ids = run_suite(suite, records_path, args.overrides, timeout_s=args.timeout, backend=backend)
        else:
            ids = run_suite(suite, records_path, args.overrides, timeout_s=args.timeout,
                            progress=not args.no_progress, jobs=args.jobs)
    except KeyboardInterrupt as e:
        from lorabench.runner.suite import trial_id
        # With a tuned grid the other seeds' (or tasks') trials exist once their tuning trials are recorded:
        # count against the trials the records define now, out of all the suite (selection) runs
        recs = read_records(records_path, warn=False)
        have = {r.get("trial_id") for r in recs} & {trial_id(t) for t in suite.trials(recs)}
        how = f"stopped by {signal.Signals(e.args[0]).name}" if isinstance(e, Stopped) else "interrupted"
        print(f"\n{how}: {len(have)} of {suite.size()} trials of suite {suite.name} are recorded in "
              f"{records_path} (the trial that was running is not); run the same command again to resume",
              file=sys.stderr)
        return 128 + e.args[0] if isinstance(e, Stopped) else 130
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    wanted = set(ids)
    latest = {}
    for r in read_records(records_path):
        if r.get("trial_id") in wanted:
            latest[r["trial_id"]] = r
    print()
    print(f"Leaderboard: suite {suite.name} (records: {records_path})")
    print(render(list(latest.values())))
    return 0 if all(r.get("status") == "ok" for r in latest.values()) else 1


def ray_backend(address: str | None, retries: int | None):
    """The Ray backend (lorabench/runner/ray_backend.py), or an error saying how to install Ray."""
    try:
        from lorabench.runner.ray_backend import RETRIES, RayBackend
    except ImportError as e:
        raise UserError(f"--backend ray needs Ray ({e}): install it with `pip install -e '.[ray]'` "
                        f"(ray[default]==2.55.1, the Ray of flwr[simulation])") from None
    return RayBackend(address, RETRIES if retries is None else retries)


def check_records_path(path: Path, flag: str) -> None:
    """A records path must be a file (or not exist yet): a folder would fail later with a traceback."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give the records file, e.g. {path / 'records.jsonl'}")


def suite_size(s: dict) -> int:
    """Trials a suite file defines, read from its YAML alone (Suite.size() without importing torch): one per
    task x method x seed, times the learning-rate grid, whose tuning seeds (on the tuning task alone, with
    tune_task) run every rate, and times the partitions of the clients scenario (`federated:`; a task's own list
    replaces the suite's for it); a continual
    suite: one per method x order x seed; a mixture suite (the cross-task protocol (b)): one per method x split x
    seed; a reuse suite (the cross-task reuse protocol): one per method x seed."""
    if s.get("reuse") is not None:
        seeds = s.get("seeds", [0])
        return len(s["methods"]) * len(seeds if isinstance(seeds, list) else [seeds])
    if s.get("mixture") is not None:
        seeds = s.get("seeds", [0])
        return len(s.get("splits") or {}) * len(s["methods"]) * len(seeds if isinstance(seeds, list) else [seeds])
    if s.get("continual") is not None:
        seeds = s.get("seeds", [0])
        return len(s.get("orders") or {}) * len(s["methods"]) * len(seeds if isinstance(seeds, list) else [seeds])
    if s.get("federated") is not None:  # a task's own partitions replace the suite's for it
        parts = s.get("partitions") or ["iid"]
        n_seeds = len(s.get("seeds", [0]) if isinstance(s.get("seeds", [0]), list) else [0])
        return sum(len((t.get("partitions") if isinstance(t, dict) else None) or parts)
                   for t in s["tasks"]) * len(s["methods"]) * n_seeds
    seeds = s.get("seeds", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    tune = s.get("tune_seeds")
    n = 0
    for t in s["tasks"]:
        own = t.get("seeds") if isinstance(t, dict) else None   # a task's own subset of the seeds
        own = None if own is None else (own if isinstance(own, list) else [own])
        task_seeds = [x for x in seeds if own is None or x in own]
        for m in s["methods"]:
            grid = (m.get("lr_grid") if isinstance(m, dict) else None) or (
                t.get("lr_grid") if isinstance(t, dict) else None) or s.get("lr_grid") or [1]
            name = t.get("name") if isinstance(t, dict) else t
            if len(grid) > 1 and s.get("tune_task") is not None and name != s["tune_task"]:
                n += len(task_seeds)   # the grid runs on the tuning task only: one trial per seed here
            elif len(grid) > 1 and tune:
                n += len(grid) * len(tune) + len([x for x in task_seeds if x not in tune])
            else:
                n += len(grid) * len(task_seeds)
    return n


def cmd_list(args) -> int:
    # Answers from the registries' call-site facts and the suite files' YAML, importing no method,
    # task or torch: `list` is a newcomer's first command and must answer at once (issue 22).
    if args.what == "methods":
        from lorabench.methods import METHODS
        for name in METHODS:
            m = METHODS.meta(name)
            paper = f"arXiv {m['paper']}" if m["paper"] else "baseline"
            print(f"{name:16s} {m['family']:28s} {paper:18s} {m['title']}")
    elif args.what == "tasks":
        from lorabench.tasks import TASKS
        for name in TASKS:
            t = TASKS.meta(name)
            arrow = "↑" if t["higher_is_better"] else "↓"
            print(f"{name:16s} {t['kind']:16s} {t['metric'] + ' ' + arrow:16s} {t['default_model']:14s} {t['sizes']}")
    elif args.what == "suites":
        import yaml
        for p in sorted(SUITES_DIR.glob("*.yaml")):
            try:
                s = yaml.safe_load(p.read_text(encoding="utf-8"))
                n = suite_size(s)
                print(f"{p.stem:12s} v{s['version']}  {n:4d} trials  {s.get('description', '')}")
            except (yaml.YAMLError, KeyError, TypeError, AttributeError):
                print(f"{p.stem:12s} (not a valid suite file: `python -m lorabench run {p.stem}` says why)")
    elif args.what == "assets":
        return cmd_assets(argparse.Namespace(action="list", names=[]))
    return 0


def cmd_assets(args) -> int:
    from lorabench import assets
    if args.action == "list":
        print(f"{'name':16s} {'kind':8s} {'package':28s} {'size':>9s} {'cached':6s}  description")
        for row in assets.list_assets():
            print(f"{row['name']:16s} {row['kind']:8s} {row['package'] or '-':28s} {row['size'] or '-':>9s} "
                  f"{row['cached']!s:6s}  {row['description']}")
        return 0
    if not args.names:
        raise UserError(f"assets fetch needs asset names; valid: {', '.join(sorted(assets.ASSETS))}")
    for name in args.names:
        if name not in assets.ASSETS:
            raise UserError(f"unknown asset {name!r}; valid: {', '.join(sorted(assets.ASSETS))}")
    for name in args.names:
        if assets.ASSETS[name].package is None:
            print(f"{name}: built locally, nothing to fetch")
            continue
        print(f"{name}: {assets.fetch(name)}")
    return 0


def cmd_env(args) -> int:
    import torch

    from lorabench.measure.provenance import environment
    from lorabench.ops import available_backends
    env = environment()
    print(f"lorabench {env['versions'].get('lorabench', '?')} (git {env['git_commit']})")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print(f"cpu: {env['cpu']}, torch threads: {torch.get_num_threads()}")
    print(f"gpu: {env['gpu'] or 'none'}")
    import os
    load, cores = os.getloadavg(), os.cpu_count()
    state = "busy: timings taken now carry other work's contention" if load[0] > cores - 0.5 else "idle enough to time"
    print(f"load: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15-minute averages) on {cores} cores; {state}")
    print("kernel backends:")
    for name, (ok, why) in available_backends().items():
        print(f"  {name:10s} {'available' if ok else 'unavailable':12s} {why}")
    return 0


def cmd_bench(args) -> int:
    if args.what == "kernels":
        from lorabench.bench.kernels import main
    elif args.what == "serving":
        from lorabench.bench.serving import main
    elif args.what == "threads":
        from lorabench.bench.threads import main
    else:  # argparse restricts choices
        raise UserError(f"unknown benchmark {args.what!r}")
    return main(args.rest)


def cmd_report(args) -> int:
    """Markdown/CSV/HTML/PNG report from records files (lorabench/report/build.py); without --out, the
    Markdown report is printed."""
    import tempfile

    from lorabench.runner.records import read_records
    for p in args.records:  # before importing pandas and matplotlib (seconds): a wrong path answers at once
        check_records_path(Path(p), "records")
        if not Path(p).is_file():
            raise UserError(f"records file {p} does not exist (give the JSONL written by `python -m lorabench run`)")
    from lorabench.report.build import parse_formats, write_report
    formats = parse_formats(args.format)
    records, skipped = [], []
    for p in args.records:
        records.extend(read_records(p, skipped=skipped))
    if not records:
        raise UserError(f"no records in {', '.join(args.records)}")
    notes = [f"{len(skipped)} torn or malformed record line(s) skipped ({', '.join(skipped)}): a writer killed "
             f"mid-line leaves one; the trials they held are missing here (running the suite again re-runs them)."
             ] if skipped else []
    if args.out is None:
        if formats != ["md"] and args.format:
            raise UserError(f"--format {','.join(formats)} writes files: give --out DIR (only md can go to stdout)")
        with tempfile.TemporaryDirectory() as d:
            (path,) = write_report(records, d, ["md"], notes)
            print(path.read_text(encoding="utf-8"), end="")
        return 0
    for path in write_report(records, args.out, formats, notes):
        print(path)
    return 0


def _task_options(pairs: list[str]) -> dict:
    import yaml
    out = {}
    for kv in pairs:
        if "=" not in kv:
            raise UserError(f"--task-option {kv!r} is not KEY=VALUE (e.g. n_eval=50; keys: n_train, n_eval, max_length)")
        k, _, v = kv.partition("=")
        out[k.strip()] = yaml.safe_load(v)
    return out


def cmd_eval(args) -> int:
    from lorabench.lmeval.run import eval_command
    return eval_command(args.lm_eval.split(","), args.model, adapter=args.adapter, tasks_dir=args.tasks_dir,
                        task_options=_task_options(args.task_option), batch_size=args.batch_size,
                        limit=args.limit, num_fewshot=args.num_fewshot, apply_chat_template=args.apply_chat_template,
                        max_length=args.max_length, output=args.output)


def cmd_export(args) -> int:
    from lorabench.lmeval.export import export_tasks
    tokenizer = None
    if args.model:
        from lorabench import assets
        tokenizer = assets.load_tokenizer(args.model)
    names = args.tasks.split(",") if args.tasks else None
    for name, path in export_tasks(names, args.dir, tokenizer=tokenizer, options=_task_options(args.task_option)).items():
        print(f"{name}: {path}")
    return 0


def cmd_library(args) -> int:
    """The cross-task adapter library (docs/cross-task.md): list what the cache and the search path hold, or
    export cached adapters to a folder another machine or session reads through $LORABENCH_LIBRARY_PATH."""
    from pathlib import Path

    from lorabench.harness import multitask
    if args.action == "export":
        if not args.out:
            raise UserError("library export needs --out DIR (e.g. results/cross-task/library)")
        names = multitask.export_library(Path(args.out), Path(args.source) if args.source else None, args.ids or None)
        print(f"exported {len(names)} adapter(s) to {args.out} (with {multitask.MANIFEST}): {', '.join(names)}")
        return 0
    if args.ids:
        raise UserError("library list takes no adapter ids (library export does)")
    folders = [("cache", multitask.library_dir())] + [("search path", f) for f in multitask.library_search_path()]
    for kind, folder in folders:
        entries = multitask.library_entries(folder) if folder.is_dir() else []
        print(f"{kind}: {folder} ({len(entries)} adapter(s))")
        for e in entries:
            info = e["library"]
            what = info.get("task") or "+".join(info.get("tasks", [])) or "?"
            print(f"  {e['file'][:-12]:16s} {what:24s} {info.get('variant', 'lora'):10s} "
                  f"{info.get('model', '?'):14s} seed {info.get('seed', '?')!s:3s} {e['bytes'] / 2**20:6.1f} MB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lorabench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a suite (each trial in its own process; resumable)")
    r.add_argument("suite", help="suite name (suites/NAME.yaml) or path to a suite file")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=50 seeds=0,1 lora.rank=16")
    r.add_argument("--records", help="JSONL records file (default runs/SUITE/records.jsonl)")
    r.add_argument("--timeout", type=float, default=None, help="seconds per trial before it is killed and recorded as failed")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--jobs", type=int, default=None,
                   help="trials run at once, each in its own process (default: the suite's `jobs`, else 1)")
    r.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: trials in processes on this machine (default); ray: each trial a Ray task on a "
                        "cluster, with the same records (docs/scale.md)")
    r.add_argument("--address", default=None,
                   help="with --backend ray: the Ray cluster to join (HOST:PORT, as `ray start --head` prints it); "
                        "none starts Ray on this machine for this run")
    r.add_argument("--retries", type=int, default=None,
                   help="with --backend ray: times a trial lost with its worker or node is run again (default 2)")
    r.set_defaults(func=cmd_run)

    ls = sub.add_parser("list", help="list methods, tasks, suites or assets")
    ls.add_argument("what", choices=["methods", "tasks", "suites", "assets"])
    ls.set_defaults(func=cmd_list)

    a = sub.add_parser("assets", help="list or fetch the offline model and data assets")
    a.add_argument("action", choices=["list", "fetch"])
    a.add_argument("names", nargs="*")
    a.set_defaults(func=cmd_assets)

    e = sub.add_parser("env", help="versions, machine, and which kernel backends are available and why")
    e.set_defaults(func=cmd_env)

    b = sub.add_parser("bench", help="kernel, serving and thread benchmarks",
                       description="Benchmarks; `python -m lorabench bench WHAT --help` gives each one's options.")
    b.add_argument("what", choices=["kernels", "serving", "threads"],
                   help="kernels: lorabench's ops against references (docs/kernels.md); serving: one base model "
                        "serving many adapters (docs/serving.md); threads: trial threads on a shared machine "
                        "(docs/architecture.md)")
    # REMAINDER also takes options given after WHAT (`bench kernels --help` reaches the benchmark's own parser)
    b.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    b.set_defaults(func=cmd_bench)

    ev = sub.add_parser("eval", help="score a model (+ adapter) with lm-evaluation-harness, offline")
    ev.add_argument("--lm-eval", required=True, metavar="TASKS",
                    help="comma-separated tasks: lorabench decoder tasks (quartz, socialiqa, arith, shakespeare-lm, the "
                         "cross-task pool's multiple-choice tasks: `list tasks`) "
                         "or lm-eval tasks defined in --tasks-dir")
    ev.add_argument("--model", required=True, help="model asset (smollm2-135m, tiny-llama), local directory or hub id")
    ev.add_argument("--adapter", help="a lorabench adapter (.safetensors from Method.save_adapter) to apply")
    ev.add_argument("--tasks-dir", help="read tasks from this exported folder instead of exporting them afresh")
    ev.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                    help="lorabench task option for the export, e.g. n_eval=50 (repeatable)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--limit", type=int, help="lm-eval's limit: only the first N documents of each task")
    ev.add_argument("--num-fewshot", type=int, help="few-shot examples from the task's train split (default 0)")
    ev.add_argument("--apply-chat-template", action="store_true",
                    help="render prompts with the tokenizer's chat template (lorabench's own evaluator does not)")
    ev.add_argument("--max-length", type=int, help="longest sequence fed to the model (default: its context length)")
    ev.add_argument("--output", help="also write lm-eval's results (JSON) here")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="export lorabench's decoder tasks as lm-eval task YAML over local JSONL")
    ex.add_argument("what", choices=["lm-eval-tasks"])
    ex.add_argument("dir", help="output folder (one subfolder per task)")
    ex.add_argument("--tasks", help="comma-separated task names (default: every decoder task)")
    ex.add_argument("--model", help="tokenizer for the shakespeare-lm windows (default: the task's default model)")
    ex.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                    help="lorabench task option, e.g. n_eval=50 (repeatable)")
    ex.set_defaults(func=cmd_export)

    lb = sub.add_parser("library", help="the cross-task adapter library: list it, or export it for another machine")
    lb.add_argument("action", choices=["list", "export"],
                    help="list: the adapters in the cache and on $LORABENCH_LIBRARY_PATH; export: copy cached "
                         "adapters to --out with a MANIFEST.json of their sha256 (docs/cross-task.md)")
    lb.add_argument("ids", nargs="*", help="export: adapter ids (default: every cached adapter)")
    lb.add_argument("--out", help="export: the folder to write (e.g. results/cross-task/library)")
    lb.add_argument("--source", help="export: the folder to copy from (default: the cache)")
    lb.set_defaults(func=cmd_library)

    rp = sub.add_parser("report", help="leaderboard report (Markdown, CSV, HTML, PNG plots) from records files")
    rp.add_argument("records", nargs="+", help="JSONL records files")
    rp.add_argument("--format", action="append", metavar="md|csv|html|png",
                    help="output format(s): repeat the flag or give a comma list (default: all four with --out, "
                         "md to stdout without)")
    rp.add_argument("--out", default=None, help="directory to write LEADERBOARD.md, *.csv, leaderboard.html, plots/")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `run` takes key=value overrides before or after its options (argparse stops a positional
    # list at the first option).
    if args.command == "run":
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if args.command == "library":   # adapter ids after its options, as for run's overrides
        args.ids += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; recorded trials are kept, run again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output has gone (`... | head -2`): not an error. Point stdout at /dev/null so
        # that the interpreter's final flush does not fail again, and exit as a process killed by
        # SIGPIPE would (128 + 13), what a shell expects of a writer whose reader left.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


if __name__ == "__main__":
    sys.exit(main())
