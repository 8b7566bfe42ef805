"""The recipe: its flat view and run-folder hash (pinned: existing run folders must be found), its
checks, the presets' schedules."""
import pytest

from nprune.experiment.config import (FIELDS, PRESET_FIELDS, ConfigError, Recipe, check, default_rates,
                                      preset_recipe, satisfies)
from nprune.pruning import SCOPES


def test_default_rates_follow_frankle_carbin():
    assert default_rates("lenet300", 0.2) == (("fc1", 0.2), ("fc2", 0.2), ("fc3", 0.1))
    assert default_rates("lenet5", 0.2) == (("conv1", 0.1), ("conv2", 0.1), ("fc1", 0.2), ("fc2", 0.1))


def test_recipe_hash_is_stable_and_ignores_plan():
    a = Recipe()
    assert a.folder_name() == Recipe().folder_name()
    assert a.folder_name() != a.replace(lr=1e-3).folder_name()
    with pytest.raises(ValueError):
        a.replace(rates=(("fc1", 1.5),)).validate()
    with pytest.raises(ValueError):
        a.replace(net="vgg").validate()


# Frozen values: a recipe that hashes differently would start a new run folder instead of resuming
# the existing one, so changing them renames every run folder.
DEFAULT_FLAT = {"net": "lenet300", "dataset": "mnist", "init": "glorot_normal", "optimizer": "adam",
                "lr": 0.0012, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 60,
                "iterations": 2000, "eval_every": 100, "n_val": 5000,
                "rates": [["fc1", 0.2], ["fc2", 0.2], ["fc3", 0.1]], "scope": "layer",
                "finetune_lr_factor": 0.1}
OTHER_FLAT = {"net": "lenet5", "dataset": "fashion-mnist", "init": "he_normal", "optimizer": "sgd",
              "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0001, "batch_size": 64, "iterations": 300,
              "eval_every": 0, "n_val": 0,
              "rates": [["conv1", 0.1], ["conv2", 0.1], ["fc1", 0.2], ["fc2", 0.1]], "scope": "global",
              "finetune_lr_factor": 0.5}


def test_default_recipe_keeps_its_flat_view_and_folder_name():
    r = Recipe()
    flat = r.to_dict()
    assert flat == DEFAULT_FLAT and list(flat) == list(DEFAULT_FLAT)
    assert [type(v) for v in flat.values()] == [type(v) for v in DEFAULT_FLAT.values()]
    assert r.folder_name() == "lenet300-52baf6e020"


def test_other_recipe_keeps_its_flat_view_and_folder_name():
    r = Recipe.from_dict(OTHER_FLAT)
    r.validate()
    assert r.to_dict() == OTHER_FLAT and list(r.to_dict()) == list(OTHER_FLAT)
    assert r.folder_name() == "lenet5-cae1b7f79e"
    assert Recipe.from_dict(r.to_dict()) == r                  # settings.json gives the recipe back
    assert (r.train.optimizer, r.prune.scope, r.n_val) == ("sgd", "global", 0)


def test_flat_fields_are_the_recipes_settings_once():
    assert list(FIELDS) == list(DEFAULT_FLAT)
    assert FIELDS["lr"].section == "train" and FIELDS["rates"].section == "prune"
    assert FIELDS["net"].section is None and FIELDS["lr"].type is float
    assert "eval_batch" not in FIELDS                          # memory, not numbers: not hashed
    assert FIELDS["scope"].meta["choices"] == SCOPES
    with pytest.raises(ConfigError, match="unknown recipe setting 'eval_batch'"):
        Recipe().replace(eval_batch=10)


@pytest.mark.parametrize("changes, message", [
    (dict(iterations=0), "iterations must be in [1, 10000000], got 0"),
    (dict(batch_size=-1), "batch_size must be > 0, got -1"),
    (dict(eval_every=-1), "eval_every must be >= 0, got -1"),
    (dict(lr=0.0), "lr must be > 0, got 0.0"),
    (dict(lr=float("nan")), "lr must be > 0, got nan"),
    (dict(momentum=1.0), "momentum must be in [0, 1), got 1.0"),
    (dict(n_val=60000), "n_val must be in [0, 60000), got 60000"),
    (dict(rates=(("fc1", 0.0),)), "rate for fc1 must be in (0, 1), got 0.0"),
    (dict(rates=(("fc9", 0.2),)), "rates: lenet300 has no prunable layer fc9 (it has fc1, fc2, fc3)"),
    (dict(scope="everywhere"), "unknown scope 'everywhere'; choose from layer, global, random"),
    (dict(optimizer="rmsprop"), "unknown optimizer 'rmsprop'; choose from adam, sgd"),
])
def test_validation_messages_name_the_setting(changes, message):
    with pytest.raises(ConfigError) as e:
        Recipe().replace(**changes).validate()
    assert str(e.value) == message
    assert e.value.field == next(iter(changes))


def test_rules():
    assert satisfies(0.5, "in (0, 1)") and not satisfies(0, "in (0, 1)") and not satisfies(1, "in (0, 1)")
    assert satisfies(0, "in [0, 1)") and not satisfies(1, "in [0, 1)") and satisfies(1, "in [0, 1]")
    assert satisfies(0, ">= 0") and not satisfies(0, "> 0") and not satisfies(float("nan"), "> 0")
    with pytest.raises(ConfigError, match="^--jobs must be >= 1, got 0$"):
        check(0, ">= 1", "--jobs")


def test_preset_recipe_schedules():
    r, rounds = preset_recipe("default", "lenet5")
    assert rounds == 5 and r.train.optimizer == "sgd" and r.train.iterations == 600
    assert r.prune.rates == default_rates("lenet5", 0.5)
    r, rounds = preset_recipe("lth", "lenet5", {"iterations": 7}, rate=0.3, layer_rates={"fc1": 0.25},
                              rounds=2)
    assert rounds == 2 and r.train.optimizer == "sgd" and r.train.iterations == 7      # lenet5's optimiser
    assert dict(r.prune.rates) == {"conv1": 0.15, "conv2": 0.15, "fc1": 0.25, "fc2": 0.15}
    r, _ = preset_recipe("seed", "lenet300")
    assert dict(r.prune.rates) == {"fc1": 0.09, "fc2": 0.09, "fc3": 0.09}
    with pytest.raises(ConfigError, match=r"rounds must be in \[0, 1000\]"):
        preset_recipe("default", "lenet300", rounds=-1)
    assert PRESET_FIELDS == {"optimizer", "lr", "momentum", "batch_size", "iterations", "eval_every"}
