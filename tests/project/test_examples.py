"""The example programs users copy: each runs with ``--smoke`` and does what it says.

The quick start, the CIFAR-100 script, the custom task, the DDP script (two processes under
``torch.distributed.run``), and the timm, Lightning, Accelerate, Hugging Face and text
examples. Lightning, Accelerate and ``transformers`` are optional dependencies
(``pip install "auxgen[lightning]"``, ``"auxgen[accelerate]"``, ``"auxgen[transformers]"``);
the ``test`` extra installs them all, so CI runs every example.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from helpers import ROOT, fake_cifar100, rank_logs, torchrun_cmd
from torch import nn

from auxgen import SUPPORTED_OPTIMIZERS


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (the examples are not a package)."""
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Exact equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    else:
        assert a == b, where


# ------------------------------------------------------------------------------------ timm
def test_timm_example_offers_only_mirrored_optimizers() -> None:
    """Every ``--opt`` choice makes timm build an optimiser the look-ahead mirrors."""
    from timm.optim import create_optimizer_v2

    timm_train = load_example("timm_train")
    params = [nn.Parameter(torch.zeros(3))]
    for name in timm_train.MIRRORED_OPTIMIZERS:
        opt = create_optimizer_v2(params, opt=name, lr=0.1, momentum=0.9)
        assert type(opt) in SUPPORTED_OPTIMIZERS, name


def test_timm_example_smoke_amp_and_exact_resume(tmp_path: Path, monkeypatch) -> None:
    """Two epochs in one go equal one epoch, a crash after its checkpoint, and a resume."""
    timm_train = load_example("timm_train")
    args = ["--smoke", "--amp", "--task", "rotations+maxl", "--views", "one", "--clip-grad", "1"]
    full = timm_train.main([*args, "--checkpoint", str(tmp_path / "full.pt")])
    assert full["epoch"] == 2
    assert full["lr"] == pytest.approx(0.05 * 1e-2)  # timm's cosine schedule ended at min_lr

    save = timm_train.save_checkpoint

    def save_then_crash(path: Path, state: dict[str, Any]) -> None:
        save(path, state)
        raise KeyboardInterrupt

    part = tmp_path / "part.pt"
    monkeypatch.setattr(timm_train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        timm_train.main([*args, "--checkpoint", str(part)])
    assert torch.load(part, weights_only=False)["epoch"] == 1
    monkeypatch.setattr(timm_train, "save_checkpoint", save)
    resumed = timm_train.main([*args, "--checkpoint", str(part), "--resume"])

    assert resumed == full
    a = torch.load(tmp_path / "full.pt", weights_only=False)
    b = torch.load(part, weights_only=False)
    for key in ("labeler", "optimizer", "gen_optimizer", "scheduler", "epoch"):
        assert_same(a[key], b[key], key)
    # the optimiser really stepped: a momentum buffer for every parameter it holds
    n_params = sum(len(g["params"]) for g in a["optimizer"]["param_groups"])
    assert len(a["optimizer"]["state"]) == n_params
    labeler = a["labeler"]
    floats = [v for v in labeler.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert all(v.dtype == torch.float32 for v in floats)  # autocast left the weights float32
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind


def test_timm_example_float16_passes_the_scaler_to_meta_step(tmp_path: Path, monkeypatch) -> None:
    """``--amp-dtype float16``: a ``GradScaler`` scales the loss and reaches ``meta_step``."""
    timm_train = load_example("timm_train")
    initial: dict[str, torch.Tensor] = {}
    calls: list[tuple[Any, dict[str, Any]]] = []
    build = timm_train.build

    def recorded_build(*args: Any) -> Any:
        built = build(*args)
        initial.update({k: v.detach().clone() for k, v in built[0].named_parameters()})
        return built

    class Spy(timm_train.AuxiliaryTrainingTask):
        def meta_step(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            out = super().meta_step(*args, **kwargs)
            calls.append((kwargs.get("scaler"), out))
            return out

    monkeypatch.setattr(timm_train, "build", recorded_build)
    monkeypatch.setattr(timm_train, "AuxiliaryTrainingTask", Spy)
    ckpt = tmp_path / "fp16.pt"
    args = ["--smoke", "--amp", "--amp-dtype", "float16", "--task", "maxl", "--epochs", "1"]
    result = timm_train.main([*args, "--clip-grad", "1", "--checkpoint", str(ckpt)])
    assert result["epoch"] == 1
    assert len(calls) == 2  # FakeData(32) in batches of 16: one meta step per update
    assert all(isinstance(scaler, torch.amp.GradScaler) for scaler, _ in calls)
    assert any(out["meta_updated"] for _, out in calls)  # an overflowed step is skipped
    state = torch.load(ckpt, weights_only=False)
    assert state["scaler"]["scale"] > 0  # the scaler's state is saved for --resume
    labeler = state["labeler"]
    assert all(torch.isfinite(labeler[name]).all() for name in initial)
    for part in ("model.", "tasks.0.head.", "tasks.0.generator."):  # one update at warm-up lr
        names = [k for k in initial if k.startswith(part)]
        assert names and any(not torch.equal(labeler[k], initial[k]) for k in names), part


def test_timm_example_without_data_says_how_to_get_it(tmp_path: Path) -> None:
    timm_train = load_example("timm_train")
    with pytest.raises(SystemExit, match=r"FashionMNIST not found under --data-dir .*--download"):
        timm_train.main(["--data-dir", str(tmp_path)])


# ------------------------------------------------------------------------------- Lightning
# Lightning 2.6 still calls torch.utils._pytree.LeafSpec, deprecated in torch 2.14.
LEAFSPEC_DEPRECATED = "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"


@pytest.mark.filterwarnings(LEAFSPEC_DEPRECATED)
@pytest.mark.parametrize(
    "task, extra",
    [("rotation", ["--precision", "bf16-mixed", "--gradient-clip-val", "1.0"]), ("maxl", [])],
)
def test_lightning_example_smoke(task: str, extra: list[str], monkeypatch) -> None:
    """``Trainer(fast_dev_run=2)`` on CPU, automatic optimisation: two steps and a validation."""
    pytest.importorskip("lightning")
    example = load_example("lightning_module")
    initial: dict[str, torch.Tensor] = {}

    class Recorded(example.AuxiliaryModule):  # keeps a copy of the initial weights
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            initial.update({k: v.detach().clone() for k, v in self.labeler.named_parameters()})

    monkeypatch.setattr(example, "AuxiliaryModule", Recorded)
    trainer = example.main(["--smoke", "--task", task, *extra])
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2
    assert trainer.global_step == 2  # Lightning's own optimiser steps
    assert trainer.gradient_clip_val == (1.0 if extra else None)
    assert trainer.precision == ("bf16-mixed" if extra else "32-true")
    metrics = trainer.callback_metrics
    keys = ["train/loss", "train/primary_loss", "train/aux_loss", "val/acc"]
    keys += ["labeler/meta_loss"] if task == "maxl" else []  # logged by MetaStep
    for key in keys:
        assert torch.isfinite(metrics[key]), key
    labeler = trainer.lightning_module.labeler
    (opt,) = trainer.optimizers
    generator = {id(p) for p in labeler.generator_parameters()}
    assert bool(generator) == (task == "maxl")
    # one SGD over the module's parameters; momentum for the model and the heads only (the
    # generator's gradient is applied once, by MetaStep's own optimiser)
    assert set(map(id, opt.state)) == set(map(id, labeler.model_parameters()))
    assert all("momentum_buffer" in s for s in opt.state.values())
    assert initial.keys() == dict(labeler.named_parameters()).keys()
    for name, p in labeler.named_parameters():  # model, auxiliary head and generator
        assert not torch.equal(p, initial[name]), f"{name} was not updated"


# ------------------------------------------------------------------------------ Accelerate
def test_accelerate_example_smoke(tmp_path: Path, fresh_accelerate_state, monkeypatch) -> None:
    """One process, bfloat16 autocast and clipping from Accelerate, MAXL's meta step."""
    example = load_example("accelerate_train")
    initial: dict[str, torch.Tensor] = {}

    class Recorded(example.AuxiliaryLabeler):  # keeps a copy of the initial weights
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            initial.update({k: v.detach().clone() for k, v in self.named_parameters()})

    monkeypatch.setattr(example, "AuxiliaryLabeler", Recorded)
    argv = ["--smoke", "--mixed-precision", "bf16", "--clip-grad", "1.0"]
    result = example.main([*argv, "--out", str(tmp_path / "c.pt")])
    assert result["epoch"] == 2 and result["max_divergence"] == 0.0
    assert 0.0 <= result["test_acc"] <= 1.0 and result["train_loss"] > 0
    state = torch.load(tmp_path / "c.pt", weights_only=False)["labeler"]
    assert {"model.fc.weight", "tasks.0.head.weight", "tasks.0.owner"} <= set(
        state
    )  # the unwrapped labeler's keys, not a DDP module.*
    floats = [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert all(v.dtype == torch.float32 for v in floats)
    assert any(k.startswith("tasks.0.generator.") for k in initial)
    for name, before in initial.items():  # model, auxiliary head and generator
        assert torch.isfinite(state[name]).all(), name
        assert not torch.equal(state[name], before), f"{name} was not updated"


@pytest.mark.slow
def test_accelerate_example_two_processes(tmp_path: Path) -> None:
    """Under torchrun with two CPU processes: DDP, and the parameters stay identical."""
    pytest.importorskip("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [*torchrun_cmd(2, tmp_path / "logs"), str(ROOT / "examples" / "accelerate_train.py")]
    cmd += ["--smoke", "--out", str(tmp_path / "c.pt")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    logs = rank_logs(tmp_path / "logs")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:] + str(logs)[-3000:]
    main_log = logs[(0, 0)]  # the main process reports for both
    assert "2 process(es)" in main_log, main_log
    assert "labeler prepared as DistributedDataParallel" in main_log, main_log
    assert "parameters identical on all 2 process(es)" in main_log, main_log
    assert (tmp_path / "c.pt").is_file()


# ---------------------------------------------------------------------------- Hugging Face
def test_hf_trainer_example_smoke(tmp_path: Path, fresh_accelerate_state, monkeypatch) -> None:
    """A tiny ViT under ``AuxiliaryTrainer`` with MAXL: every part trained, a loadable model."""
    transformers = pytest.importorskip("transformers")
    from auxgen.integrations.hf import LABELER_FILE

    example = load_example("hf_trainer")
    initial: dict[str, torch.Tensor] = {}

    class Recorded(example.AuxiliaryLabeler):  # keeps a copy of the initial weights
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            initial.update({k: v.detach().clone() for k, v in self.named_parameters()})

    monkeypatch.setattr(example, "AuxiliaryLabeler", Recorded)
    out = tmp_path / "vit"
    trainer = example.main(["--smoke", "--task", "maxl", "--output-dir", str(out)])
    assert trainer.state.global_step == 4  # 16 rows in batches of 8, 2 epochs
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    assert len(evals) == 3  # after each epoch, and the final evaluate()
    assert all(0.0 <= h["eval_accuracy"] <= 1.0 and h["eval_loss"] > 0 for h in evals)
    labeler = trainer.labeler
    assert any(k.startswith("tasks.0.generator.") for k in initial)
    for name, p in labeler.named_parameters():  # the ViT, auxiliary head and generator
        assert torch.isfinite(p).all(), name
        assert not torch.equal(p.detach(), initial[name]), f"{name} was not updated"
    # the saved model is a plain ViT that from_pretrained reads; the labeler's state beside it
    loaded = transformers.ViTForImageClassification.from_pretrained(str(out))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.eval()(x).logits, labeler.eval()(x))
    state = torch.load(out / LABELER_FILE, weights_only=False)
    assert state["gen_optimizer"] is not None and "tasks.0.owner" in state["labeler"]


# ------------------------------------------------------------------------------------ text
def test_text_corpus_has_the_planted_hierarchy() -> None:
    """Documents carry their own sub-topic's keywords at the rate the generator asks for."""
    example = load_example("text_classifier")
    corpus = example.SyntheticTopics(topics=3, subtopics=2, keywords=4, background=50)
    tokens, topic, sub = corpus.sample(600, split=0, p_own=0.25, p_other=0.05)
    assert tokens.shape == (600, 24) and torch.equal(topic, sub // 2)
    assert torch.bincount(sub).tolist() == [100] * 6
    first = 1 + corpus.background + sub[:, None] * corpus.keywords  # own keyword ids
    real = tokens != example.PAD
    own = (tokens >= first) & (tokens < first + corpus.keywords)
    rate = own.sum() / real.sum()
    # own keywords: p_own, plus the p_other noise that lands on the own sub-topic (1/6)
    assert float(rate) == pytest.approx(0.25 + 0.05 / 6, abs=0.02)
    assert int(real.sum(1).min()) >= 8 and int(tokens.max()) < corpus.vocab_size


def test_text_classifier_example_smoke(capsys) -> None:
    example = load_example("text_classifier")
    result = example.main(["--smoke"])
    for name in example.RUNS:
        assert result[f"{name} accuracy"] > 0.5, result  # 4 topics: chance is 0.25
    assert 0.0 <= result["MAXL sub-topic NMI"] <= 1.0
    out = capsys.readouterr().out
    assert "single-task accuracy" in out and "MAXL accuracy" in out


# --------------------------------------- quick start, CIFAR-100, custom task, DDP
def test_quickstart_example_smoke(capsys) -> None:
    load_example("quickstart").main(["--smoke"])
    out = capsys.readouterr().out
    assert "step 1:" in out and "generated aux classes" in out


@pytest.mark.filterwarnings("ignore::auxgen.experiments.cifar.ChecksumWarning")
def test_cifar100_example_smoke(tmp_path: Path, capsys) -> None:
    data_dir = fake_cifar100(tmp_path / "data")
    out = tmp_path / "out"
    module = load_example("cifar100_hierarchy")
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


def test_cifar100_example_smoke_runs_without_data_on_disk(tmp_path: Path, capsys) -> None:
    """As docs/examples/index.md says of every example: --smoke needs no data."""
    module = load_example("cifar100_hierarchy")
    module.main(
        ["--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--smoke"]
        + ["--seeds", "0", "--methods", "single", "human", "--threads", "1"]
    )
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["label"] for r in res["summary"]] == ["single", "human"]
    assert not (tmp_path / "empty").exists()  # nothing written where the data would be


def test_custom_task_example_smoke() -> None:
    module = load_example("custom_task")
    results = module.main(["--smoke"])
    assert set(results) == {"upside_down", "masked_token", "masked_token_learned_weight"}
    assert results["masked_token"]["weight"] == 1.0  # fixed
    assert results["masked_token_learned_weight"]["weight"] != 1.0  # learned: it moved
    assert all(0.0 <= r["train_acc"] <= 1.0 for r in results.values())


def test_ddp_example_smoke(tmp_path: Path) -> None:
    """``examples/ddp_cifar.py --smoke`` runs under torchrun with 2 processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [*torchrun_cmd(2, tmp_path / "logs"), str(ROOT / "examples" / "ddp_cifar.py")]
    cmd += ["--smoke", "--out", str(tmp_path / "ckpt.pt")]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    logs = rank_logs(tmp_path / "logs")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:] + str(logs)[-3000:]
    assert "parameters in sync across 2 ranks" in logs[(0, 0)], logs
    assert (tmp_path / "ckpt.pt").exists()
