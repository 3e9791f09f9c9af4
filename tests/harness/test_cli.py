"""The ``auxgen`` command line (``auxgen/cli.py``, ``auxgen/cli_parser.py``)."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, rank_logs, torchrun_cmd

from auxgen.cli import build_parser, main, run_config


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _auxgen(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "auxgen", *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_demo_smoke_writes_everything(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = _auxgen("demo", "--smoke", "--seeds", "2", "--out", str(out), "--no-progress")
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    for name in ("results.json", "results.md", "accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("maxl-copy_aux_spread.png", "maxl-copy_aux_examples.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in res["summary"]]
    assert labels == [
        "single", "human", "random", "kmeans", "maxl-copy", "transform", "transform-joint"
    ]  # fmt: skip
    assert all(len(r["seeds"]) == 2 for r in res["summary"])
    assert "| maxl-copy |" in (out / "results.md").read_text()
    assert "test accuracy (%)" in stdout and "NMI" in stdout and "maxl-copy" in stdout
    assert "Traceback" not in stderr


def test_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    """Missing / malformed data dir and unknown backbone, as real processes (``-m auxgen``)."""
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    broken = tmp_path / "broken"
    (broken / "cifar-100-python").mkdir(parents=True)
    (broken / "cifar-100-python" / "train").write_bytes(b"this is not a pickle")
    (broken / "cifar-100-python" / "test").write_bytes(b"neither is this")
    cases = {
        "does not exist": ["--dataset", "cifar100", "--data-dir", str(tmp_path / "nope")],
        "is not a directory": ["--dataset", "cifar100", "--data-dir", str(not_a_dir)],
        "not a valid CIFAR pickle": ["--dataset", "cifar100", "--data-dir", str(broken)],
        "unknown backbone 'resnet9000'": ["--dataset", "digits", "--backbone", "resnet9000"],
    }
    procs = {
        msg: _auxgen("run", *args, "--out", str(tmp_path / "o")) for msg, args in cases.items()
    }
    for msg, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (msg, stderr)
        assert "Traceback" not in stderr, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert lines[0].startswith("auxgen: error: ") and msg in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--dataset", "cifar100", "--psi", "5", "5", "5"], "psi has 3 entries"),
        (["--dataset", "cifar100", "--primary-level", "7"], "primary_level"),
        (["--dataset", "cifar100", "--primary-level", "20", "--aux-level", "10"], "aux_level"),
        (["--dataset", "digits", "--primary-level", "3"], "2 primary classes"),
        (["--dataset", "digits", "--method", "human", "--psi", "2", "8"], "hierarchy's psi"),
        (["--dataset", "cifar10", "--method", "human"], "hierarchy"),
        (["--dataset", "digits", "--method", "maxl-large"], "unknown method"),
        (["--dataset", "imagenet"], "invalid choice"),
        (["--dataset", "digits", "--epochs", "0"], "positive integer"),
        (["--dataset", "digits", "--confidence-weight", "-1"], "non-negative number"),
        (["--dataset", "digits", "--gen-optimizer", "lbfgs"], "invalid choice"),
        (["--dataset", "digits", "--method", "human", "--aux-label-noise", "2"], "fraction in"),
        (["--dataset", "digits", "--aux-label-noise", "0.5"], "got method 'maxl'"),
    ],
)
def test_bad_input_in_process(args: list[str], msg: str, tmp_path: Path, capsys) -> None:
    data_dir = ["--data-dir", str(tmp_path)] if "cifar" in args[1] else []
    try:
        code = main(["run", *args, *data_dir, "--out", str(tmp_path / "o")])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and msg in err[0], err


def test_run_digits_several_methods_and_seeds(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["run", "--dataset", "digits", "--methods", "single", "maxl-head", "random"]
    argv += ["--seeds", "0", "1", "--smoke", "--threads", "1", "--no-progress", "-q"]
    assert main([*argv, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "maxl-head" in stdout and "random" in stdout
    res = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in res["summary"]] == ["single", "maxl-head", "random"]
    assert res["seeds"] == [0, 1] and len(res["runs"]) == 6
    assert (out / "maxl-head" / "seed1" / "checkpoint.pt").is_file()
    assert (out / "accuracy.png").is_file() and (out / "results.md").is_file()


def _exit_code_and_stderr(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def _usage_error(option: str, expected: str, got: str, command: str = "run") -> str:
    """The regex of argparse's one-line error for ``option``."""
    return (
        rf"auxgen: error: argument {re.escape(option)}: {re.escape(expected)}, got "
        rf"'{re.escape(got)}' \(see auxgen {command} --help\)"
    )


COUNT = "expected a positive number of training images per fine class, a fraction in (0, 1) "
COUNT += "such as 0.05 or 5%, or 'all'"
FRACTION = "expected a fraction of each fine class in (0, 1) such as 0.05 or 5% ('all' for the "
FRACTION += "whole training set)"
TOO_MANY = (
    r"auxgen: error: train_subset must be at most 122 images per fine class \(the smallest fine "
    r"class of the digits training set has 122\), a fraction in \(0, 1\) or the whole training "
    r"set, got {}"
)

POSITIVE_INT = "expected a positive integer"
POSITIVE = "expected a positive number"
NON_NEGATIVE = "expected a non-negative number"
SEED = "expected a non-negative integer"
BATCH = "expected an integer of at least 2 (BatchNorm needs 2 samples a batch)"
UP_TO_09 = "expected a fraction in [0, 0.9]"
MOMENTUM = "expected a momentum in [0, 1)"

#: (arguments, the option the message names, what it expects); the last argument is named
#: as what was given.
USAGE_RUN = [
    (["--train-subset", "0"], "--train-subset", COUNT),
    (["--train-subset", "-3"], "--train-subset", COUNT),
    (["--train-subset", "ten"], "--train-subset", COUNT),
    (["--train-subset", "0.0"], "--train-subset", FRACTION),
    (["--train-subset", "-0.05"], "--train-subset", FRACTION),
    (["--train-subset", "1.0"], "--train-subset", FRACTION),
    (["--train-subset", "1.5"], "--train-subset", FRACTION),
    (["--train-subset", "0%"], "--train-subset", FRACTION),
    (["--train-subset", "100%"], "--train-subset", FRACTION),
    (["--epochs", "0"], "--epochs", POSITIVE_INT),
    (["--width", "0"], "--width", POSITIVE_INT),
    (["--meta-every", "0"], "--meta-every", POSITIVE_INT),
    (["--test-limit", "0"], "--test-limit", POSITIVE_INT),
    (["--eval-subset", "-1"], "--eval-subset", POSITIVE_INT),
    (["--threads", "0"], "--threads", POSITIVE_INT),
    (["--psi", "0"], "--psi", POSITIVE_INT),
    (["--batch-size", "0"], "--batch-size", BATCH),
    (["--batch-size", "1"], "--batch-size", BATCH),
    (["--val-fraction", "1.5"], "--val-fraction", UP_TO_09),
    (["--val-fraction", "0.95"], "--val-fraction", UP_TO_09),
    (["--val-fraction", "-0.1"], "--val-fraction", UP_TO_09),
    (["--meta-fraction", "1"], "--meta-fraction", UP_TO_09),
    (["--aux-label-noise", "1.5"], "--aux-label-noise", "expected a fraction in [0, 1]"),
    (["--lr", "0"], "--lr", POSITIVE),
    (["--lr", "nan"], "--lr", POSITIVE),
    (["--gen-lr", "-1"], "--gen-lr", POSITIVE),
    (["--label-temperature", "0"], "--label-temperature", POSITIVE),
    (["--dist-timeout", "0"], "--dist-timeout", POSITIVE),
    (["--momentum", "1"], "--momentum", MOMENTUM),
    (["--momentum", "-0.5"], "--momentum", MOMENTUM),
    (["--weight-decay", "-1"], "--weight-decay", NON_NEGATIVE),
    (["--gen-weight-decay", "inf"], "--gen-weight-decay", NON_NEGATIVE),
    (["--aux-weight", "-0.5"], "--aux-weight", NON_NEGATIVE),
    (["--entropy-weight", "nan"], "--entropy-weight", NON_NEGATIVE),
    (["--seeds", "0", "-1"], "--seeds/--seed", SEED),
    (["--data-seed", "-1"], "--data-seed", SEED),
]
REFUSED_RUN = [(args, _usage_error(opt, expected, args[-1])) for args, opt, expected in USAGE_RUN]
REFUSED_RUN += [
    (["--train-subset", "123"], TOO_MANY.format(123)),  # digit 8 has 122 training images
    (["--train-subset", "5000"], TOO_MANY.format(5000)),
    (["--seeds", "1", "1"], r"auxgen: error: seeds must differ, got \[1, 1\]"),
]


@pytest.mark.parametrize("args, pattern", REFUSED_RUN, ids=[" ".join(a) for a, _ in REFUSED_RUN])
def test_run_refuses_what_it_cannot_mean(
    args: list[str], pattern: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit status 2 and one line naming the option, what it expects and what it got; no
    training (nothing written)."""
    out = tmp_path / "o"
    argv = ["run", "--dataset", "digits", "--epochs", "1", *args]  # the last --epochs counts
    code, err = _exit_code_and_stderr([*argv, "--out", str(out), "--no-progress"], capsys)
    assert code == 2, err
    assert re.fullmatch(pattern, err.rstrip("\n")), err
    assert not out.exists()


PER_DIGIT = "expected a positive number of training images per digit, or 'all'"
USAGE_DEMO = [
    (["--train-subset", "0"], "--train-subset", PER_DIGIT),
    (["--train-subset", "0.5"], "--train-subset", PER_DIGIT),
    (["--seeds", "0"], "--seeds", POSITIVE_INT),
    (["--epochs", "0"], "--epochs", POSITIVE_INT),
    (["--threads", "-2"], "--threads", POSITIVE_INT),
]
REFUSED_DEMO = [
    (args, _usage_error(opt, expected, args[-1], "demo")) for args, opt, expected in USAGE_DEMO
]
REFUSED_DEMO += [
    (["--train-subset", "200"], TOO_MANY.format(200)),
    (["--methods", "single", "single"], r"auxgen: error: methods repeat: \['single', 'single'\]"),
]


@pytest.mark.parametrize("args, pattern", REFUSED_DEMO, ids=[" ".join(a) for a, _ in REFUSED_DEMO])
def test_demo_refuses_what_it_cannot_mean(
    args: list[str], pattern: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    code, err = _exit_code_and_stderr(["demo", *args, "--out", str(out), "--no-progress"], capsys)
    assert code == 2, err
    assert re.fullmatch(pattern, err.rstrip("\n")), err
    assert not out.exists()


def test_counts_up_to_the_smallest_class_are_accepted() -> None:
    """The refusals stop exactly at the data: 122 images of each digit is the whole rarest
    digit; ``all`` and fractions stay accepted."""
    from auxgen.experiments.config import RunConfig
    from auxgen.experiments.datasets import load_data

    data = load_data(RunConfig(dataset="digits", train_subset=122))
    assert torch.bincount(data.fine_train).tolist() == [122] * 10
    args = build_parser().parse_args(["run", "--dataset", "digits", "--train-subset", "all"])
    assert args.train_subset is None
    args = build_parser().parse_args(["run", "--dataset", "digits", "--train-subset", "5%"])
    assert args.train_subset == pytest.approx(0.05)
    args = build_parser().parse_args(["demo", "--train-subset", "all"])
    assert args.train_subset is None


def _subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _help_defaults(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """``{option: the text of its "(default: ...)"}`` in the ``--help`` of ``argv``, for every
    option entry of the output (options without a default map to ``""``)."""
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    entries: list[str] = []
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            entries.append(line)
        elif entries and line.startswith("   "):
            entries[-1] += "  " + line.strip()
        else:
            entries.append("")
    defaults = {}
    for entry in filter(None, entries):
        invocation = re.split(r"\s{2,}", entry.strip())[0]  # "--seeds SEEDS [SEEDS ...], ..."
        found = re.search(r"\(default: ([^()]*)\)$", " ".join(entry.split()))
        for word in invocation.split():
            if word.startswith("-") and word != "-h":
                defaults[word.rstrip(",")] = found.group(1) if found else ""
    return defaults


def test_train_subset_help_shows_the_real_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auxgen run --help` once said "(25)": the default is the whole training set."""
    from auxgen.experiments.config import RunConfig
    from auxgen.experiments.sweep import run_demo

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    shown = _help_defaults(["run"], capsys)["--train-subset"]
    assert shown == "all, the whole training set"
    assert RunConfig().train_subset is None  # what "all" means
    args = build_parser().parse_args(["run", "--dataset", "digits"])
    assert run_config(args).train_subset is None
    demo = _help_defaults(["demo"], capsys)["--train-subset"]
    assert int(demo) == inspect.signature(run_demo).parameters["train_subset"].default == 10
    assert build_parser().parse_args(["demo"]).train_subset == 10


#: What ``auxgen run`` does without these options (their parser default is ``None``).
RUN_NONE_DEFAULTS = {
    "--train-subset": "all, the whole training set",
    "--primary-level": "20; other datasets: their only primary task",
    "--aux-level": "100",
    "--psi": "the hierarchy's; 5 per class for CIFAR-10 and CIFAR-100's fine classes",
    "--test-limit": "all",
    "--eval-subset": "all",
    "--out": "runs/<dataset>",
    "--threads": "torch's",
    "--resume": "resume when one exists",
    "--init": "untrained",
}


@pytest.mark.parametrize("command", ["run", "demo"])
def test_every_help_default_is_the_real_one(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every option that takes a value shows a default, and typing that default back gives
    what the command uses without the option."""
    monkeypatch.setenv("COLUMNS", "1000")
    shown = _help_defaults([command], capsys)
    parser = _subcommand(command)
    base = ["run", "--dataset", "digits"] if command == "run" else ["demo"]
    used = vars(build_parser().parse_args(base))
    checked = 0
    for action in parser._actions:
        if not action.option_strings or action.required or action.help == argparse.SUPPRESS:
            continue
        option = action.option_strings[0]
        if option in ("-h", "-v", "-q"):
            continue
        if command == "run" and option in RUN_NONE_DEFAULTS:  # computed later, e.g. per dataset
            assert action.default is None and shown[option] == RUN_NONE_DEFAULTS[option], option
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            assert shown[option] == {True: "on", False: "off"}[action.default], option
        elif action.nargs == 0:  # a flag: no default to show
            assert shown[option] == "", (option, shown[option])
            continue
        else:
            assert action.default is not None, f"{option}: its help does not say its default"
            text = shown[option]
            assert text, f"{option} shows no default"
            words = text.split() if action.nargs in ("+", "*") else [text]
            typed = [action.type(w) if action.type else w for w in words]
            typed = typed if action.nargs in ("+", "*") else typed[0]
            assert typed == action.default, (option, text, action.default)
        assert used[action.dest] == action.default, option
        checked += 1
    assert checked >= (30 if command == "run" else 5)


def test_run_defaults_are_run_config_defaults() -> None:
    """``auxgen run`` without options runs ``RunConfig``'s defaults (which its help shows)."""
    from auxgen.experiments.config import RunConfig, check_config

    args = build_parser().parse_args(["run", "--dataset", "digits"])
    assert run_config(args) == RunConfig(dataset="digits")
    assert (args.methods, args.seeds) == (["maxl"], [0])
    assert len(check_config(RunConfig(dataset="cifar100"))) == 20  # --primary-level: 20


def test_demo_defaults_are_run_demo_defaults() -> None:
    from auxgen.experiments.sweep import run_demo

    args = build_parser().parse_args(["demo"])
    params = inspect.signature(run_demo).parameters
    assert args.out == params["out_dir"].default
    for name in ("seeds", "epochs", "train_subset"):
        assert getattr(args, name) == params[name].default, name
    assert args.methods == list(params["methods"].default)
    assert (args.seeds, args.epochs, args.train_subset, len(args.methods)) == (3, 30, 10, 7)


def test_help(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "{demo,run}" in text
    for what in ("rotations", "MAXL", "fixed", "human", "random", "k-means", "single-task"):
        assert what in text, what
    for dataset in ("CIFAR-100", "CIFAR-10", "MNIST", "Fashion-MNIST", "digits"):
        assert dataset in text, dataset
    assert not text.startswith("usage: auxgen [-h] [-v] [-q] {demo,run} ... Meta AuXiliary")


def test_run_under_torchrun_shards_and_writes_once(tmp_path: Path) -> None:
    """`torchrun -m auxgen run`: two gloo ranks train in sync and rank 0 writes the outputs."""
    out = tmp_path / "ddp"
    cmd = [*torchrun_cmd(2, tmp_path / "logs"), "-m", "auxgen", "run", "--dataset", "digits"]
    cmd += ["--methods", "single", "maxl", "transform", "--seeds", "0", "--smoke"]
    cmd += ["--threads", "1", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    logs = rank_logs(tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:] + str(logs)[-3000:]
    assert sorted(logs) == [(0, 0), (0, 1)]
    assert not [log for log in logs.values() if "Traceback" in log]
    result = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in result["summary"]] == ["single", "maxl-copy", "transform"]
    # both ranks end with the same parameters, hence the same test accuracy
    for label in ("maxl-copy", "transform"):
        finals = [
            [line for line in log.splitlines() if f"{label} seed 0: final" in line]
            for log in logs.values()
        ]
        assert [len(f) for f in finals] == [1, 1], finals
        accuracy = [f[0].split("accuracy")[1].split()[0] for f in finals]
        assert accuracy[0] == accuracy[1], (label, finals)
