"""Run folders: the layout, settings.json, collecting finished rounds, the stable hash."""
from nprune.data.fsutil import atomic_write_json, load_json
from nprune.experiment.runs import RunFolder, collect, json_ready, stable_hash


def test_layout_and_finished_rounds(tmp_path):
    run = RunFolder(tmp_path / "lenet300-abc")
    assert run.round_dir(3, "rewind", 0) == tmp_path / "lenet300-abc" / "seed_3" / "dense"
    assert run.round_dir(3, "rewind", 2) == tmp_path / "lenet300-abc" / "seed_3" / "rewind" / "round_2"
    assert not run.is_done(3, "rewind", 2)
    for strategy, r in (("dense", 0), ("rewind", 1), ("reinit", 1), ("rewind", 2)):
        atomic_write_json(run.round_dir(3, strategy, r) / "metrics.json",
                          {"seed": 3, "strategy": strategy, "round": r})
    atomic_write_json(run.round_dir(1, "dense", 0) / "metrics.json", {"seed": 1, "strategy": "dense", "round": 0})
    assert run.is_done(3, "rewind", 2) and run.metrics(3, "rewind", 2)["round"] == 2
    assert [(m["seed"], m["strategy"], m["round"]) for m in collect(run.dir)] == [
        (1, "dense", 0), (3, "dense", 0), (3, "reinit", 1), (3, "rewind", 1), (3, "rewind", 2)]


def test_settings(tmp_path):
    run = RunFolder(tmp_path)
    assert run.settings() is None
    run.write_settings({"net": "lenet300"}, {"seeds": [0]})
    assert run.settings() == load_json(tmp_path / "settings.json") == {
        "recipe": {"net": "lenet300"}, "hash_covers": "recipe only", "last_plan": {"seeds": [0]}}


def test_stable_hash_ignores_key_order_and_tuples():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": (1, 2), "a": 1}) == "8baa731984"   # pinned with the code that named the existing folders
    assert json_ready({"r": (("fc1", 0.2),)}) == {"r": [["fc1", 0.2]]}
