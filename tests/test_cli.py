"""The CLI: help, presets, one-line errors with non-zero exit and no traceback, a run end to end
(synthetic data in-process; real MNIST in a subprocess), resume after kill -9, report rebuild, the
train subcommand, flags made from the recipe's settings."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, real_mnist, run_cli, run_files

from nprune.experiment import schedule
from nprune.experiment.cli import RUN_FIELDS, build_parser, main, resolve
from nprune.experiment.flags import flag
from nprune.experiment.config import FIELDS, PRESETS
from nprune.experiment.strategies import STRATEGIES
from nprune.nets import NETS
from nprune.optim import OPTIMIZERS
from nprune.pruning import SCOPES


@pytest.mark.parametrize("args, needle", [
    (["--rounds", "-1"], "--rounds must be in [0, 1000]"),
    (["--rate", "1.5"], "--rate must be in (0, 1)"),
    (["--rate", "0"], "--rate must be in (0, 1)"),
    (["--net", "vgg"], "--net"),
    (["--strategies", "rewind,magic"], "unknown strategy 'magic'"),
    (["--seeds", "x"], "--seeds"),
    (["--iterations", "0"], "--iterations must be in [1, 10000000]"),
    (["--layer-rates", "fc9=0.2"], "no prunable layer fc9"),
    (["--layer-rates", "fc1=2"], "rate for fc1 must be in (0, 1)"),
    (["--jobs", "0"], "--jobs must be in [1, 256]"),
    (["--bogus"], "unrecognized arguments"),
    (["train", "--evals-per-epoch", "0"], "--evals-per-epoch must be >= 1"),
    (["train", "--epochs", "0"], "--epochs must be in [1, 10000]"),
    # every numeric flag is finite and bounded, checked before any training or allocation
    (["--lr", "inf"], "--lr must be > 0, got inf"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--weight-decay", "nan"], "--weight-decay must be in [0, 1), got nan"),
    (["--weight-decay", "-1"], "--weight-decay must be in [0, 1), got -1.0"),
    (["--finetune-lr-factor", "-1"], "--finetune-lr-factor must be in (0, 100], got -1.0"),
    (["--batch-size", "100000000"], "--batch-size must be at most the 55000 training images left"),
    (["--val", "10000", "--batch-size", "50001"], "--batch-size must be at most the 50000 training"),
    (["--iterations", "99999999999"], "--iterations must be in [1, 10000000]"),
    (["--rounds", "100000"], "--rounds must be in [0, 1000]"),
    (["--jobs", "100000"], "--jobs must be in [1, 256]"),
    (["--strategies", "rewind-to-3000", "--iterations", "100"],
     "--strategies: rewind-to-3000 rewinds to iteration 3000, beyond the 100 training iterations"),
    (["--strategies", "rewind,rewind-to-99999999999999"], "rewind-to-99999999999999 rewinds to"),
    (["--layer-rates", "fc1=0.5,fc1=0.9"], "--layer-rates: fc1 is given twice"),
    (["--layer-rates", "=0.5"], "--layer-rates: expected NAME=RATE"),
    (["--out", ""], "--out: give a folder name (it is empty)"),
    (["train", "--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["train", "--epochs", "100000000"], "--epochs must be in [1, 10000]"),
])
def test_flag_errors_are_one_line(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nprune: error:") and needle in err, err
    assert "Traceback" not in err


def test_flag_errors_come_before_any_work(tmp_path, monkeypatch):
    """A bad flag is refused before the data are loaded or a folder is made."""
    import nprune.data.datasets as datasets
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    out = tmp_path / "o"
    for args in (["--finetune-lr-factor", "-1"], ["--strategies", "rewind-to-3000", "--iterations", "10"],
                 ["--batch-size", "100000000"]):
        assert main([*args, "--out", str(out)]) == 2
    assert not out.exists()


def test_out_expands_the_home_folder(monkeypatch, tmp_path):
    from nprune.experiment.flags import _out_folder
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _out_folder("~/runs") == tmp_path / "runs"


def test_errors_from_a_real_process_have_no_traceback(tmp_path):
    r = run_cli("--net", "lenet300", "--rounds", "-3")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = run_cli("--data-dir", str(tmp_path / "nowhere"), "--no-download", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "nowhere" in r.stderr and "train-images-idx3-ubyte" in r.stderr and "does not exist" in r.stderr
    r = run_cli("report", str(tmp_path / "missing"))
    assert r.returncode == 1 and "no such run folder" in r.stderr and "Traceback" not in r.stderr


def test_help_and_presets():
    r = run_cli("--help")
    assert r.returncode == 0 and "--strategies" in r.stdout and "report" in r.stdout
    r = run_cli("presets")
    assert r.returncode == 0 and all(name in r.stdout for name in PRESETS)


def test_presets_resolve_to_the_papers_recipes():
    lth = resolve(build_parser().parse_args(["--preset", "lth"]))
    assert len(lth) == 1
    job = lth[0]
    rec = job["recipe"]
    assert (rec.net, rec.train.optimizer, rec.train.lr, rec.train.batch_size, rec.train.iterations, rec.n_val,
         rec.train.eval_every) \
        == ("lenet300", "adam", 1.2e-3, 60, 50000, 5000, 100)
    assert rec.prune.rates == (("fc1", 0.2), ("fc2", 0.2), ("fc3", 0.1))
    assert job["seeds"] == [0, 1, 2, 3, 4] and job["strategies"] == ["rewind", "reinit"]
    left = (235200 * 0.8 ** job["rounds"] + 30000 * 0.8 ** job["rounds"] + 1000 * 0.9 ** job["rounds"]) / 266200
    assert 0.015 < left < 0.025                       # down to ~1.9% of the weights
    default = resolve(build_parser().parse_args([]))
    assert [j["recipe"].net for j in default] == ["lenet300", "lenet5"]
    assert {"rewind", "reinit"} <= set(default[0]["strategies"])
    seed = resolve(build_parser().parse_args(["--preset", "seed"]))
    assert all(r == 0.09 for _, r in seed[0]["recipe"].prune.rates) and 0.085 < 0.91 ** seed[0]["rounds"] < 0.11
    over = resolve(build_parser().parse_args(["--preset", "lth", "--net", "lenet5", "--rate", "0.3",
                                              "--seeds", "0-2", "--iterations", "7"]))[0]
    assert over["recipe"].net == "lenet5" and over["recipe"].train.optimizer == "sgd"
    assert over["recipe"].train.iterations == 7 and over["seeds"] == [0, 1, 2]
    assert dict(over["recipe"].prune.rates)["fc1"] == 0.3 and dict(over["recipe"].prune.rates)["conv1"] == 0.15


def test_run_end_to_end_in_process(tmp_path, synth, monkeypatch, capsys):
    monkeypatch.setattr(schedule, "_load_data", lambda recipe, d, dl: synth)
    monkeypatch.setattr("nprune.data.datasets.load_dataset", lambda *a, **k: None)
    args = ["--net", "lenet300", "--iterations", "20", "--eval-every", "10", "--rounds", "2",
            "--batch-size", "32", "--out", str(tmp_path)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    run_dirs = list(tmp_path.glob("lenet300-*"))
    assert len(run_dirs) == 1
    run = run_dirs[0]
    for f in ("settings.json", "summary.md", "results.csv", "curves.csv", "accuracy_vs_weights.png",
              "early_stop_vs_weights.png", "curves.png"):
        assert (run / f).exists(), f
    assert str(run / "summary.md") in out
    assert "seed 0 rewind round 2" in err and "eta" in err
    # the same command again trains nothing
    assert main(args) == 0
    assert "0 training iterations to go" in capsys.readouterr().err


def test_kill_9_then_resume_is_bit_identical(tmp_path):
    data = real_mnist()
    args = ["--net", "lenet300", "--strategies", "rewind,reinit", "--rounds", "3", "--iterations",
            "150", "--eval-every", "50", "--val", "1000", "--data-dir", str(data)]
    r = run_cli(*args, "--out", str(tmp_path / "a"), "--quiet")
    assert r.returncode == 0, r.stderr
    # the interrupted run: kill -9 once a few rounds are on disk
    p = subprocess.Popen([sys.executable, "-m", "nprune.experiment", *args, "--out", str(tmp_path / "b")],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    for line in p.stderr:
        if "rewind round 2] done" in line or time.time() - t0 > 120:
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    b = next((tmp_path / "b").glob("lenet300-*"))
    assert not (b / "seed_0" / "reinit" / "round_3" / "metrics.json").exists()
    r = run_cli(*args, "--out", str(tmp_path / "b"), "--quiet")
    assert r.returncode == 0, r.stderr
    a = next((tmp_path / "a").glob("lenet300-*"))
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and not p.name.startswith("."))
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert files_a == files_b
    assert run_files(a) == run_files(b)   # arrays, JSON and CSV files, timings excepted


# ---------------------------------------------------------------------------------------------------
# --kernel auto (the default): thresholds saved in the run folder, reused on resume, one-line errors

def _table(value):
    from nprune.kernels import thresholds
    return {"format": thresholds.THRESHOLDS_FORMAT, "thresholds": {
        k: {c: {m: value for m in thresholds.AUTO_MODES} for c in thresholds.BATCH_CLASSES}
        for k in ("Dense 784x300", "Dense 300x100", "Dense 100x10")}}


def test_kernel_auto_is_the_default():
    assert build_parser().parse_args([]).kernel == "auto"
    assert build_parser().parse_args(["--kernel", "dense"]).kernel == "dense"


def test_auto_thresholds_saved_in_run_folder_and_reused_on_resume(tmp_path, synth, monkeypatch):
    import json
    monkeypatch.setattr(schedule, "_load_data", lambda recipe, d, dl: synth)
    monkeypatch.setattr("nprune.data.datasets.load_dataset", lambda *a, **k: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    user = tmp_path / "xdg" / "nprune" / "kernel_thresholds.json"
    user.parent.mkdir(parents=True)
    user.write_text(json.dumps(_table(0.6)))     # sparse kernels for fc layers at <= 60% density
    base = ["--net", "lenet300", "--iterations", "20", "--eval-every", "10", "--batch-size", "32",
            "--rate", "0.9", "--strategies", "rewind", "--quiet"]
    # (round 2, fc1 at 1%: the kernel's CSR mode, whose float32 bits differ from dense; at 10% and
    # above its cost model picks the compact mode, whose full live block is exactly the dense GEMM)
    assert main(base + ["--rounds", "2", "--out", str(tmp_path / "a")]) == 0      # default: auto
    a = next((tmp_path / "a").glob("lenet300-*"))
    saved = json.loads((a / "kernel_thresholds.json").read_text())
    assert saved["thresholds"] == _table(0.6)["thresholds"] and saved["source"] == str(user)
    # b: round 1, then the user recalibrates (now: never the kernel), then the run is resumed: it
    # keeps the folder's saved table, so its files equal a's byte for byte
    assert main(base + ["--rounds", "1", "--out", str(tmp_path / "b")]) == 0
    user.write_text(json.dumps(_table(None)))
    assert main(base + ["--rounds", "2", "--out", str(tmp_path / "b")]) == 0
    b = next((tmp_path / "b").glob("lenet300-*"))
    assert b.name == a.name                      # the kernel is not part of the recipe hash
    assert run_files(a) == run_files(b)
    # c: a fresh folder with the new table runs dense: other float32 bits in round 2 (so the saved
    # table is what made b equal to a)
    assert main(base + ["--rounds", "2", "--out", str(tmp_path / "c")]) == 0
    c = next((tmp_path / "c").glob("lenet300-*"))
    rel = Path("seed_0", "rewind", "round_2", "final.npz")
    assert (c / rel).read_bytes() != (a / rel).read_bytes()
    assert (c / "seed_0" / "dense" / "final.npz").read_bytes() == \
        (a / "seed_0" / "dense" / "final.npz").read_bytes()      # 100% density: dense either way


def test_malformed_thresholds_file_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    bad = tmp_path / "xdg" / "nprune" / "kernel_thresholds.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{oops")
    out = tmp_path / "o"
    args = ["--net", "lenet300", "--out", str(out), "--data-dir", str(tmp_path / "nowhere"),
            "--no-download"]
    assert main(args) == 2                                        # reported before the data
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nprune: error: kernel thresholds file")
    assert str(bad) in err and "not valid JSON" in err and "Traceback" not in err
    assert not out.exists()
    r = run_cli(*args, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert str(bad) in r.stderr
    # a run folder's saved table is checked too (and wins over the user's file)
    bad.unlink()
    rec = resolve(build_parser().parse_args(args))[0]["recipe"]
    saved = out / rec.folder_name() / "kernel_thresholds.json"
    saved.parent.mkdir(parents=True)
    saved.write_text('{"format": "nprune-kernel-thresholds/1", "thresholds": {"Dense 784x300": 3}}')
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(saved) in err and "'Dense 784x300'" in err


def test_train_several_seeds_prints_a_mean_and_writes_json(tmp_path, capsys, monkeypatch):
    """``train --seeds`` runs each seed, ends with a per-seed table and its mean, and ``--json``
    keeps every run's curves and early-stop figures; one seed alone gives the same run as --seed."""
    import json
    import nprune.data.datasets
    from conftest import write_tiny_dataset
    data = write_tiny_dataset(tmp_path / "d", n_train=300, n_test=40)
    real = nprune.data.datasets.load_dataset     # the tiny files are not the canonical MNIST payloads
    monkeypatch.setattr(nprune.data.datasets, "load_dataset", lambda *a, **k: real(*a, **dict(k, verify=False)))
    common = ["train", "--data-dir", str(data), "--no-download", "--val", "60", "--batch-size", "40",
              "--epochs", "2", "--evals-per-epoch", "2", "--kernel", "dense"]
    out = tmp_path / "runs.json"
    assert main(common + ["--seeds", "0,2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "seed 0:" in text and "seed 2:" in text and "**mean of 2**" in text
    # each run ends with the early stop first; no maximum over the test evaluations
    ends = [ln for ln in text.splitlines() if "min val loss" in ln]
    assert len(ends) == 2 and all(ln.startswith("early stop (min val loss, iteration ") for ln in ends)
    assert "best test" not in text and "max test" not in text
    rec = json.loads(out.read_text())
    assert [r["seed"] for r in rec["runs"]] == [0, 2] and rec["steps_per_epoch"] == 6
    r0 = rec["runs"][0]["result"]
    assert len(r0["val_loss"]) == 4 and r0["early_stop_val_loss"] == min(r0["val_loss"])
    i = r0["iterations"].index(r0["early_stop_iter"])
    assert r0["early_stop_test_acc"] == r0["test_acc"][i]          # test read at the val minimum
    mean = sum(r["result"]["early_stop_test_acc"] for r in rec["runs"]) / 2
    assert f"**{100 * mean:.2f}**" in text
    # the same seed alone (--seed) reproduces the first run exactly
    single = tmp_path / "one.json"
    assert main(common + ["--seed", "0", "--json", str(single)]) == 0
    assert json.loads(single.read_text())["runs"][0]["result"]["val_loss"] == r0["val_loss"]


@pytest.mark.parametrize("where, needle", [("nowhere/x.json", "does not exist"), (".", "is a folder")])
def test_train_json_path_is_checked_before_training(tmp_path, capsys, where, needle):
    assert main(["train", "--json", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--json" in err and needle in err


# ---------------------------------------------------------------------------------------------------
# flags made from the recipe's settings; the folder names of existing runs

def test_every_recipe_setting_has_one_flag_with_its_help_and_choices():
    p = build_parser()
    actions = {a.dest: a for a in p._actions}
    for name in RUN_FIELDS:
        a = actions[name]
        assert a.option_strings == [flag(name)] and a.help.startswith(FIELDS[name].meta["help"])
        assert a.choices == FIELDS[name].meta.get("choices")
    assert flag("n_val") == "--val" and flag("rates") == "--layer-rates" and flag("rounds") == "--rounds"
    assert set(actions["scope"].choices) == set(SCOPES) and set(actions["optimizer"].choices) == set(OPTIMIZERS)
    assert set(actions["net"].choices) == set(NETS) | {"both"}
    assert all(name in actions["strategies"].help for name in STRATEGIES)
    args = p.parse_args([])
    assert args.lr is None and args.iterations is None          # the preset's
    assert args.init == "glorot_normal" and args.n_val == 5000 and args.dataset == "mnist"


@pytest.mark.parametrize("argv, names", [
    ([], ["lenet300-6bb87241f2", "lenet5-328f248623"]),
    (["--net", "lenet300", "--iterations", "300", "--eval-every", "100", "--rounds", "4", "--seeds", "2",
      "--scope", "global", "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05"], ["lenet300-63ab814477"]),
    (["--preset", "seed"], ["lenet300-c19a5bae46", "lenet5-27e5041e4f"]),
    (["--preset", "lth", "--net", "lenet5", "--rate", "0.3", "--layer-rates", "fc1=0.25", "--val", "1000",
      "--init", "he_normal", "--weight-decay", "1e-4", "--finetune-lr-factor", "0.2",
      "--dataset", "fashion-mnist"], ["lenet5-7b2b1ef95f"]),
])
def test_commands_find_their_existing_run_folders(argv, names):
    assert [j["recipe"].folder_name() for j in resolve(build_parser().parse_args(argv))] == names


@pytest.mark.parametrize("args, message", [
    (["--val", "60000"], "--val must be in [0, 60000), got 60000"),
    (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    (["--eval-every", "-1"], "--eval-every must be >= 0, got -1"),
    (["--net", "lenet300", "--layer-rates", "conv1=0.2"],
     "--layer-rates: lenet300 has no prunable layer conv1 (it has fc1, fc2, fc3)"),
    (["train", "--batch-size", "0"], "--batch-size must be > 0, got 0"),
    (["train", "--net", "lenet5", "--lr", "-1"], "--lr must be > 0, got -1.0"),
])
def test_setting_errors_name_the_flag(args, message, capsys):
    assert main(args) == 2
    assert capsys.readouterr().err == f"nprune: error: {message}\n"


# ---------------------------------------------------------------------------------------------------
# subcommands and their help; --seeds bounds; the whole command's ETA; what a run prints last

from nprune.experiment.cli import COMMANDS, build_main_parser  # noqa: E402
from nprune.experiment.flags import MAX_SEEDS  # noqa: E402


def test_every_command_is_in_the_usage_line_and_listed_once(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    usage = out[:out.index("\n\n")]
    for name, about in COMMANDS.items():
        assert name in usage, name
        assert sum(line.startswith(f"    {name} ") for line in out.splitlines()) == 1, name
    assert "--strategies" in out and "--plot-format" in out          # run's flags follow


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS if c not in ("calibrate", "show"))])
def test_no_help_says_default_none(command):
    top = build_main_parser()
    texts = [top.format_help()] + [p.format_help() for p in top.commands.values()]
    if command:
        texts = [top.commands[command[0]].format_help()]
    for text in texts:
        flat = " ".join(text.split())
        assert "(default: None)" not in flat and "default: None" not in flat, text
    for p in top.commands.values():
        for a in p._actions:
            assert a.help, (p.prog, a.dest)


def test_default_command_is_run_and_kernel_commands_delegate():
    r = run_cli("--preset", "seed", "--jobs", "2", "--net", "lenet300", "--rounds", "-1")
    assert r.returncode == 2 and "--rounds must be in [0, 1000]" in r.stderr       # parsed as run flags
    r = run_cli("show")
    assert r.returncode == 0 and "source:" in r.stdout, r.stderr
    r = run_cli("calibrate", "--help")
    assert r.returncode == 0 and "--quick" in r.stdout


@pytest.mark.parametrize("text", ["0", "-1", "x", "3-1", "0-20000000", "10000000000000000000000",
                                  "4294967296", "0-9999,20000-29999", "9" * 5000])
def test_bad_seeds_are_one_line_with_the_forms(text, capsys):
    t0 = time.perf_counter()
    assert main(["--seeds", text, "--net", "lenet300"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--seeds must be a count >= 1 (e.g. 3 for seeds 0,1,2), a list (0,3,7) or a range (4-4" in err
    assert time.perf_counter() - t0 < 2                                # no list of millions first


def test_good_seeds():
    p = build_parser()
    assert resolve(p.parse_args(["--seeds", "4"]))[0]["seeds"] == [0, 1, 2, 3]
    assert resolve(p.parse_args(["--seeds", "4-4,0"]))[0]["seeds"] == [0, 4]
    assert len(resolve(p.parse_args(["--seeds", str(MAX_SEEDS)]))[0]["seeds"]) == MAX_SEEDS
    assert resolve(p.parse_args(["--seeds", "4294967295-4294967295"]))[0]["seeds"] == [4294967295]


def test_one_clock_counts_every_net_of_the_command(tmp_path, monkeypatch):
    """The default run does both nets: the clock its progress lines share counts the iterations
    of both (seeds x (dense + strategies x rounds) each)."""
    from nprune.experiment import cli
    seen = []

    def fake_run_job(job, out, *rest):
        seen.append((job, rest[-1]))
        return tmp_path
    monkeypatch.setattr(cli, "run_job", fake_run_job)
    monkeypatch.setattr(cli, "write_report", lambda d, **k: {"files": [], "diverged": []})
    monkeypatch.setattr("nprune.data.datasets.load_dataset", lambda *a, **k: None)
    assert main(["--seeds", "2", "--out", str(tmp_path), "--quiet"]) == 0
    assert [j["recipe"].net for j, _ in seen] == ["lenet300", "lenet5"]
    clock = seen[0][1]
    assert seen[1][1] is clock
    assert clock.total == sum(2 * (1 + len(j["strategies"]) * j["rounds"]) * j["recipe"].train.iterations
                              for j, _ in seen)


TINY_RUN = ["--net", "lenet300", "--iterations", "20", "--eval-every", "10", "--rounds", "1",
            "--seeds", "1", "--val", "100", "--strategies", "rewind"]


def test_a_run_ends_with_the_paths_and_prints_tables_only_when_asked(tmp_path):
    args = [*TINY_RUN, "--data-dir", str(real_mnist()), "--out", str(tmp_path)]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    run = next(tmp_path.glob("lenet300-*"))
    lines = r.stdout.splitlines()
    plots = sorted(str(p) for p in run.glob("*.png"))
    assert lines[0] == str(run / "summary.md") and sorted(lines[1:]) == plots and len(plots) == 4
    assert "|" not in r.stdout and "finished in" in r.stderr
    r = run_cli(*args, "--print-tables", "--quiet")                      # resumes: nothing to train
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith((run / "summary.md").read_text())
    assert r.stdout.splitlines()[-5:] == lines


@pytest.mark.parametrize("bad", ["gif", "png,", "png,jpg", ","])
def test_bad_plot_format_is_one_line(bad, capsys):
    if bad == "png,":
        assert build_parser().parse_args(["--plot-format", bad]).plot_format == "png"
        return
    assert main(["--plot-format", bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plot-format must be png, svg, pdf" in err


def test_plot_format_reaches_write_report(tmp_path, synth, monkeypatch):
    monkeypatch.setattr(schedule, "_load_data", lambda recipe, d, dl: synth)
    monkeypatch.setattr("nprune.data.datasets.load_dataset", lambda *a, **k: None)
    assert main([*TINY_RUN, "--batch-size", "32", "--out", str(tmp_path), "--quiet",
                 "--plot-format", "svg,pdf"]) == 0
    run = next(tmp_path.glob("lenet300-*"))
    assert list(run.glob("*.svg")) and list(run.glob("*.pdf"))


def test_a_folder_of_the_other_data_set_names_both(tmp_path):
    src = real_mnist()
    fake = tmp_path / "fashion"
    fake.mkdir()
    for f in src.iterdir():
        if "idx" in f.name:
            (fake / f.name).symlink_to(f)
    for how in (["--data-dir", str(fake)], []):
        r = run_cli("--dataset", "fashion-mnist", "--net", "lenet300", "--no-download", *how,
                    "--out", str(tmp_path / "o"), env={"NPRUNE_DATA_DIR": str(fake)})
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert "holds mnist, not fashion-mnist" in r.stderr and "verify" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_a_diverged_run_exits_3_with_one_line_naming_the_chain(tmp_path):
    """--lr 1e6 blows Adam up to a finite but huge loss: the divergence rule catches it, the summary
    marks it and the command ends with exit status 3 and one line."""
    real_mnist()
    r = run_cli("--net", "lenet300", "--lr", "1e6", "--iterations", "300", "--eval-every", "100",
                "--rounds", "1", "--seeds", "1", "--strategies", "rewind", "--val", "1000",
                "--kernel", "dense", "--quiet", "--out", str(tmp_path))
    assert r.returncode == 3, r.stderr
    assert r.stderr.splitlines()[-1].startswith("nprune: diverged: lenet300 seed 0 dense round 0")
    assert "Traceback" not in r.stderr
    run = next(tmp_path.glob("lenet300-*"))
    assert "diverged" in (run / "summary.md").read_text()
    assert "True" in (run / "results.csv").read_text().splitlines()[1]


def test_a_deleted_round_file_is_recomputed_when_the_run_is_extended(tmp_path):
    """The command line's resume: a round whose final.npz is gone is computed again, with one line,
    before the next round is added; the summary has every row."""
    real_mnist()
    args = ["--net", "lenet300", "--iterations", "100", "--eval-every", "50", "--seeds", "1",
            "--strategies", "rewind", "--val", "1000", "--kernel", "dense", "--quiet", "--out", str(tmp_path)]
    assert run_cli(*args, "--rounds", "2").returncode == 0
    run = next(tmp_path.glob("lenet300-*"))
    (run / "seed_0" / "rewind" / "round_2" / "final.npz").unlink()
    r = run_cli(*args, "--rounds", "3")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["nprune: seed_0/rewind/round_2 is not finished (final.npz is "
                                     "missing); it is computed again"]
    assert (run / "seed_0" / "rewind" / "round_3" / "metrics.json").exists()
    table = (run / "summary.md").read_text().split("## Training time")[0]
    assert all(f"| {k} |" in table for k in range(4))


def test_test_every_reaches_the_recipe_without_changing_its_folder(capsys):
    base = ["--net", "lenet300", "--eval-every", "100"]
    plain, = resolve(build_parser().parse_args(base))
    every, = resolve(build_parser().parse_args([*base, "--test-every", "200"]))
    assert plain["recipe"].train.test_every == 0 and every["recipe"].train.test_every == 200
    assert plain["recipe"].folder_name() == every["recipe"].folder_name()
    assert main([*base, "--test-every", "150"]) == 2
    assert capsys.readouterr().err == ("nprune: error: --test-every must be 0 or a multiple of the "
                                       "evaluation interval (100), got 150\n")
