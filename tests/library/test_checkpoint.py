"""Checkpoints (``auxgen/checkpoint.py``): atomic writes (also on a full disk), weights_only
loading, RNG round trips, and a labeler checkpoint of the first layout (before tasks owned
their heads) that loads and continues exactly as the code that wrote it did (fixtures:
``tests/data/make_v0_fixtures.py``).
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import DATA, TinyConvNet, temporaries

from auxgen import AuxiliaryLabeler, GeneratedLabels
from auxgen.checkpoint import (
    TEMP_PREFIX,
    CheckpointWriteError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


class Arbitrary:
    """A class that weights_only loading must refuse."""


def test_round_trip_and_weights_only(tmp_path: Path) -> None:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    path = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint(
        path, epoch=2, opt=opt.state_dict(), hist=[{"a": 1.5, "b": None}], rng=rng_state()
    )
    state = load_checkpoint(path)
    assert state["epoch"] == 2 and state["hist"] == [{"a": 1.5, "b": None}]
    assert torch.equal(state["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # the file really is weights_only-loadable
    torch.load(path, weights_only=True)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]


def test_rng_state_round_trip(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "r.pt", rng=rng_state())
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_failed_write_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, epoch=1)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, epoch=2)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert not any(p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir())


def test_unreadable_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "ok.pt", w=torch.arange(1000))
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable auxgen checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"x": Arbitrary()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a readable auxgen checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


# ---------------------------------------------------------------------- a full disk
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch, where: str) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, epoch=1, w=torch.arange(100.0))
    before = path.read_bytes()
    real_save = torch.save

    def save_then_fill_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)  # a partly written file on disk ...
        raise ENOSPC  # ... then the disk is full

    def fsync_full(fd: int) -> None:
        raise ENOSPC

    if where == "write":
        monkeypatch.setattr(torch, "save", save_then_fill_disk)
    else:
        monkeypatch.setattr(os, "fsync", fsync_full)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(path, epoch=2, w=torch.zeros(100))
    monkeypatch.undo()
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert err.filename == str(path) and err.__cause__ is not None
    assert str(err) == (
        f"cannot write checkpoint {path}: No space left on device (ENOSPC); "
        "the previous checkpoint is unchanged"
    )
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert temporaries(tmp_path) == []


def test_unwritable_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    """Even creating the folder fails: the same error type, naming the path."""
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint .*file/ckpt\.pt"):
        save_checkpoint(tmp_path / "file" / "ckpt.pt", epoch=1)


# ------------------------------------------------------- checkpoints of the first layout
@pytest.mark.parametrize("generator", ["head", "copy"])
def test_labeler_checkpoint_of_the_previous_layout_continues_identically(generator: str) -> None:
    saved = torch.load(DATA / f"labeler_v0_{generator}.ckpt", weights_only=True)
    torch.manual_seed(123)  # a different initialisation: everything must come from the file
    lab = AuxiliaryLabeler(
        TinyConvNet(num_classes=3),
        tasks=GeneratedLabels([2, 3, 1], generator=generator, entropy_weight=0.3),
    )
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1, momentum=0.9)
    gen_params = list(lab.generator_parameters())
    gen_opt = torch.optim.Adam(gen_params, lr=1e-2)
    lab.load_state_dict(saved["labeler"])
    opt.load_state_dict(saved["optimizer"])
    gen_opt.load_state_dict(saved["gen_optimizer"])
    out = lab.step(saved["x"][2], saved["y"], opt, gen_opt)
    after = saved["after"]
    torch.testing.assert_close(out["loss"], after["loss"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["meta_loss"], after["meta_loss"], rtol=1e-6, atol=1e-7)
    state = {k: v for k, v in lab.state_dict().items() if torch.is_tensor(v)}
    assert sorted(map(_new_name, after["state"])) == sorted(state)
    # The backbone's bias before BatchNorm is stepped by SGD: its noise stays below 1e-7.
    adam_updated = {n for n, p in lab.named_parameters() if any(p is q for q in gen_params)}
    noise_driven = _biases_before_batchnorm(lab) & adam_updated
    assert noise_driven == ({"tasks.0.generator.features.0.bias"} if generator == "copy" else set())
    for name, old in after["state"].items():
        if _new_name(name) in noise_driven:
            # The loss does not depend on a bias that BatchNorm subtracts again, so its
            # gradient is rounding noise, which Adam normalises into a step of up to
            # ``lr``: its value after a step depends on the CPU's rounding, not on the file.
            torch.testing.assert_close(state[_new_name(name)], old, rtol=0, atol=3e-2, msg=name)
        else:
            torch.testing.assert_close(state[_new_name(name)], old, rtol=1e-6, atol=1e-7, msg=name)
    lab.eval()
    # Eval-mode BatchNorm keeps the running mean of the pre-step bias, so the noise above
    # moves the labels by about 2e-5; a generator optimiser state that did not load moves
    # them by about 2e-3.
    torch.testing.assert_close(
        lab.generate_labels(saved["x"][0], saved["y"]), after["labels"], rtol=0, atol=2e-4
    )


def _biases_before_batchnorm(module: torch.nn.Module) -> set[str]:
    """State-dict names of the biases of layers whose output goes straight into BatchNorm."""
    names = set()
    for prefix, seq in module.named_modules():
        if not isinstance(seq, torch.nn.Sequential):
            continue
        children = list(seq.named_children())
        for (name, layer), (_, nxt) in zip(children, children[1:]):
            bias = getattr(layer, "bias", None)
            if isinstance(nxt, torch.nn.modules.batchnorm._BatchNorm) and bias is not None:
                names.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return names


def _new_name(old: str) -> str:
    """The first layout's state-dict key in today's (each task owns its head)."""
    if old == "owner":
        return "tasks.0.owner"
    if old.startswith("aux_head."):
        return "tasks.0.head." + old[len("aux_head.") :]
    if old.startswith("generator."):
        return "tasks.0." + old
    return old
