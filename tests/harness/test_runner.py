"""The training runner: every method on tiny digits runs, determinism, resume, validation,
and a run checkpoint of the first layout that resumes to the same result (fixtures:
``tests/data/make_v0_fixtures.py``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import DATA

from auxgen.experiments.checkpoints import CHECKPOINT_NAME
from auxgen.experiments.config import (
    TRANSFORM_VARIANTS,
    RunConfig,
    check_config,
    parse_method,
)
from auxgen.experiments.datasets import load_data
from auxgen.experiments.models import SmallCNN, build_model, check_backbone
from auxgen.experiments.sweep import format_table, markdown_table, run_sweep, summarize
from auxgen.experiments.training import _build, train

TINY = RunConfig(
    dataset="digits",
    epochs=1,
    train_subset=4,
    test_limit=100,
    batch_size=16,
    width=8,
    threads=1,
    progress=False,
)


def _strip_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.endswith("_time_s")} for h in history]


@pytest.mark.parametrize("spec", ["single", "human", "random", "kmeans", "maxl-copy", "maxl-head"])
def test_each_method_trains(spec: str, tmp_path: Path) -> None:
    method, gen = parse_method(spec)
    cfg = dataclasses.replace(TINY, method=method, generator=gen or "copy", out_dir=str(tmp_path))
    res = train(cfg)
    assert res["label"] == spec
    assert len(res["history"]) == 1 and res["num_train"] == 40 and res["num_test"] == 100
    assert 0.0 <= res["final_test_accuracy"] <= 1.0
    h = res["history"][0]
    assert h["meta_updates"] == (3 if method == "maxl" else 0)  # 40 images / batch 16
    if method == "single":
        assert res["aux"] == {} and h["train_aux_loss"] == 0.0  # aux_weight=0: labels unused
    elif method == "maxl":
        aux = res["aux"]
        assert 0.0 <= aux["aux_nmi_test"] <= 1.0
        counts = torch.tensor(aux["aux_fine_counts_test"])
        assert counts.shape == (10, 10) and int(counts.sum()) == 100
        # generated classes respect the hierarchy: digits 0-4 only go to aux classes 0-4
        assert int(counts[:5, 5:].sum()) == 0 and int(counts[5:, :5].sum()) == 0
        assert len(aux["aux_examples_test"]) == 10
        assert res["generator_parameters"] > 0
    else:
        assert 0.0 <= res["aux"]["aux_nmi_train"] <= 1.0
    if method == "human":
        assert res["aux"]["aux_nmi_train"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["final_test_accuracy"] == res["final_test_accuracy"]
    assert (tmp_path / "checkpoint.pt").is_file()


@pytest.mark.parametrize("variant", TRANSFORM_VARIANTS)
def test_each_transform_variant_trains(variant: str) -> None:
    cfg = dataclasses.replace(TINY, method="transform", transform=variant, generator="copy")
    res = train(cfg)
    assert res["label"] == ("transform" if variant == "both" else f"transform-{variant}")
    learned = variant in ("maxl", "cells", "autol")
    assert res["history"][0]["meta_updates"] == (3 if learned else 0)
    assert (res["generator_parameters"] > 0) == learned
    assert ("aggregated_test_accuracy" in res["aux"]) == (variant != "predict")
    weights = res["history"][0].get("task_weights")
    if variant == "autol":  # the learned weight moved from its start, aux_weight
        assert set(weights) == {"transform"} and weights["transform"] != cfg.aux_weight > 0
    else:
        assert weights is None
    if variant in ("maxl", "cells"):  # the generated labels respect the hierarchy
        counts = torch.tensor(res["aux"]["aux_fine_counts_test"])
        assert counts.shape == (10, 10) and int(counts.sum()) == 100
        assert int(counts[:5, 5:].sum()) == 0 and int(counts[5:, :5].sum()) == 0
    else:
        assert "aux_nmi_test" not in res["aux"]


def test_same_seed_same_results_other_seed_differs() -> None:
    cfg = dataclasses.replace(TINY, method="maxl", epochs=2, deterministic=True)
    a, b = train(cfg), train(cfg)
    assert _strip_times(a["history"]) == _strip_times(b["history"])
    assert a["final_test_loss"] == b["final_test_loss"] and a["aux"] == b["aux"]
    c = train(dataclasses.replace(cfg, seed=1))
    assert _strip_times(c["history"]) != _strip_times(a["history"])


def test_resume_finished_run_and_mismatch(tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, method="random", epochs=2, out_dir=str(tmp_path))
    first = train(cfg)
    again = train(cfg)  # finished: its stored results come back, nothing is retrained
    assert again == json.loads(json.dumps(first))
    (tmp_path / "results.json").unlink()  # checkpoint only: restored and re-evaluated
    again = train(cfg)
    assert again["resumed_from_epoch"] == 2
    assert _strip_times(again["history"]) == _strip_times(first["history"])
    assert again["final_test_accuracy"] == first["final_test_accuracy"]
    with pytest.raises(ValueError, match="differs in: lr"):
        train(dataclasses.replace(cfg, lr=0.01))
    fresh = train(dataclasses.replace(cfg, lr=0.01, resume=False))
    assert fresh["resumed_from_epoch"] is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(dataclasses.replace(cfg, out_dir=str(tmp_path / "empty"), resume=True))


def test_checkpoint_of_an_older_version_resumes(tmp_path: Path) -> None:
    """A checkpoint written before a config field existed lacks it: it resumes when the
    field keeps its default (the older version's arithmetic), and is refused otherwise."""
    cfg = dataclasses.replace(TINY, method="maxl", epochs=2, out_dir=str(tmp_path))
    first = train(cfg)
    (tmp_path / "results.json").unlink()
    ckpt_path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    for field in ("confidence_weight", "gen_optimizer"):
        del ckpt["fingerprint"][field]
    torch.save(ckpt, ckpt_path)
    again = train(cfg)
    assert again["resumed_from_epoch"] == 2
    assert again["final_test_accuracy"] == first["final_test_accuracy"]
    with pytest.raises(ValueError, match="differs in: confidence_weight, gen_optimizer"):
        train(dataclasses.replace(cfg, confidence_weight=0.2, gen_optimizer="adam"))


@pytest.mark.parametrize("optimizer, gen_optimizer, want", [
    ("sgd", "same", torch.optim.SGD), ("adam", "same", torch.optim.Adam),
    ("sgd", "adam", torch.optim.Adam), ("adam", "sgd", torch.optim.SGD),
])  # fmt: skip
def test_generator_optimizer_and_confidence_reach_the_labeler(optimizer, gen_optimizer, want):
    cfg = dataclasses.replace(
        TINY, method="maxl", optimizer=optimizer, gen_optimizer=gen_optimizer,
        confidence_weight=0.3, gen_lr=0.02,
    )  # fmt: skip
    run = _build(cfg.validate(), torch.device("cpu"))
    assert type(run.gen_opt) is want and run.gen_opt.param_groups[0]["lr"] == 0.02
    assert type(run.opt) is (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)
    assert run.labeler.tasks[0].confidence_weight == 0.3
    with pytest.raises(ValueError, match="gen_optimizer must be one of"):
        dataclasses.replace(cfg, gen_optimizer="lbfgs").validate()


def test_aux_label_noise_reaches_the_fixed_labels() -> None:
    """``aux_label_noise`` replaces that fraction of the human labels by random children of
    the same class (seeded by ``seed``); it is refused for methods without fixed labels."""
    cfg = dataclasses.replace(TINY, method="human", train_subset=30)
    clean = _build(cfg.validate(), torch.device("cpu")).fixed
    noisy_run = _build(
        dataclasses.replace(cfg, aux_label_noise=0.6).validate(), torch.device("cpu")
    )
    noisy, y = noisy_run.fixed, noisy_run.data.y_train
    n = y.numel()
    assert torch.equal(clean, noisy_run.data.fine_train)  # digits: the human label is the digit
    changed = int((noisy != clean).sum())
    # round(0.6 n) redrawn among 5 children each: about 4/5 of them change
    assert 0.6 * n * 0.8 - 4 * (0.6 * n * 0.16) ** 0.5 < changed <= round(0.6 * n)
    assert torch.equal(y, noisy // 5)  # still children of the primary class (digit >= 5)
    other = _build(dataclasses.replace(cfg, aux_label_noise=0.6, seed=1).validate(),
                   torch.device("cpu")).fixed  # fmt: skip
    assert not torch.equal(other, noisy)
    for bad, msg in (
        (dict(aux_label_noise=1.2), r"aux_label_noise must be a fraction in \[0, 1\], got 1.2"),
        (dict(method="maxl", aux_label_noise=0.5), "applies to the fixed labels of methods"),
        (dict(method="random", aux_label_noise=0.5), "got method 'random'"),
    ):
        with pytest.raises(ValueError, match=msg):
            dataclasses.replace(cfg, **bad).validate()


def test_smoke_and_subset() -> None:
    cfg = RunConfig(dataset="digits", epochs=50, smoke=True)
    eff = cfg.effective()
    assert eff.epochs == 1 and eff.train_subset == 4 and eff.test_limit == 256
    data = load_data(dataclasses.replace(TINY, train_subset=7))
    assert torch.bincount(data.fine_train).tolist() == [7] * 10
    assert data.x_train.shape[1:] == (1, 8, 8) and data.psi == (5, 5)


def test_task_validation() -> None:
    assert check_config(RunConfig(dataset="cifar100")) == (5,) * 20
    assert check_config(RunConfig(dataset="cifar100", primary_level=3, aux_level=10)) == (5, 1, 4)
    assert check_config(RunConfig(dataset="cifar10", method="maxl", psi=3)) == (3,) * 10
    assert check_config(RunConfig(dataset="cifar100", primary_level=100)) == (5,) * 100
    assert check_config(RunConfig(dataset="cifar100", primary_level=100, psi=2)) == (2,) * 100
    assert check_config(RunConfig(dataset="digits", method="maxl", psi=(2, 3))) == (2, 3)
    bad = [
        (RunConfig(dataset="cifar100", psi=(5, 5, 5)), "psi has 3 entries"),
        (RunConfig(dataset="cifar100", method="human", psi=4), "hierarchy's psi"),
        (RunConfig(dataset="cifar100", primary_level=7), "primary_level"),
        (RunConfig(dataset="cifar100", primary_level=20, aux_level=10), "aux_level"),
        (RunConfig(dataset="cifar100", primary_level=100, aux_level=100), "psi instead"),
        (RunConfig(dataset="cifar100", primary_level=100, method="human"), "no.*finer level|none"),
        (RunConfig(dataset="digits", primary_level=3), "2 primary classes"),
        (RunConfig(dataset="cifar10", method="human"), "hierarchy"),
        (RunConfig(dataset="digits", method="nope"), "method must be one of"),
        (RunConfig(dataset="digits", epochs=0), "epochs"),
        (RunConfig(dataset="digits", psi=0), "positive"),
    ]
    for cfg, msg in bad:
        with pytest.raises(ValueError, match=msg):
            check_config(cfg)
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("maxl-big")


def test_backbones() -> None:
    net = build_model("cnn", 3, 20, image_size=32, width=4)
    assert isinstance(net, SmallCNN) and net(torch.zeros(2, 3, 32, 32)).shape == (2, 20)
    assert check_backbone("cnn") == "cnn"
    assert check_backbone("resnet18") == "timm"
    assert check_backbone("torchvision:resnet18") == "torchvision"
    timm_net = build_model("timm:resnet10t", 1, 2, image_size=8)
    assert timm_net(torch.zeros(2, 1, 8, 8)).shape == (2, 2)
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'"):
        check_backbone("resnet9000")
    with pytest.raises(ValueError, match="needs 3-channel"):
        build_model("torchvision:resnet18", 1, 2, image_size=8)


def test_timm_backbone_trains() -> None:
    cfg = dataclasses.replace(TINY, method="maxl", generator="head", backbone="resnet10t")
    res = train(cfg)
    assert res["history"][0]["meta_updates"] == 3


def test_sweep_writes_summary(tmp_path: Path) -> None:
    res = run_sweep(TINY, ["single", "maxl-head"], [0, 1], tmp_path, title="tiny")
    rows = res["summary"]
    assert [r["label"] for r in rows] == ["single", "maxl-head"]
    assert all(r["seeds"] == [0, 1] for r in rows)
    for name in ("results.json", "results.md", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "maxl-head" / "seed1" / "results.json").is_file()
    assert "| maxl-head |" in markdown_table(rows)
    assert "single" in format_table(rows)
    assert summarize(res["runs"])[0]["accuracy_std"] >= 0
    with pytest.raises(ValueError, match="repeat"):
        run_sweep(TINY, ["maxl", "maxl-copy"], [0])


def test_diagnostics_records_grad_cosine_per_epoch_and_plots_it(
    tmp_path: Path, monkeypatch
) -> None:
    import auxgen.experiments.plots
    from auxgen.cli import main

    drawn: dict = {}
    real_plot = auxgen.experiments.plots.plot_accuracy

    def spy(curves, path, title=None, **kwargs):
        drawn.update(kwargs)
        real_plot(curves, path, title, **kwargs)

    monkeypatch.setattr(auxgen.experiments.plots, "plot_accuracy", spy)
    argv = ["run", "--dataset", "digits", "--methods", "single", "maxl-head", "--seeds", "0"]
    argv += ["--smoke", "--threads", "1", "--no-progress", "-q", "--diagnostics"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    history = {r["label"]: r["history"] for r in res["runs"]}
    assert "train_grad_cosine" not in history["single"][0]  # no auxiliary loss: undefined
    cosine = history["maxl-head"][0]["train_grad_cosine"]
    assert -1.0 <= cosine <= 1.0 and cosine != 0.0
    assert drawn["grad_cosine"] == {"maxl-head": [[cosine]]}
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_batchaug_trains_on_augmented_copies_of_each_image() -> None:
    """Batch augmentation: every image of a batch comes BATCH_VIEWS times, each differently
    cropped, with its own label; plain single-task training otherwise."""
    from auxgen.experiments.batches import epoch_batches
    from auxgen.experiments.config import BATCH_VIEWS

    cfg = dataclasses.replace(TINY, method="batchaug", augment=True, backbone="cnn")
    data = load_data(cfg)
    x, y, idx, _ = next(iter(epoch_batches(data, cfg, 0, torch.device("cpu"))))
    n = cfg.batch_size
    assert x.shape[0] == BATCH_VIEWS * n and torch.equal(y, y[:n].repeat(BATCH_VIEWS))
    assert torch.equal(idx, idx[:n].repeat(BATCH_VIEWS))
    copies = x.view(BATCH_VIEWS, n, -1)
    assert not torch.equal(copies[0], copies[1])  # independent crops of the same images
    res = train(cfg)
    assert res["label"] == "batchaug" and res["aux"] == {}
    assert res["history"][0]["train_aux_loss"] == 0.0
    with pytest.raises(
        ValueError, match=r"method 'batchaug' trains on augmented copies .*--augment"
    ):
        dataclasses.replace(TINY, method="batchaug").validate()


@pytest.mark.filterwarnings("ignore::auxgen.experiments.cifar.ChecksumWarning")
def test_cifar_halves_pretrain_then_fine_tune_from_the_checkpoint(tmp_path: Path) -> None:
    """cifar50a / cifar50b are CIFAR-100's fine classes 0-49 / 50-99 as 50-class tasks;
    ``init`` starts a run from another run's backbone, all but the classifier."""
    from helpers import fake_cifar100

    from auxgen.experiments.models import load_backbone

    data_dir = str(fake_cifar100(tmp_path / "data", n_train=200, n_test=100))
    base = dataclasses.replace(
        TINY, dataset="cifar50a", data_dir=data_dir, train_subset=None, test_limit=None,
        method="single", backbone="cifar_resnet20",
    )  # fmt: skip
    a = load_data(base)
    assert a.num_classes == 50 and set(a.y_train.tolist()) == set(range(50))
    assert torch.equal(a.y_train, a.fine_train)  # labels are the fine classes 0-49
    b = load_data(dataclasses.replace(base, dataset="cifar50b"))
    assert set(b.y_train.tolist()) == set(range(50)) and int(b.x_train.shape[0]) == 100
    pre = train(dataclasses.replace(base, out_dir=str(tmp_path / "pre")))
    assert pre["num_train"] == 100
    ckpt = tmp_path / "pre" / "checkpoint.pt"
    tuned = dataclasses.replace(base, dataset="cifar50b", init=str(ckpt), epochs=1)
    model = build_model("cifar_resnet20", 3, 50, 32)
    fresh_fc = model.fc.weight.detach().clone()
    n = load_backbone(model, str(ckpt))
    saved = torch.load(ckpt, weights_only=False)["labeler"]
    assert n == len([k for k in model.state_dict() if not k.startswith("fc.")])
    torch.testing.assert_close(model.stem[0].weight, saved["model.stem.0.weight"])
    assert torch.equal(model.fc.weight, fresh_fc)  # the classifier stays fresh
    res = train(tuned)
    assert res["config"]["init"] == str(ckpt) and 0.0 <= res["final_test_accuracy"] <= 1.0
    with pytest.raises(FileNotFoundError, match=r"init='nope.pt': no such checkpoint file"):
        load_backbone(model, "nope.pt")
    torch.save({"other.weight": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"none of its tensors fits the backbone"):
        load_backbone(model, str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match=r"method 'human' needs a class hierarchy; cifar50b"):
        check_config(dataclasses.replace(tuned, method="human"))


def test_run_checkpoint_of_the_previous_layout_resumes_to_the_same_result(tmp_path: Path) -> None:
    shutil.copy(DATA / "run_v0_epoch2.ckpt", tmp_path / CHECKPOINT_NAME)
    expected = json.loads((DATA / "run_v0_results.json").read_text())
    cfg = RunConfig(
        dataset="digits", method="maxl", backbone="mlp", epochs=3, train_subset=20, width=16,
        lr=0.1, progress=False, threads=1, deterministic=True, out_dir=str(tmp_path), seed=0,
        resume=True,
    )  # fmt: skip
    res = train(cfg)
    assert res["resumed_from_epoch"] == 2
    assert res["final_test_accuracy"] == expected["final_test_accuracy"]
    assert res["final_test_loss"] == pytest.approx(expected["final_test_loss"], rel=1e-9)
    for key in ("train_loss", "train_aux_loss", "test_accuracy", "meta_updates"):
        assert res["history"][2][key] == pytest.approx(expected["history"][2][key], rel=1e-9), key
