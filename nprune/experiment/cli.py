"""The command line of ``python -m nprune.experiment``: subcommands, one-line messages.

The recipe's flags are made from :data:`nprune.experiment.config.FIELDS` (name, type, help, choices;
:mod:`nprune.experiment.flags`); their values are checked by :meth:`Recipe.validate`, whose messages
name the flag. Every mistake on
the command line is one line ``nprune: error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from .. import nets
from ..data.fsutil import atomic_write_json
from ..kernels import CHOICES as KERNELS
from ..kernels import ThresholdsError, apply_kernel
from .cluster import open_cluster
from .config import NET_OPTIMIZER, PRESETS, TEST_EVERY_HELP, ConfigError, Recipe, check, preset_recipe
from .flags import (MAX_EPOCHS, MAX_JOBS, MAX_SEED, PLOT_FORMATS, RUN_FIELDS, TRAIN_CMD_FIELDS,
                    UsageError, _HelpFormatter, _out_folder, _Parser, _parse_layer_rates, _parse_seeds,
                    _parse_strategies, add_data_flags, add_plot_format_flag, add_recipe_flags, given,
                    net_default, preset_default, usage_message)
from .imp import IMP
from .strategies import STRATEGIES, check_strategy
from .progress import Clock, hms
from .report import write_report
from .runs import print_notice
from .schedule import remaining_iterations, run_job
from .signals import catch_stop_signals


#: The subcommands, each with its one line in ``--help``; ``run`` is the default.
COMMANDS = {
    "run": "(the default) prune by magnitude round after round and write tables and plots",
    "report": "rebuild the tables and plots of run folders from their saved files",
    "train": "train one dense network and print its accuracy per epoch",
    "presets": "list the presets and what they set",
    "calibrate": "measure the --kernel auto thresholds on this machine (python -m "
                 "nprune.kernels.calibrate calibrate)",
    "show": "print the --kernel auto thresholds in use (python -m nprune.kernels.calibrate show)",
}
KERNEL_COMMANDS = ("calibrate", "show")   # handed whole to nprune.kernels.calibrate.main
#: Exit status of a run in which a chain of its plan diverged (its results are saved and marked).
EXIT_DIVERGED = 3


def build_main_parser() -> argparse.ArgumentParser:
    """The whole command line: one subparser per entry of :data:`COMMANDS` (``.commands`` maps
    each name to its parser)."""
    top = _Parser(
        prog="python -m nprune.experiment",
        usage="%(prog)s [run] [RUN FLAGS]\n       %(prog)s {" + ",".join(c for c in COMMANDS if c != "run")
              + "} ...",
        description="Lottery-ticket experiments: train, prune by magnitude, reset the survivors "
                    f"({' / '.join(STRATEGIES)}), repeat; write tables and plots. Without a "
                    "command, the flags are run's. '%(prog)s COMMAND --help' describes a command.")
    sub = top.add_subparsers(dest="command", title="commands", metavar="{" + ",".join(COMMANDS) + "}")
    top.commands = {}
    for name, about in COMMANDS.items():
        top.commands[name] = sub.add_parser(
            name, help=about, description=about.removeprefix("(the default) ").capitalize() + ".",
            formatter_class=_HelpFormatter, add_help=name not in KERNEL_COMMANDS,
            prog=f"{top.prog} [run]" if name == "run" else None)
    _add_run_flags(top.commands["run"])
    _add_report_flags(top.commands["report"])
    _add_train_flags(top.commands["train"])
    for name in KERNEL_COMMANDS:
        top.commands[name].add_argument("args", nargs=argparse.REMAINDER,
                                        help=f"see python -m nprune.kernels.calibrate {name} --help")
    return top


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``run`` (the default command)."""
    return build_main_parser().commands["run"]


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    plan = PRESETS["default"]
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="starting recipe; every value can be overridden by the flags below "
                        "(see the presets command)")
    p.add_argument("--net", choices=[*nets.NETS, "both"],
                   help=f"network(s) to prune (default: the preset's; for default, {' and '.join(plan['nets'])})")
    p.add_argument("--strategies", help="comma-separated reset strategies; the survivors start from "
                   + "; ".join(f"{name}: {s.about}" for name, s in STRATEGIES.items())
                   + f" (default: the preset's; for default, {','.join(plan['strategies'])})")
    p.add_argument("--rounds", type=int, help=f"pruning rounds after the dense round 0 ({preset_default('rounds')})")
    p.add_argument("--rate", type=float, help="fraction of survivors pruned per round in hidden fc "
                                              "layers; conv and output layers get half "
                                              f"({preset_default('rate')})")
    p.add_argument("--layer-rates", help="explicit per-layer rates, e.g. fc1=0.2,fc2=0.2,fc3=0.1 "
                                         "(default: none; the layers follow --rate)")
    add_recipe_flags(p, RUN_FIELDS)
    p.add_argument("--test-every", type=int, default=0, metavar="N", help=TEST_EVERY_HELP)
    p.add_argument("--seeds", help="a count (3 -> seeds 0,1,2), a list (0,3,7) or a range (0-4) "
                                   f"(default: the preset's; for default, {len(plan['seeds'])}: seed "
                                   + ",".join(map(str, plan["seeds"])) + ")")
    add_data_flags(p)
    p.add_argument("--out", default="runs", help="folder that receives one sub-folder per run")
    p.add_argument("--jobs", type=int, default=1, help="independent trainings run side by side; "
                                                      "BLAS threads per process = cores / jobs")
    p.add_argument("--cluster", metavar="ADDRESS", help="run the rounds on a Dask cluster: "
                   "tcp://HOST:PORT of its scheduler, or local:N to start N local worker processes; "
                   "the run folder stays here (see docs/cluster.md)")
    p.add_argument("--kernel", choices=KERNELS, default="auto",
                   help="layer kernels: dense (masked dense GEMMs), sparse (always the sparse "
                        "kernels) or auto (per layer, the sparse kernel where the mask's density is "
                        "below the thresholds measured for its shape and batch size; see the "
                        "calibrate command). A run folder keeps the thresholds of its first run "
                        "(kernel_thresholds.json), so a resumed run makes the same choices; the "
                        "kernel is not part of the recipe hash")
    add_plot_format_flag(p)
    p.add_argument("--print-tables", action="store_true",
                   help="also print each run's summary.md tables on stdout (before the paths)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def resolve(args) -> list[dict]:
    """Turn preset + flags into a list of jobs ``{"recipe", "strategies", "rounds", "seeds"}``.
    Raises ConfigError (a setting, named by :func:`usage_message`) or UsageError."""
    preset = PRESETS[args.preset]
    wanted = list(preset["nets"]) if args.net is None else (
        list(nets.NETS) if args.net == "both" else [args.net])
    strategies = preset["strategies"] if args.strategies is None else _parse_strategies(args.strategies)
    seeds = preset["seeds"] if args.seeds is None else _parse_seeds(args.seeds)
    check(args.jobs, f"in [1, {MAX_JOBS}]", field_name="jobs")
    if args.cluster is not None:
        from . import cluster
        if args.jobs > 1:
            raise UsageError("--jobs and --cluster exclude each other: the cluster's workers run the rounds")
        if not cluster.has_distributed():
            raise UsageError(cluster.NEEDS_DISTRIBUTED)
        try:
            args.cluster = cluster.parse_address(args.cluster)
        except ValueError as e:
            raise UsageError(str(e)) from None
    layer_rates = _parse_layer_rates(args.layer_rates) if args.layer_rates is not None else None
    _out_folder(args.out)
    jobs = []
    for net in wanted:
        recipe, rounds = preset_recipe(args.preset, net, given(args, RUN_FIELDS), args.rate,
                                       layer_rates, args.rounds)
        recipe = recipe.with_test_every(args.test_every)
        for s in strategies:
            try:
                check_strategy(s, recipe.train)
            except ValueError as e:
                raise UsageError(f"--strategies: {e}") from None
        jobs.append({"recipe": recipe, "strategies": strategies, "rounds": rounds, "seeds": seeds})
    return jobs


def _add_report_flags(p: argparse.ArgumentParser) -> None:
    p.description = ("Rebuild results.csv, curves.csv, summary.md and the plots of run folders "
                     "from their saved files.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run folder (runs/lenet300-...)")
    add_plot_format_flag(p)


def cmd_report(args) -> int:
    for d in args.run_dirs:
        info = write_report(d, plot_format=args.plot_format)
        print(f"{d}: {info['rows']} rounds")
        for f in info["files"]:
            print(f"  {f}")
    return 0


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.description = ("Train one dense network (no pruning) and print its accuracy per epoch, then "
                     "the test accuracy at the evaluation of minimum validation loss (the early "
                     "stop). Defaults: " + "; ".join(
                         f"{net}: " + ", ".join(f"{k} {v}" for k, v in opt.items())
                         for net, opt in NET_OPTIMIZER.items()) + ".")
    p.add_argument("--net", choices=list(nets.NETS), default="lenet300", help="network to train")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    add_recipe_flags(p, TRAIN_CMD_FIELDS, net_default)
    p.add_argument("--test-every", type=int, default=0, metavar="N", help=TEST_EVERY_HELP)
    p.add_argument("--seed", type=int, default=0, help="the seed of a single run")
    p.add_argument("--seeds", help="run several seeds one after another and end with a table and "
                                   "their mean: a count (5 -> 0..4), a list (0,3,7) or a range "
                                   "(0-4); overrides --seed")
    p.add_argument("--json", metavar="PATH",
                   help="also write every run's settings, curves and early-stop figures to this "
                        "JSON file (atomically)")
    add_data_flags(p)
    p.add_argument("--kernel", choices=KERNELS, default="auto",
                   help="layer kernels (see run --help)")
    p.add_argument("--evals-per-epoch", type=int, default=5,
                   help="evaluations on validation and test per epoch; the early stop is the "
                        "evaluation of minimum validation loss")


def cmd_train(a) -> int:
    """Train one dense network and print validation/test accuracy after every evaluation."""
    import numpy as np
    from ..data.datasets import load_dataset, prepare
    from ..training import train
    from .report import train_summary_markdown
    check(a.seed, f"in [0, {MAX_SEED}]", field_name="seed")
    seeds = [a.seed] if a.seeds is None else _parse_seeds(a.seeds)
    if a.json is not None:   # fail before hours of training, not after
        jp = Path(a.json)
        if jp.is_dir() or not jp.parent.is_dir():
            raise UsageError(f"--json {a.json}: " + ("is a folder" if jp.is_dir() else
                                                     f"folder {jp.parent} does not exist"))
    check(a.epochs, f"in [1, {MAX_EPOCHS}]", field_name="epochs")
    check(a.evals_per_epoch, ">= 1", field_name="evals_per_epoch")
    # a recipe without pruning (no rates): only its net, data and training settings count here
    recipe = Recipe().replace(**{**NET_OPTIMIZER[a.net], **given(a, TRAIN_CMD_FIELDS), "net": a.net,
                                 "rates": ()})
    recipe.validate()
    data = prepare(load_dataset(recipe.dataset, data_dir=a.data_dir, download=not a.no_download),
                   n_val=recipe.n_val, seed=0)
    per_epoch = len(data.x_train) // recipe.train.batch_size
    if a.evals_per_epoch > per_epoch:
        raise UsageError(f"--evals-per-epoch {a.evals_per_epoch} exceeds the {per_epoch} steps per epoch")
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(
        recipe.train, iterations=a.epochs * per_epoch, eval_every=per_epoch // a.evals_per_epoch))
    cfg = recipe.with_test_every(a.test_every).train
    runs = []
    for seed in seeds:
        model = nets.build(a.net, np.random.default_rng([seed, 0, 0]), init=recipe.init)
        apply_kernel(model, a.kernel)
        print(f"{a.net} on {recipe.dataset}, seed {seed}: {cfg}", flush=True)
        print("| epoch | iteration | train loss | val loss | val acc % | test acc % | elapsed s |")
        print("|---|---|---|---|---|---|---|")
        t0 = time.perf_counter()

        def show(it, total, r):
            print(f"| {it / per_epoch:.2f} | {it} | {r.train_loss[-1]:.4f} | {r.val_loss[-1]:.4f} | "
                  f"{100 * r.val_acc[-1]:.2f} | {_pct_or_blank(r.test_acc[-1])} | {time.perf_counter() - t0:.1f} |",
                  flush=True)
        res, _ = train(model, data, cfg, np.random.default_rng([seed, 1, 0]), progress=show)
        # the early stop is the result; the maximum over evaluations would be selected on the test set
        print(f"early stop (min val loss, iteration {res.early_stop_iter}): test accuracy "
              f"{100 * res.early_stop_test_acc:.2f}% ; final (iteration {cfg.iterations}): "
              f"{100 * res.final_test_acc:.2f}% ; training {res.seconds:.1f}s", flush=True)
        runs.append({"seed": seed, "result": res.to_dict()})
        if a.json:   # rewritten after every seed, so an interrupted series keeps what it finished
            _write_train_json(a.json, {
                "net": a.net, "dataset": recipe.dataset, "init": recipe.init, "epochs": a.epochs,
                "n_val": recipe.n_val, "kernel": a.kernel, "steps_per_epoch": per_epoch,
                "config": dataclasses.asdict(cfg), "runs": runs})
    if len(runs) > 1:
        print(train_summary_markdown(runs, per_epoch))
    return 0


def _pct_or_blank(v: float) -> str:
    """``v`` in percent, or blank where it was not measured (None: the test set between tests)."""
    return "" if v is None or v != v else f"{100 * v:.2f}"


def _write_train_json(path, record: dict) -> None:
    from ..data.datasets import DataError
    try:
        atomic_write_json(path, record)
    except OSError as err:
        raise DataError(f"--json {path}: cannot write ({err.strerror or err})") from None


def cmd_presets(args) -> int:
    for name, p in PRESETS.items():
        print(f"{name}: {p['about']}")
        print(f"    strategies: {','.join(p['strategies'])}; seeds: {','.join(map(str, p['seeds']))}")
        for net, fields in p["nets"].items():
            print(f"    {net}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))
    return 0


def cmd_run(args) -> int:
    jobs = resolve(args)
    out = _out_folder(args.out)
    from ..data.datasets import load_dataset
    # --kernel auto: a bad thresholds table (the run folder's or the user's) is reported now
    to_go = 0
    for job in jobs:
        imp = IMP(job["recipe"], out / job["recipe"].folder_name(), kernel=args.kernel)
        imp.kernel_thresholds(save=False)
        to_go += remaining_iterations(imp, job)
    # find (or download) and verify the data before anything is written
    datasets = list(dict.fromkeys(job["recipe"].dataset for job in jobs))
    for dataset in datasets:
        load_dataset(dataset, data_dir=args.data_dir, download=not args.no_download)
    clock = Clock(to_go)   # every run of the command: one ETA on the progress lines
    done = []
    with open_cluster(args.cluster if to_go else None, args.quiet, datasets, args.data_dir,
                      not args.no_download) as cluster:
        on = {"cluster": cluster} if cluster is not None else {}
        for job in jobs:
            run_dir = run_job(job, out, args.data_dir, not args.no_download, args.jobs, args.quiet,
                              args.kernel, clock, **on)
            # rounds outside this command's plan that do not check out are named and left out
            done.append((run_dir, write_report(run_dir, plot_format=args.plot_format, strict=False,
                                               notice=print_notice)))
    if not args.quiet:
        print(f"finished in {hms(clock.elapsed())}", file=sys.stderr, flush=True)
    if args.print_tables:
        for run_dir, _ in done:
            print((run_dir / "summary.md").read_text())
    # the last lines: where the results are
    for run_dir, info in done:
        print(run_dir / "summary.md")
        for f in info["files"]:
            if Path(f).suffix[1:] in PLOT_FORMATS:
                print(f)
    diverged = [f"{job['recipe'].net} seed {m['seed']} {m['strategy']} round {m['round']}"
                for job, (_, info) in zip(jobs, done) for m in info["diverged"]
                if m["seed"] in job["seeds"] and m["strategy"] in ("dense", *job["strategies"])]
    if diverged:
        print(f"nprune: diverged: {', '.join(diverged)} (see summary.md; the rule is in "
              "nprune/training.py)", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def _print_help(top: argparse.ArgumentParser) -> None:
    """``--help`` without a command: the commands, then the flags of run (the default)."""
    print(top.format_help())
    print("run (the default command):")
    print(top.commands["run"].format_help())


def main(argv=None) -> int:
    """The command line; returns the exit status. SIGINT, SIGTERM and SIGHUP stop a command with
    one line and exit status 128 + the signal's number; the signals' handlers are restored on
    return, except when main runs as the program (``argv`` None) and was stopped: then they stay
    ignored until the process exits."""
    import signal
    command = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    from ..data.datasets import DataError
    from ..training import DivergenceError
    from .cluster import ClusterError
    from .schedule import WorkerDied
    handlers = catch_stop_signals()
    stopped = False
    try:
        if argv and argv[0] in KERNEL_COMMANDS:
            from ..kernels.calibrate import main as kernels_main
            return kernels_main(argv)
        top = build_main_parser()
        if argv and argv[0] in ("-h", "--help"):
            _print_help(top)
            return 0
        if not argv or argv[0] not in COMMANDS:
            argv = ["run", *argv]
        args = top.parse_args(argv)
        return {"run": cmd_run, "report": cmd_report, "train": cmd_train,
                "presets": cmd_presets}[args.command](args)
    except ConfigError as e:
        print(f"nprune: error: {usage_message(e)}", file=sys.stderr)
        return 2
    except (UsageError, ThresholdsError, DataError, ClusterError) as e:
        # DataError: the data the command was pointed at (a folder, a data set) is not usable
        print(f"nprune: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, DivergenceError, WorkerDied) as e:
        print(f"nprune: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"nprune: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        stopped = True
        signum = getattr(e, "signum", signal.SIGINT)
        by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        try:   # after SIGHUP the terminal may be gone
            print(f"nprune: interrupted{by}; finished rounds are saved, rerun the same command to "
                  "resume", file=sys.stderr)
        except OSError:
            pass
        return 128 + signum
    finally:
        if not (stopped and command):
            for s, h in handlers.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
