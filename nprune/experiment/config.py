"""What a run computes: the :class:`Recipe` (hashed into its run folder's name), its checks, the presets.

A recipe holds a :class:`~nprune.training.TrainConfig` (how each round trains) and a :class:`PruneConfig`
(how each round prunes) beside the net, data set, initialiser, validation size and finetune factor.
Its *flat* view -- one name per setting (``lr``, ``rates``, ``n_val``, ...) -- is what the run
folder's hash, ``settings.json`` and the command line's flags are made of; :data:`FIELDS` lists it,
with each setting's help text, choices and rule, so that flags, checks and messages are written once.

Rules are short strings, so that field metadata can carry them: ``"> 0"``, ``">= 0"``, ``"in (0, 1)"``,
``"in [0, 1)"``; a message reads ``<name> must be <rule>, got <value>``.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
import typing
from dataclasses import dataclass, field

import numpy as np

from .. import nets
from ..data.datasets import DATASETS
from ..init import INITIALIZERS
from ..optim import OPTIMIZERS
from ..pruning import SCOPES
from ..training import TrainConfig
from .runs import json_ready, stable_hash

RATE_RULE = "in (0, 1)"
#: Upper bounds that catch typos before any allocation: 10 million iterations is ~4 days of
#: LeNet-300-100 on 2 cores per round; 1,000 rounds at the smallest sensible rate leave no weights.
MAX_ITERATIONS = 10_000_000
MAX_ROUNDS = 1000


class ConfigError(ValueError):
    """A setting out of range or unknown. ``field`` is its flat name; ``template`` the message, where
    ``{subject}`` stands for whatever names the setting to the reader (the field, or a flag)."""

    def __init__(self, field_name: str | None, template: str):
        self.field, self.template = field_name, template
        super().__init__(self.message(field_name or ""))

    def message(self, subject: str) -> str:
        return self.template.replace("{subject}", subject)


_OPS = {">": operator.gt, ">=": operator.ge}


def satisfies(value, rule: str) -> bool:
    """Whether ``value`` obeys ``rule`` (``"> 0"``, ``">= 1"``, ``"in (0, 1)"``, ``"in [0, 5000)"``).
    NaN and infinities obey no rule."""
    if not np.isfinite(value):
        return False
    if rule.startswith("in "):
        lo, hi = (float(x) for x in rule[4:-1].split(","))
        above = lo <= value if rule[3] == "[" else lo < value
        return above and (value <= hi if rule[-1] == "]" else value < hi)
    op, bound = rule.split()
    return _OPS[op](value, float(bound))


def check(value, rule: str, subject: str | None = None, field_name: str | None = None) -> None:
    """Raise :class:`ConfigError` ``<subject> must be <rule>, got <value>`` unless ``value`` obeys it."""
    if not satisfies(value, rule):
        template = f"{subject or '{subject}'} must be {rule}, got {value}"
        raise ConfigError(field_name, template)


# ---------------------------------------------------------------------------------------------------
# the recipe

INIT_CHOICES = tuple(sorted(k for k in INITIALIZERS if k != "zeros"))   # weight initialisers by name

#: Help text, choices and rule of each TrainConfig field a recipe carries. TrainConfig (training.py)
#: has no field metadata; where it gains some, that wins over this table.
TRAIN_FIELDS = {
    "optimizer": {"help": "optimiser", "choices": tuple(sorted(OPTIMIZERS))},
    "lr": {"help": "learning rate", "rule": "> 0"},
    "momentum": {"help": "SGD momentum (Adam ignores it)", "rule": "in [0, 1)"},
    "weight_decay": {"help": "L2 weight decay", "rule": "in [0, 1)"},
    "batch_size": {"help": "training examples per step (at most the training images left after "
                           "the validation split)", "rule": "> 0"},
    "iterations": {"help": "training iterations per round", "rule": f"in [1, {MAX_ITERATIONS}]"},
    "eval_every": {"help": "evaluate on validation and test every N iterations", "rule": ">= 0"},
}


@dataclass(frozen=True)
class PruneConfig:
    """How each round prunes: the fraction of a layer's survivors it removes, and the scope."""
    rates: tuple = field(default=(("fc1", 0.2), ("fc2", 0.2), ("fc3", 0.1)), metadata={
        "help": "(layer, rate) pairs: the fraction of survivors each layer loses per round",
        "rule": RATE_RULE, "flag": "layer_rates"})
    scope: str = field(default="layer", metadata={
        "choices": SCOPES,
        "help": "layer: per-layer magnitude; global: one magnitude threshold across layers; "
                "random: same per-layer counts at random positions (control)"})

    def param_rates(self, model) -> dict:
        """Rates keyed by parameter name (``fc1.W``)."""
        by_layer = dict(self.rates)
        return {p: by_layer[p.split(".")[0]] for p in model.prunable() if p.split(".")[0] in by_layer}


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the numbers of one (seed, strategy, round). Hashed into the run
    folder's name through its flat view :meth:`to_dict`. The layer kernel is not part of it (an
    execution detail, like the BLAS thread count; see :meth:`IMP.kernel_thresholds`)."""
    net: str = field(default="lenet300", metadata={"choices": tuple(nets.NETS),
                                                   "help": "network to prune"})
    dataset: str = field(default="mnist", metadata={"choices": tuple(DATASETS), "help": "data set"})
    init: str = field(default="glorot_normal", metadata={"choices": INIT_CHOICES,
                                                         "help": "weight initialiser"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(iterations=2000))
    n_val: int = field(default=5000, metadata={
        "flag": "val", "rule": "in [0, {n_train})",
        "help": "validation images held out of the training set"})
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune_lr_factor: float = field(default=0.1, metadata={"help": "finetune trains at lr times this",
                                                             "rule": "in (0, 100]"})

    def to_dict(self) -> dict:
        """The flat view: one key per entry of :data:`FIELDS`, JSON-ready (tuples as lists)."""
        return {name: json_ready(getattr(self._owner(spec), name)) for name, spec in FIELDS.items()}

    @classmethod
    def from_dict(cls, flat: dict) -> "Recipe":
        """The recipe of a flat view (:meth:`to_dict`, ``settings.json``); missing keys keep defaults."""
        return cls().replace(**flat)

    def replace(self, **flat) -> "Recipe":
        """A copy with settings changed by flat name (``lr=0.1``, ``rates=...``, ``n_val=0``)."""
        parts: dict = {}
        for name, value in flat.items():
            if name not in FIELDS:
                raise ConfigError(name, f"unknown recipe setting {name!r}; known: {', '.join(FIELDS)}")
            if name == "rates":
                value = tuple(tuple(pair) for pair in value)
            parts.setdefault(FIELDS[name].section, {})[name] = value
        top = parts.pop(None, {})
        for section, changes in parts.items():
            top[section] = dataclasses.replace(getattr(self, section), **changes)
        return dataclasses.replace(self, **top)

    def _owner(self, spec: "FieldSpec"):
        return self if spec.section is None else getattr(self, spec.section)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first setting that is unknown or out of range."""
        for name, spec in FIELDS.items():
            value = getattr(self._owner(spec), name)
            if name == "rates":
                _check_rates(self.net, value, spec.meta["rule"])
            elif "choices" in spec.meta and value not in spec.meta["choices"]:
                raise ConfigError(name, f"unknown {name} {value!r}; choose from "
                                        f"{', '.join(spec.meta['choices'])}")
            elif "rule" in spec.meta:
                check(value, spec.meta["rule"].format(n_train=DATASETS[self.dataset].n_train),
                      field_name=name)
        left = DATASETS[self.dataset].n_train - self.n_val
        if self.train.batch_size > left:
            raise ConfigError("batch_size", f"{{subject}} must be at most the {left} training images "
                                            f"left after the validation split, got {self.train.batch_size}")

    def folder_name(self) -> str:
        return f"{self.net}-{stable_hash(self.to_dict())}"

    def train_config(self, lr_factor: float = 1.0) -> TrainConfig:
        return dataclasses.replace(self.train, lr=self.train.lr * lr_factor)

    def with_test_every(self, test_every: int | None) -> "Recipe":
        """A copy whose training also evaluates the test set every ``test_every`` iterations
        (:data:`TEST_EVERY_HELP`; None keeps the current value). Not a recipe setting: the test set
        never changes the weights, so it is left out of the flat view and of the hash, as
        ``eval_batch`` is."""
        if test_every is None:
            return self
        every = self.train.eval_every
        if test_every < 0 or (test_every and every and test_every % every):
            raise ConfigError("test_every", f"{{subject}} must be 0 or a multiple of the evaluation "
                                            f"interval ({every}), got {test_every}")
        return dataclasses.replace(self, train=dataclasses.replace(self.train, test_every=test_every))


#: help of ``--test-every`` (``run`` and ``train``)
TEST_EVERY_HELP = ("also evaluate the test set every N iterations (a multiple of the evaluation "
                   "interval), for a full test curve in curves.csv and the curves plot; 0: only at "
                   "the early stop and the final iteration, which is all results.csv and summary.md "
                   "read. Not part of the recipe hash")


def _check_rates(net: str, rates: tuple, rule: str) -> None:
    layers = prunable_layers(net)
    unknown = [n for n, _ in rates if n not in layers]
    if unknown:
        raise ConfigError("rates", f"{{subject}}: {net} has no prunable layer {', '.join(unknown)} "
                                   f"(it has {', '.join(layers)})")
    for name, r in rates:
        check(r, rule, f"rate for {name}", "rates")


@dataclass(frozen=True)
class FieldSpec:
    """One setting of the flat view: its ``section`` (None, ``"train"`` or ``"prune"``), Python type,
    default, and metadata (``help``, ``choices``, ``rule``, ``flag``)."""
    section: str | None
    type: type
    default: object
    meta: dict


def _flat_fields(owner, section=None) -> dict:
    """The settings of the dataclass instance ``owner`` in order, nested dataclasses spliced in
    place, defaults read from ``owner``. ``eval_batch`` (how many images one evaluation step takes:
    memory, not numbers) and ``test_every`` (when the test set is evaluated: it never changes the
    weights, nor the test accuracies reported) are left out of the recipe."""
    cls = type(owner)
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in ("eval_batch", "test_every"):
            continue
        value = getattr(owner, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat_fields(value, f.name))
            continue
        meta = {**TRAIN_FIELDS.get(f.name, {}), **f.metadata} if cls is TrainConfig else dict(f.metadata)
        out[f.name] = FieldSpec(section, hints[f.name], value, meta)
    return out


#: The flat settings of a recipe, in the order of ``settings.json``'s ``recipe`` and of the flags.
FIELDS: dict[str, FieldSpec] = _flat_fields(Recipe())


@functools.lru_cache(maxsize=None)
def prunable_layers(net: str) -> tuple:
    """Names of ``net``'s layers with prunable weights, in order (``fc1``, ``fc2``, ...)."""
    return tuple(p.split(".")[0] for p in nets.build(net, np.random.default_rng(0)).prunable())


def default_rates(net: str, rate: float) -> tuple:
    """Frankle & Carbin's schedule from one number ``p``: hidden fully connected layers lose ``p``
    per round; the output layer and convolutional layers lose ``p / 2`` (20/20/10 for LeNet-300-100,
    10/10/20/10 for LeNet-5 at p = 0.2)."""
    layers = prunable_layers(net)
    return tuple((name, rate / 2 if (i == len(layers) - 1 or name.startswith("conv")) else rate)
                 for i, name in enumerate(layers))


# ---------------------------------------------------------------------------------------------------
# presets: per-net recipe settings, plus the plan (nets, strategies, rounds, seeds)

#: Each net's optimiser recipe: used by ``train`` and for a net its preset does not name.
NET_OPTIMIZER = {
    "lenet300": dict(optimizer="adam", lr=1.2e-3, momentum=0.0, batch_size=60),
    "lenet5": dict(optimizer="sgd", lr=0.01, momentum=0.9, batch_size=64),
}
_L300, _L5 = NET_OPTIMIZER["lenet300"], NET_OPTIMIZER["lenet5"]

PRESETS = {
    "default": {
        "about": "a few minutes: both nets, rewind vs reinit, 1 seed, 50% of the hidden-layer weights "
                 "pruned per round (25% of conv/output), 5 rounds, short training",
        "nets": {
            "lenet300": dict(_L300, iterations=1500, eval_every=150, rate=0.5, rounds=5),
            "lenet5": dict(_L5, iterations=600, eval_every=150, rate=0.5, rounds=5),
        },
        "strategies": ["rewind", "reinit"], "seeds": [0],
    },
    "seed": {
        "about": "the founding write-up's schedule: 9% of every layer pruned per round, 25 rounds "
                 "(down to ~9.5% of weights), both nets, 3 seeds, rewind vs reinit and Frankle & Carbin's two "
                 "controls",
        "nets": {
            # 10,000 iterations: the dense net's early stop under this optimiser is 3,800-8,400
            # (docs/results.md, the lth run), so it falls inside the budget
            "lenet300": dict(_L300, iterations=10000, eval_every=250, layer_rate=0.09, rounds=25),
            # 5,000 iterations: the dense net stops at 3,500-3,750 and the rewound tickets' validation
            # loss is flat from ~2,000 on (docs/results.md, the seed run on LeNet-5)
            "lenet5": dict(_L5, iterations=5000, eval_every=250, layer_rate=0.09, rounds=25),
        },
        "strategies": ["rewind", "reinit", "ticket-reinit", "ticket-random-mask"], "seeds": [0, 1, 2],
    },
    "lth": {
        "about": "Frankle & Carbin's LeNet-300-100 recipe: Adam 1.2e-3, batch 60, 50,000 iterations "
                 "per round, 20/20/10% per round, 5,000 validation images, evaluation every 100 "
                 "iterations, 18 rounds (down to ~1.9%), 5 seeds, rewind vs reinit",
        "nets": {"lenet300": dict(_L300, iterations=50000, eval_every=100, rate=0.2, rounds=18)},
        "strategies": ["rewind", "reinit"], "seeds": [0, 1, 2, 3, 4],
    },
    "lenet5": {
        "about": "LeNet-5 (Caffe): SGD momentum 0.9, lr 0.01, batch 64, 5,000 iterations per round, "
                 "conv 10% / fc 20% / output 10% per round, 20 rounds (down to ~1.9%), 3 seeds, "
                 "rewind vs reinit and Frankle & Carbin's two controls",
        "nets": {"lenet5": dict(_L5, iterations=5000, eval_every=250, rate=0.2, rounds=20)},
        "strategies": ["rewind", "reinit", "ticket-reinit", "ticket-random-mask"], "seeds": [0, 1, 2],
    },
}

#: Settings a preset (or a net's optimiser recipe) chooses; their flags default to "the preset's".
PRESET_FIELDS = frozenset(k for p in PRESETS.values() for s in p["nets"].values() for k in s
                          if k in FIELDS) | frozenset(k for s in NET_OPTIMIZER.values() for k in s)


def preset_recipe(preset: str, net: str, overrides: dict | None = None, rate: float | None = None,
                  layer_rates: dict | None = None, rounds: int | None = None) -> tuple[Recipe, int]:
    """``(recipe, rounds)`` of ``net`` under ``preset``, checked.

    ``overrides`` are flat settings that win over the preset's; ``rate`` replaces the preset's
    schedule by :func:`default_rates`; ``layer_rates`` ({layer: rate}) then sets single layers.
    A net the preset does not name takes the preset's first net's settings with its own optimiser
    recipe (:data:`NET_OPTIMIZER`)."""
    p = PRESETS[preset]["nets"]
    base = dict(p.get(net) or next(iter(p.values())))
    if net not in p:
        base.update(NET_OPTIMIZER[net])
    preset_rounds = base.pop("rounds")
    preset_rate, layer_rate = base.pop("rate", None), base.pop("layer_rate", None)
    if rounds is not None:
        check(rounds, f"in [0, {MAX_ROUNDS}]", field_name="rounds")
    if rate is not None:
        check(rate, RATE_RULE, field_name="rate")
        preset_rate, layer_rate = rate, None
    if layer_rate is not None:
        rates = {name: layer_rate for name in prunable_layers(net)}
    else:
        rates = dict(default_rates(net, preset_rate))
    rates.update(layer_rates or {})
    recipe = Recipe().replace(**{**base, **(overrides or {}), "net": net, "rates": tuple(rates.items())})
    recipe.validate()
    return recipe, preset_rounds if rounds is None else rounds
