"""The ``auxgen`` command line and the examples."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fake_cifar100, rank_logs, torchrun_cmd

from auxgen.cli import main

ROOT = Path(__file__).resolve().parents[1]


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
        (["--dataset", "digits", "--confidence-weight", "-1"], "confidence_weight must be"),
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


def test_help(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "demo" in capsys.readouterr().out


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_example_smoke(capsys) -> None:
    _load_example("quickstart").main(["--smoke"])
    out = capsys.readouterr().out
    assert "step 1:" in out and "generated aux classes" in out


@pytest.mark.filterwarnings("ignore::auxgen.experiments.cifar.ChecksumWarning")
def test_cifar100_example_smoke(tmp_path: Path, capsys) -> None:
    data_dir = fake_cifar100(tmp_path / "data")
    out = tmp_path / "out"
    module = _load_example("cifar100_hierarchy")
    module.main(
        ["--data-dir", str(data_dir), "--out", str(out), "--smoke", "--seeds", "0"]
        + ["--methods", "single", "human", "kmeans", "maxl-head", "--threads", "1"]
    )
    assert "human" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in res["summary"]] == ["single", "human", "kmeans", "maxl-head"]
    run = next(r for r in res["runs"] if r["label"] == "maxl-head")
    assert run["psi"] == [5] * 20 and run["num_train"] == 400
    assert len(run["aux"]["aux_fine_counts_test"]) == 100


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
