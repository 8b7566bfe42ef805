"""The command line of ``python -m nprune.experiment``: flags, subcommands, one-line messages.

The recipe's flags are made from :data:`nprune.experiment.config.FIELDS` (name, type, help, choices);
their values are checked by :meth:`Recipe.validate`, whose messages name the flag. Every mistake on
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
from .config import (FIELDS, NET_OPTIMIZER, PRESET_FIELDS, PRESETS, ConfigError, Recipe, check,
                     preset_recipe)
from .imp import IMP
from .strategies import STRATEGIES, check_strategy
from .progress import hms
from .schedule import run_job


#: Recipe settings with a flag of their own in a run (``--net``, ``--rate`` and ``--layer-rates``
#: set the others) and in ``train`` (which trains a set number of epochs and does not prune).
RUN_FIELDS = tuple(n for n in FIELDS if n not in ("net", "rates"))
TRAIN_CMD_FIELDS = ("dataset", "init", "optimizer", "lr", "momentum", "weight_decay", "batch_size", "n_val")


class UsageError(Exception):
    """A bad flag value: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (``nprune: error: ...``) rather than usage + error."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def flag(name: str) -> str:
    """The flag of a flat recipe setting (``n_val`` -> ``--val``) or of another option (``rounds``)."""
    spec = FIELDS.get(name)
    return "--" + ((spec.meta.get("flag") if spec else None) or name).replace("_", "-")


def usage_message(err: ConfigError) -> str:
    """``err``'s message with the setting named by its flag."""
    return err.message(flag(err.field) if err.field else "")


def add_recipe_flags(p: argparse.ArgumentParser, names) -> None:
    """One flag per flat recipe setting in ``names``. A setting that presets choose defaults to
    None (the preset's or the net's value); the others to the recipe's default."""
    for name in names:
        spec = FIELDS[name]
        p.add_argument(flag(name), dest=name, type=spec.type, choices=spec.meta.get("choices"),
                       metavar=None if "choices" in spec.meta else flag(name)[2:].upper().replace("-", "_"),
                       default=None if name in PRESET_FIELDS else spec.default,
                       help=spec.meta.get("help"))


def add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder with the four IDX files (else $NPRUNE_DATA_DIR, the "
                                      "user cache, or a download into the cache)")
    p.add_argument("--no-download", action="store_true", help="never download the data set")


def given(args, names) -> dict:
    """The recipe settings among ``names`` that ``args`` sets (not None)."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _parse_seeds(text: str) -> list[int]:
    """``3`` -> [0, 1, 2]; ``0,3,7`` -> those seeds; ``2-4`` -> [2, 3, 4] (parts may be mixed)."""
    try:
        if text.strip().isdigit():
            n = int(text)
            if n < 1:
                raise UsageError(f"--seeds: need at least one seed, got {text!r}")
            return list(range(n))
        out = []
        for part in text.split(","):
            a, sep, b = part.strip().partition("-")
            out += range(int(a), int(b) + 1) if sep else [int(a)]
    except ValueError:
        raise UsageError(f"--seeds: expected a count (3) or a list (0,1,2 or 0-4), got {text!r}") from None
    if not out:
        raise UsageError(f"--seeds: no seeds in {text!r}")
    return sorted(set(out))


def _parse_layer_rates(text: str) -> dict:
    out = {}
    for part in text.split(","):
        name, _, val = part.partition("=")
        try:
            out[name.strip()] = float(val)
        except ValueError:
            raise UsageError(f"--layer-rates: expected NAME=RATE[,NAME=RATE...], got {text!r}") from None
    return out


def _parse_strategies(text: str) -> list[str]:
    strategies = [s.strip() for s in text.split(",") if s.strip()]
    if not strategies:
        raise UsageError("--strategies: give at least one strategy")
    for s in strategies:
        try:
            check_strategy(s)
        except ValueError as e:
            raise UsageError(f"--strategies: {e}") from None
    return strategies


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m nprune.experiment",
        description="Lottery-ticket experiments: train, prune by magnitude, reset the survivors "
                    f"({' / '.join(STRATEGIES)}), repeat; write tables and plots. "
                    "Subcommands: 'report RUN_DIR...' rebuilds tables and plots from saved files; "
                    "'train --net NET --epochs N' trains one dense network; 'presets' lists the presets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="starting recipe; every value can be overridden by the flags below")
    p.add_argument("--net", choices=[*nets.NETS, "both"], help="network(s) to prune (preset's by default)")
    p.add_argument("--strategies", help="comma-separated reset strategies; the survivors start from "
                   + "; ".join(f"{name}: {s.about}" for name, s in STRATEGIES.items()))
    p.add_argument("--rounds", type=int, help="pruning rounds after the dense round 0")
    p.add_argument("--rate", type=float, help="fraction of survivors pruned per round in hidden fc "
                                              "layers; conv and output layers get half")
    p.add_argument("--layer-rates", help="explicit per-layer rates, e.g. fc1=0.2,fc2=0.2,fc3=0.1")
    add_recipe_flags(p, RUN_FIELDS)
    p.add_argument("--seeds", help="number of seeds (3 -> 0,1,2) or a list (0,3,7 or 0-4)")
    add_data_flags(p)
    p.add_argument("--out", default="runs", help="folder that receives one sub-folder per run")
    p.add_argument("--jobs", type=int, default=1, help="independent trainings run side by side; "
                                                      "BLAS threads per process = cores / jobs")
    p.add_argument("--kernel", choices=KERNELS, default="auto",
                   help="layer kernels: dense (masked dense GEMMs), sparse (always the sparse "
                        "kernels) or auto (per layer, the sparse kernel where the mask's density is "
                        "below the thresholds measured for its shape and batch size; see python -m "
                        "nprune.kernels.calibrate --help). A run folder keeps the thresholds of its first run "
                        "(kernel_thresholds.json), so a resumed run makes the same choices; the "
                        "kernel is not part of the recipe hash")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def resolve(args) -> list[dict]:
    """Turn preset + flags into a list of jobs ``{"recipe", "strategies", "rounds", "seeds"}``.
    Raises ConfigError (a setting, named by :func:`usage_message`) or UsageError."""
    preset = PRESETS[args.preset]
    wanted = list(preset["nets"]) if args.net is None else (
        list(nets.NETS) if args.net == "both" else [args.net])
    strategies = preset["strategies"] if args.strategies is None else _parse_strategies(args.strategies)
    seeds = preset["seeds"] if args.seeds is None else _parse_seeds(args.seeds)
    check(args.jobs, ">= 1", field_name="jobs")
    layer_rates = _parse_layer_rates(args.layer_rates) if args.layer_rates else None
    jobs = []
    for net in wanted:
        recipe, rounds = preset_recipe(args.preset, net, given(args, RUN_FIELDS), args.rate,
                                       layer_rates, args.rounds)
        jobs.append({"recipe": recipe, "strategies": strategies, "rounds": rounds, "seeds": seeds})
    return jobs


def cmd_report(argv) -> int:
    from .report import write_report
    p = _Parser(prog="python -m nprune.experiment report",
                description="Rebuild results.csv, curves.csv, summary.md and the plots of run "
                            "folders from their saved files.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    args = p.parse_args(argv)
    for d in args.run_dirs:
        info = write_report(d)
        print(f"{d}: {info['rows']} rounds")
        for f in info["files"]:
            print(f"  {f}")
    return 0


def cmd_train(argv) -> int:
    """Train one dense network and print validation/test accuracy after every epoch."""
    import numpy as np
    from ..data.datasets import load_dataset, prepare
    from ..training import train
    from .report import train_summary_markdown
    p = _Parser(prog="python -m nprune.experiment train",
                description="Train one dense network (no pruning) and print its accuracy per epoch. "
                            "Defaults: " + "; ".join(
                                f"{net}: " + ", ".join(f"{k} {v}" for k, v in opt.items())
                                for net, opt in NET_OPTIMIZER.items()) + ".",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--net", choices=list(nets.NETS), default="lenet300")
    p.add_argument("--epochs", type=int, default=10)
    add_recipe_flags(p, TRAIN_CMD_FIELDS)
    p.add_argument("--seed", type=int, default=0, help="the seed of a single run")
    p.add_argument("--seeds", help="run several seeds one after another and end with a table and "
                                   "their mean: a count (5 -> 0..4) or a list (0,3,7 or 0-4); "
                                   "overrides --seed")
    p.add_argument("--json", metavar="PATH",
                   help="also write every run's settings, curves and early-stop figures to this "
                        "JSON file (atomically)")
    add_data_flags(p)
    p.add_argument("--kernel", choices=KERNELS, default="auto",
                   help="layer kernels (see the main command's --help)")
    p.add_argument("--evals-per-epoch", type=int, default=5,
                   help="evaluations on validation and test per epoch; the early stop is the "
                        "evaluation of minimum validation loss")
    a = p.parse_args(argv)
    seeds = [a.seed] if a.seeds is None else _parse_seeds(a.seeds)
    if a.json is not None:   # fail before hours of training, not after
        jp = Path(a.json)
        if jp.is_dir() or not jp.parent.is_dir():
            raise UsageError(f"--json {a.json}: " + ("is a folder" if jp.is_dir() else
                                                     f"folder {jp.parent} does not exist"))
    check(a.epochs, ">= 1", field_name="epochs")
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
    cfg = dataclasses.replace(recipe.train, iterations=a.epochs * per_epoch,
                              eval_every=per_epoch // a.evals_per_epoch)
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
                  f"{100 * r.val_acc[-1]:.2f} | {100 * r.test_acc[-1]:.2f} | {time.perf_counter() - t0:.1f} |",
                  flush=True)
        res, _ = train(model, data, cfg, np.random.default_rng([seed, 1, 0]), progress=show)
        print(f"best test accuracy {100 * max(res.test_acc):.2f}% ; at early stop (min val loss, iteration "
              f"{res.early_stop_iter}) {100 * res.early_stop_test_acc:.2f}% ; final {100 * res.final_test_acc:.2f}% ; "
              f"training {res.seconds:.1f}s", flush=True)
        runs.append({"seed": seed, "result": res.to_dict()})
        if a.json:   # rewritten after every seed, so an interrupted series keeps what it finished
            _write_train_json(a.json, {
                "net": a.net, "dataset": recipe.dataset, "init": recipe.init, "epochs": a.epochs,
                "n_val": recipe.n_val, "kernel": a.kernel, "steps_per_epoch": per_epoch,
                "config": dataclasses.asdict(cfg), "runs": runs})
    if len(runs) > 1:
        print(train_summary_markdown(runs, per_epoch))
    return 0


def _write_train_json(path, record: dict) -> None:
    from ..data.datasets import DataError
    try:
        atomic_write_json(path, record)
    except OSError as err:
        raise DataError(f"--json {path}: cannot write ({err.strerror or err})") from None


def cmd_presets() -> int:
    for name, p in PRESETS.items():
        print(f"{name}: {p['about']}")
        for net, fields in p["nets"].items():
            print(f"    {net}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))
    return 0


def cmd_run(argv) -> int:
    args = build_parser().parse_args(argv)
    jobs = resolve(args)
    out = Path(args.out)
    from ..data.datasets import load_dataset
    from .report import write_report
    # --kernel auto: a bad thresholds table (the run folder's or the user's) is reported now
    for job in jobs:
        imp = IMP(job["recipe"], out / job["recipe"].folder_name(), kernel=args.kernel)
        imp.kernel_thresholds(save=False)
    # find (or download) and verify the data before anything is written
    for dataset in dict.fromkeys(job["recipe"].dataset for job in jobs):
        load_dataset(dataset, data_dir=args.data_dir, download=not args.no_download)
    done = []
    t0 = time.perf_counter()
    for job in jobs:
        run_dir = run_job(job, out, args.data_dir, not args.no_download, args.jobs, args.quiet, args.kernel)
        info = write_report(run_dir)
        done.append((run_dir, info))
    print(f"finished in {hms(time.perf_counter() - t0)}")
    for run_dir, info in done:
        print(f"{run_dir}: table {run_dir / 'summary.md'}, plots "
              + ", ".join(str(f) for f in info["files"] if str(f).endswith(".png")))
    for run_dir, _ in done:
        print()
        print((run_dir / "summary.md").read_text())
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from ..data.datasets import DataError
    from ..training import DivergenceError
    try:
        if argv and argv[0] == "report":
            return cmd_report(argv[1:])
        if argv and argv[0] == "presets":
            return cmd_presets()
        if argv and argv[0] == "train":
            return cmd_train(argv[1:])
        return cmd_run(argv)
    except ConfigError as e:
        print(f"nprune: error: {usage_message(e)}", file=sys.stderr)
        return 2
    except (UsageError, ThresholdsError) as e:
        print(f"nprune: error: {e}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError, ValueError, DivergenceError) as e:
        print(f"nprune: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"nprune: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nprune: interrupted; finished rounds are saved, rerun the same command to resume",
              file=sys.stderr)
        return 130
