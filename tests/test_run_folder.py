"""A run folder is believed only where it checks out: every kind of damage, edit or leftover gives
either a correct recomputation (files equal to an undamaged run's) or one line naming the file."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nprune.data.fsutil import (CorruptFileError, atomic_save_npz, load_json, load_npz,
                                remove_stale_temporaries)
from nprune.experiment.cli import main
from nprune.experiment.config import Recipe
from nprune.experiment.imp import IMP
from nprune.experiment.runs import RunFolderError, collect

RECIPE = Recipe.from_dict(dict(net="lenet300", iterations=20, eval_every=10, batch_size=32, lr=2e-3,
                               rates=(("fc1", 0.5), ("fc2", 0.5), ("fc3", 0.25))))
PLAN = dict(seeds=[0], strategies=["rewind", "rewind-to-10"], rounds=3)


def _files(run) -> dict:
    """{relative path: bytes} of a run folder's arrays and JSON files, timings excepted."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.suffix in (".npz", ".json") and p.name != "timing.json"}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """An undamaged run folder (named for its recipe, as the command line names it)."""
    from conftest import synthetic_splits
    out = tmp_path_factory.mktemp("orig")
    run = out / RECIPE.folder_name()
    IMP(RECIPE, run, synthetic_splits()).run(**PLAN)
    return run


@pytest.fixture
def damaged(original, tmp_path):
    run = tmp_path / original.name
    shutil.copytree(original, run, symlinks=True)
    return run


def _rerun(run, synth):
    said = []
    IMP(RECIPE, run, synth, notice=said.append).run(**PLAN)
    return said


def _report(run, capsys):
    code = main(["report", str(run)])
    return code, capsys.readouterr().err


def _truncate(p):
    p.write_bytes(p.read_bytes()[:500])


def _garble(p):
    p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size))


def _flip_one_byte(p):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 1
    p.write_bytes(bytes(b))


def _edit_json(key, value):
    def edit(p):
        m = json.loads(p.read_text())
        m[key] = value
        p.write_text(json.dumps(m))
    return edit


DAMAGE = {
    "deleted final.npz": ("seed_0/rewind/round_2/final.npz", lambda p: p.unlink(), "final.npz is missing"),
    "deleted masks.npz": ("seed_0/rewind/round_1/masks.npz", lambda p: p.unlink(), "masks.npz is missing"),
    "truncated final.npz": ("seed_0/rewind/round_1/final.npz", _truncate, "final.npz differs from the SHA-256"),
    "garbled start.npz": ("seed_0/rewind/round_3/start.npz", _garble, "start.npz differs from the SHA-256"),
    "one bit of final.npz": ("seed_0/dense/final.npz", _flip_one_byte, "final.npz differs from the SHA-256"),
    "{} metrics": ("seed_0/dense/metrics.json", lambda p: p.write_text("{}"), "metrics.json has no valid 'seed'"),
    "list metrics": ("seed_0/rewind/round_2/metrics.json", lambda p: p.write_text("[1, 2]"),
                     "metrics.json holds a list"),
    "tampered seed": ("seed_0/rewind/round_3/metrics.json", _edit_json("seed", 7),
                      "metrics.json says seed 7, rewind round 3, but lies in the folder of seed 0"),
    "tampered round": ("seed_0/rewind-to-10/round_1/metrics.json", _edit_json("round", 2), "says seed 0"),
    "other recipe": ("seed_0/rewind/round_1/metrics.json", _edit_json("recipe_hash", "0123456789"),
                     "metrics.json is of recipe 0123456789"),
    "string accuracy": ("seed_0/rewind/round_1/metrics.json", _edit_json("early_stop_test_acc", "99%"),
                        "has no valid 'early_stop_test_acc'"),
    "broken JSON": ("seed_0/rewind/round_2/metrics.json", lambda p: p.write_text(p.read_text()[:-40]),
                    "metrics.json: not valid JSON"),
    "deeply nested JSON": ("seed_0/dense/metrics.json", lambda p: p.write_text("[" * 100000 + "]" * 100000),
                           "nested too deeply"),
    "not UTF-8": ("seed_0/dense/metrics.json", _garble, "metrics.json: not valid JSON"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damage_is_named_by_report_and_recomputed_by_a_rerun(case, original, damaged, synth, capsys):
    rel, damage, why = DAMAGE[case]
    damage(damaged / rel)
    code, err = _report(damaged, capsys)
    round_dir = rel.rsplit("/", 1)[0]
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("nprune: error: ") and round_dir in err and why in err, err
    said = _rerun(damaged, synth)
    assert len(said) == 1 and round_dir in said[0] and why in said[0], said
    assert _files(damaged) == _files(original)
    assert _report(damaged, capsys)[0] == 0


@pytest.mark.parametrize("name", ["init.npz", "dense/rewind_10.npz", "init.json"])
def test_arrays_outside_rounds_are_checked_and_made_again(name, original, damaged, synth):
    _garble(damaged / "seed_0" / name)
    # a later round that reads them is computed again from scratch: its files must come out the same
    shutil.rmtree(damaged / "seed_0" / "rewind" / "round_3")
    shutil.rmtree(damaged / "seed_0" / "rewind-to-10" / "round_3")
    said = _rerun(damaged, synth)
    assert any("is made again" in s and name.replace(".json", ".npz") in s for s in said), said
    assert _files(damaged) == _files(original)


def test_edited_settings_are_refused_by_report_and_rewritten_by_a_run(original, damaged, synth, capsys):
    s = load_json(damaged / "settings.json")
    s["recipe"]["lr"] = 0.1
    (damaged / "settings.json").write_text(json.dumps(s))
    code, err = _report(damaged, capsys)
    assert code == 1 and err.count("\n") == 1 and "settings.json" in err and "edited?" in err, err
    said = _rerun(damaged, synth)
    assert len(said) == 1 and "settings.json holds another recipe" in said[0]
    assert _files(damaged) == _files(original)


def test_a_folder_of_another_recipe_is_never_overwritten(original, damaged, synth):
    other = RECIPE.replace(lr=1e-3)
    before = _files(damaged)
    with pytest.raises(RunFolderError, match="holds another recipe"):
        IMP(other, damaged, synth).run(**PLAN)
    assert _files(damaged) == before


def test_report_copes_with_a_folder_without_its_dense_round(damaged, capsys):
    shutil.rmtree(damaged / "seed_0" / "dense")
    code, err = _report(damaged, capsys)
    assert code == 0 and err == "", err
    assert "| 1 |" in (damaged / "summary.md").read_text()


def test_no_write_or_read_through_a_symlinked_folder(damaged, tmp_path, synth, capsys):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(damaged / "seed_0" / "rewind" / "round_3", elsewhere)
    os.symlink(elsewhere, damaged / "seed_0" / "rewind" / "round_3")
    (elsewhere / "final.npz").unlink()   # a rerun would write into it if it followed the link
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    with pytest.raises(RunFolderError, match="symbolic link inside the run folder"):
        _rerun(damaged, synth)
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before
    code, err = _report(damaged, capsys)
    assert code == 1 and "symbolic link" in err and err.count("\n") == 1, err


def test_stale_temporaries_of_dead_writers_are_removed(damaged, synth):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = damaged / "seed_0" / "rewind" / f".final.npz.{dead}.k2j4_x.tmp"
    old_style = damaged / "seed_0" / ".init.npz.abc123.tmp"
    live = damaged / "seed_0" / f".init.npz.{os.getpid()}.abc123.tmp"   # a writer still at work
    for p in (stale, old_style, live):
        p.write_bytes(b"half a file")
    _rerun(damaged, synth)
    assert not stale.exists() and not old_style.exists() and live.exists()
    assert remove_stale_temporaries(damaged) == []


def test_npz_and_json_errors_name_the_file_and_never_advise_pickles(tmp_path):
    p = tmp_path / "a.npz"
    p.write_bytes(np.random.default_rng(1).bytes(5000))
    with pytest.raises(CorruptFileError) as e:
        load_npz(p)
    assert str(e.value).startswith(f"{p}: not a readable .npz") and "pickle" not in str(e.value)
    atomic_save_npz(p, {"w": np.arange(1000.0)})
    _flip_one_byte(p)
    with pytest.raises(CorruptFileError, match=f"^{p}: not a readable .npz"):
        load_npz(p)
    j = tmp_path / "a.json"
    j.write_text('{"a": 1,, }')
    with pytest.raises(CorruptFileError, match=f"^{j}: not valid JSON .*line 1 column 9"):
        load_json(j)


def test_a_write_that_fails_names_its_file(tmp_path):
    """Disk full or a file-size limit: the error names the file being written (ulimit -f here)."""
    code = (
        "import resource, sys\n"
        "import numpy as np\n"
        "from nprune.data.fsutil import atomic_save_npz\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "try:\n"
        f"    atomic_save_npz({str(tmp_path / 'big.npz')!r}, {{'w': np.random.default_rng(0).random(10**6)}})\n"
        "except OSError as e:\n"
        "    print(e.filename, e.strerror)\n")
    from conftest import ROOT
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.startswith(str(tmp_path / "big.npz")) and r.returncode == 0, r
    assert not (tmp_path / "big.npz").exists() and list(tmp_path.iterdir()) == []


def test_collect_rejects_rounds_of_mixed_recipes(original, tmp_path, synth):
    run = tmp_path / "unnamed"   # no settings.json and no hash in its name
    IMP(RECIPE, run, synth).run_strategy(0, "rewind", 1)
    IMP(RECIPE.replace(lr=1e-3), run, synth).run_strategy(1, "rewind", 1)
    with pytest.raises(RunFolderError, match="holds rounds of 2 recipes"):
        collect(run)
