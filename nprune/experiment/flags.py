"""The flags of the command line and their parsers: one flag per recipe setting (from
:data:`nprune.experiment.config.FIELDS`), their help texts, and the parsers of the flags whose values
are lists or ranges. A bad value is a :class:`UsageError` whose one line names the flag."""
from __future__ import annotations

import argparse
from pathlib import Path

from .config import FIELDS, NET_OPTIMIZER, PRESET_FIELDS, PRESETS, ConfigError
from .strategies import check_strategy


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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where it is None or False (the help says what happens
    then) or where the help names it already."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _per_net(values: dict) -> str:
    """``{"lenet300": 1500, "lenet5": 600}`` -> ``1500 for lenet300, 600 for lenet5``; one value
    when the nets agree."""
    vals = list(values.values())
    if all(v == vals[0] for v in vals):
        return str(vals[0])
    return ", ".join(f"{v} for {net}" for net, v in values.items())


def preset_default(name: str) -> str:
    """Help text of a setting the preset chooses: what the default preset sets it to."""
    nets_ = PRESETS["default"]["nets"]
    fallback = FIELDS[name].default if name in FIELDS else None
    return f"default: the preset's; for default, {_per_net({n: v.get(name, fallback) for n, v in nets_.items()})}"


def net_default(name: str) -> str:
    """Help text of a setting ``train`` takes from the net's optimiser recipe."""
    return f"default: the net's; {_per_net({n: v[name] for n, v in NET_OPTIMIZER.items()})}"


def add_recipe_flags(p: argparse.ArgumentParser, names, unset_help=preset_default) -> None:
    """One flag per flat recipe setting in ``names``, with the setting's help. A setting that
    presets choose defaults to None (the preset's or the net's value, as ``unset_help`` says);
    the others to the recipe's default."""
    for name in names:
        spec = FIELDS[name]
        chosen = name in PRESET_FIELDS
        p.add_argument(flag(name), dest=name, type=spec.type, choices=spec.meta.get("choices"),
                       metavar=None if "choices" in spec.meta else flag(name)[2:].upper().replace("-", "_"),
                       default=None if chosen else spec.default,
                       help=spec.meta["help"] + (f" ({unset_help(name)})" if chosen else ""))


def add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder with the four IDX files (default: $NPRUNE_DATA_DIR, "
                                      "else the user cache, else a download into the cache)")
    p.add_argument("--no-download", action="store_true", help="never download the data set")


def given(args, names) -> dict:
    """The recipe settings among ``names`` that ``args`` sets (not None)."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


MAX_JOBS = 256
MAX_EPOCHS = 10_000

#: Bounds of --seeds: a seed seeds numpy's generators (below 2**32), and a command runs at most
#: MAX_SEEDS of them (more is a typo, and refusing it must not first build the list).
MAX_SEED = 2 ** 32 - 1
MAX_SEEDS = 10_000
SEEDS_FORMS = ("a count >= 1 (e.g. 3 for seeds 0,1,2), a list (0,3,7) or a range (4-4 for seed 4 "
               f"alone), with seeds 0..{MAX_SEED} and at most {MAX_SEEDS:,} of them")


def _parse_seeds(text: str) -> list[int]:
    """``3`` -> [0, 1, 2]; ``0,3,7`` -> those seeds; ``2-4`` -> [2, 3, 4] (parts may be mixed).
    Anything else, or out of bounds, is a UsageError whose one line shows the forms."""
    bad = UsageError(f"--seeds must be {SEEDS_FORMS}; got {text[:40]!r}")
    try:
        if text.strip().isdigit():
            n = int(text)
            if not 1 <= n <= MAX_SEEDS:
                raise bad
            return list(range(n))
        spans = []
        for part in text.split(","):
            a, sep, b = part.strip().partition("-")
            lo, hi = int(a), int(b) if sep else int(a)
            if not 0 <= lo <= hi <= MAX_SEED or hi - lo >= MAX_SEEDS:
                raise bad
            spans.append((lo, hi))
    except ValueError:   # not digits, or more digits than int() converts
        raise bad from None
    if sum(hi - lo + 1 for lo, hi in spans) > MAX_SEEDS:
        raise bad
    return sorted({s for lo, hi in spans for s in range(lo, hi + 1)})


def _parse_layer_rates(text: str) -> dict:
    out = {}
    for part in text.split(","):
        name, _, val = part.partition("=")
        name = name.strip()
        try:
            if not name:
                raise ValueError
            rate = float(val)
        except ValueError:
            raise UsageError(f"--layer-rates: expected NAME=RATE[,NAME=RATE...], got {text[:60]!r}") from None
        if name in out:
            raise UsageError(f"--layer-rates: {name} is given twice")
        out[name] = rate
    return out


def _out_folder(text: str) -> Path:
    """``--out``: a folder name, ``~`` expanded as for --data-dir; an empty name is refused."""
    if not text.strip():
        raise UsageError("--out: give a folder name (it is empty)")
    return Path(text).expanduser()


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


PLOT_FORMATS = ("png", "svg", "pdf")



def _parse_plot_format(text: str) -> str:
    fmts = [f.strip() for f in text.split(",") if f.strip()]
    if not fmts or any(f not in PLOT_FORMATS for f in fmts):
        raise UsageError(f"--plot-format must be {', '.join(PLOT_FORMATS)} or a comma-separated "
                         f"list of them (png,pdf); got {text!r}")
    return ",".join(dict.fromkeys(fmts))


def add_plot_format_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plot-format", type=_parse_plot_format, default="png",
                   help=f"file format(s) of the plots: {', '.join(PLOT_FORMATS)}, or several "
                        "comma-separated (png,pdf)")
