"""``AuxiliaryLabeler.step`` under CPU bfloat16 autocast (mixed precision).

The step runs inside ``torch.autocast("cpu", dtype=torch.bfloat16)``: convolutions and
linear layers compute in bfloat16, the parameters, their gradients, the optimiser state and
the BatchNorm statistics stay float32. Both meta-gradient modes must give finite losses,
finite updates of every parameter and a meta-gradient close to the float32 one.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TinyConvNet
from torch import Tensor

from auxgen import AuxiliaryLabeler, GeneratedLabels

META = ["second_order", "first_order"]


def _setup(
    meta: str, generator: str
) -> tuple[AuxiliaryLabeler, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    labeler = AuxiliaryLabeler(
        TinyConvNet(num_classes=3, width=8),
        tasks=GeneratedLabels(2, generator=generator),
        meta=meta,
    )
    opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1, momentum=0.9)
    gen_opt = torch.optim.Adam(labeler.generator_parameters(), lr=1e-3)
    return labeler, opt, gen_opt


def _batch(n: int = 16) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3


def _gen_grad(labeler: AuxiliaryLabeler) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in labeler.generator_parameters()])  # type: ignore[union-attr]


@pytest.mark.parametrize("generator", ["copy", "head"])
@pytest.mark.parametrize("meta", META)
def test_bf16_autocast_step(meta: str, generator: str) -> None:
    labeler, opt, gen_opt = _setup(meta, generator)
    x, y = _batch()
    before = {k: p.detach().clone() for k, p in labeler.named_parameters()}
    for _ in range(2):  # the second step also exercises the momentum / Adam state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = labeler.step(x, y, opt, gen_opt)
        assert out["meta_updated"] and out["skipped"] == 0
        for key in ("loss", "primary_loss", "aux_loss", "meta_loss"):
            assert torch.isfinite(out[key]).all(), key
        assert out["logits"].dtype == torch.bfloat16  # autocast really was on
        g = _gen_grad(labeler)
        assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0

    for k, p in labeler.named_parameters():
        assert p.dtype == torch.float32, k
        assert torch.isfinite(p).all(), k
        assert not torch.equal(p, before[k]), f"{k} was not updated"
    for k, b in labeler.named_buffers():
        if b.is_floating_point():
            assert b.dtype == torch.float32 and torch.isfinite(b).all(), k
    for state in (*opt.state.values(), *gen_opt.state.values()):
        for v in state.values():
            if isinstance(v, Tensor) and v.is_floating_point() and v.dim() > 0:
                assert v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.mark.parametrize(("meta", "min_cos"), [("second_order", 0.999), ("first_order", 0.95)])
def test_bf16_meta_gradient_close_to_float32(meta: str, min_cos: float) -> None:
    """The bfloat16 meta-gradient points where the float32 exact one does."""
    x, y = _batch(32)
    grads = {}
    for amp in (False, True):
        labeler, opt, gen_opt = _setup(meta, "copy")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            labeler.step(x, y, opt, gen_opt)
        grads[amp] = _gen_grad(labeler)
    labeler, opt, gen_opt = _setup("second_order", "copy")
    labeler.step(x, y, opt, gen_opt)
    exact = _gen_grad(labeler)
    cos = torch.nn.functional.cosine_similarity(grads[True], exact, dim=0)
    assert cos > min_cos, f"cosine {float(cos):.5f} between bf16 {meta} and float32 exact"
    assert torch.nn.functional.cosine_similarity(grads[False], exact, dim=0) > 0.9999


@pytest.mark.parametrize("views", ["all", "one"])
def test_bf16_autocast_transformation_task_beside_maxl(views: str) -> None:
    """Rotation labels and MAXL at once under autocast: finite float32 losses and updates,
    and the losses close to the float32 step's."""
    from auxgen import TransformLabels

    x, y = _batch()
    outs = {}
    for amp in (False, True):
        torch.manual_seed(0)
        tasks = [TransformLabels(views=views), GeneratedLabels(2)]
        labeler = AuxiliaryLabeler(TinyConvNet(num_classes=3, width=8), tasks=tasks)
        opt = torch.optim.SGD(labeler.model_parameters(), lr=0.1, momentum=0.9)
        gen_opt = torch.optim.SGD(labeler.generator_parameters(), lr=1e-2)
        torch.manual_seed(1)  # the same rotations drawn with views="one"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            outs[amp] = labeler.step(x, y, opt, gen_opt)
        assert outs[amp]["meta_updated"]
        assert all(
            p.dtype == torch.float32 and torch.isfinite(p).all() for p in labeler.parameters()
        )
    for key in ("loss", "primary_loss", "meta_loss"):
        assert outs[True][key].dtype == torch.float32
        torch.testing.assert_close(outs[True][key], outs[False][key], rtol=0.03, atol=0.03)
