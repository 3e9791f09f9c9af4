"""``auxgen/losses.py``: the per-class losses (cross-entropy and focal) and a focal step."""

from __future__ import annotations

import torch
from helpers import batch, mlp, sgd_opts

from auxgen import AuxiliaryLabeler
from auxgen.losses import per_class_loss


def test_focal_per_class_loss_formula():
    z = torch.randn(5, 4)
    p = z.softmax(1)
    expected = -((1 - p) ** 2) * p.log()
    torch.testing.assert_close(per_class_loss(z, "focal", 2.0), expected)
    torch.testing.assert_close(per_class_loss(z, "ce"), -z.log_softmax(1))


def test_focal_loss_step_is_finite():
    lab = AuxiliaryLabeler(mlp(), psi=[2, 3, 4], loss="focal", meta="first_order")
    opt, gen_opt = sgd_opts(lab)
    out = lab.step(*batch(), opt, gen_opt)
    assert all(torch.isfinite(out[k]) for k in ("loss", "primary_loss", "aux_loss", "meta_loss"))
