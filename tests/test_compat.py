"""Checkpoints written before ``AuxiliaryLabeler`` composed auxiliary tasks still load and
continue exactly as the code that wrote them did (fixtures: ``tests/data/make_v0_fixtures.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TinyConvNet

from auxgen import AuxiliaryLabeler, GeneratedLabels
from auxgen.experiments.checkpoints import CHECKPOINT_NAME
from auxgen.experiments.config import RunConfig
from auxgen.experiments.training import train

DATA = Path(__file__).resolve().parent / "data"


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
