"""Run folders: the layout, settings.json, collecting finished rounds, the stable hash."""
from nprune.data.fsutil import atomic_write_json, load_json
from nprune.experiment.runs import RunFolder, json_ready, stable_hash


def test_layout_and_unverified_rounds(tmp_path):
    run = RunFolder(tmp_path / "lenet300-abc")
    assert run.round_dir(3, "rewind", 0) == tmp_path / "lenet300-abc" / "seed_3" / "dense"
    assert run.round_dir(3, "rewind", 2) == tmp_path / "lenet300-abc" / "seed_3" / "rewind" / "round_2"
    assert not run.is_done(3, "rewind", 2) and run.check_round(3, "rewind", 2) == (None, None)
    # metrics.json alone, without its digests and recipe, is not a finished round
    atomic_write_json(run.round_dir(3, "rewind", 2) / "metrics.json", {"seed": 3, "strategy": "rewind", "round": 2})
    fresh = RunFolder(tmp_path / "lenet300-abc")
    assert not fresh.is_done(3, "rewind", 2)
    assert fresh.check_round(3, "rewind", 2) == (None, "metrics.json has no valid 'percent_left'")


def test_settings(tmp_path):
    run = RunFolder(tmp_path)
    assert run.settings() is None
    run.write_settings({"net": "lenet300"}, {"seeds": [0]})
    assert run.settings() == load_json(tmp_path / "settings.json") == {
        "recipe": {"net": "lenet300"}, "hash_covers": "recipe only", "last_plan": {"seeds": [0]}}


def test_stable_hash_ignores_key_order_and_tuples():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": (1, 2), "a": 1}) == "8baa731984"   # pinned with the code that named the existing folders
    assert json_ready({"r": (("fc1", 0.2),)}) == {"r": [["fc1", 0.2]]}
