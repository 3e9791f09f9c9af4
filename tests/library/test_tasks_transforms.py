"""``TransformLabels``: targets, losses and gradients against a hand computation; several
tasks at once with the meta-gradient checked against an independent double backward; errors.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import ROT_C, ROT_K, ROT_N, rot, rot_batch, rot_hand_loss, rot_model, rot_params
from torch import nn

from auxgen import (
    AuxiliaryLabeler,
    GeneratedLabels,
    LearnedWeight,
    TransformLabels,
    colour_permutations,
    patch_rotations,
    rotations,
)
from auxgen.hierarchy import masked_softmax
from auxgen.losses import neg_entropy
from auxgen.tasks.transforms import Rotate

N, C, K = ROT_N, ROT_C, ROT_K  # the hand-written rotation task's sizes (helpers.py)


@pytest.mark.parametrize("form", ["joint", "predict", "both"])
def test_all_views_losses_and_gradients_equal_a_hand_computation(form: str) -> None:
    lab = AuxiliaryLabeler(rot_model(), tasks=TransformLabels(form=form, weight=0.7)).double()
    assert lab.aux_head.out_features == {"joint": C * K, "predict": K, "both": C * K + K}[form]
    x, y = rot_batch()
    params = rot_params(lab)
    views = torch.cat([rot(x, k) for k in range(K)])
    ks = torch.arange(K).repeat_interleave(N)
    loss, primary, aux = rot_hand_loss(params, x, y, views, ks, form, 0.7)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    lr = 0.1
    opt = torch.optim.SGD(lab.model_parameters(), lr=lr)
    out = lab.step(x, y, opt)
    torch.testing.assert_close(out["loss"], loss.detach())
    torch.testing.assert_close(out["primary_loss"], primary.detach())
    torch.testing.assert_close(out["task_losses"]["transform"], aux.detach())
    assert out["meta_loss"] is None and not out["meta_updated"]
    after = dict(lab.model.named_parameters())
    after["head.weight"], after["head.bias"] = lab.aux_head.weight, lab.aux_head.bias
    for name, p in params.items():
        torch.testing.assert_close(after[name], p.detach() - lr * grads[name], msg=name)


def test_one_view_per_image_draws_the_transform_and_its_target_together() -> None:
    lab = AuxiliaryLabeler(rot_model(), tasks=TransformLabels(views="one", form="both")).double()
    x, y = rot_batch(1)
    torch.manual_seed(5)
    ks = torch.randint(K, (N,))
    views = torch.stack([rot(x[i : i + 1], int(k))[0] for i, k in enumerate(ks)])
    loss, _, aux = rot_hand_loss(rot_params(lab), x, y, views, ks, "both", 1.0)
    torch.manual_seed(5)
    out = lab.step(x, y, torch.optim.SGD(lab.model_parameters(), lr=0.1))
    torch.testing.assert_close(out["loss"], loss.detach())
    torch.testing.assert_close(out["task_losses"]["transform"], aux.detach())


def test_batchnorm_statistics_move_once_over_the_batch_and_its_views() -> None:
    lab = AuxiliaryLabeler(rot_model(bn=True), tasks=TransformLabels()).double()
    reference = copy.deepcopy(lab.model)
    x, y = rot_batch()
    reference(torch.cat([x] + [rot(x, k) for k in (1, 2, 3)]))  # one training forward
    lab.step(x, y, torch.optim.SGD(lab.model_parameters(), lr=0.1))
    for (name, b), (_, rb) in zip(lab.model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, rb, rtol=0, atol=0, msg=name)


def test_primary_loss_on_views_adds_the_mean_over_the_transformed_views() -> None:
    lab = AuxiliaryLabeler(rot_model(), tasks=TransformLabels(form="predict", primary_views=True))
    lab = lab.double()
    x, y = rot_batch()
    p = rot_params(lab)
    views = torch.cat([rot(x, k) for k in range(K)])
    loss, _, _ = rot_hand_loss(p, x, y, views, torch.arange(K).repeat_interleave(N), "predict", 1.0)
    h = torch.tanh(views[N:].flatten(1) @ p["1.weight"].T + p["1.bias"])
    loss = loss + F.cross_entropy(h @ p["3.weight"].T + p["3.bias"], y.repeat(K - 1))
    out = lab.step(x, y, torch.optim.SGD(lab.model_parameters(), lr=0.1))
    torch.testing.assert_close(out["loss"], loss.detach())


def test_aggregated_prediction_and_distillation() -> None:
    task = TransformLabels(form="joint", distill=0.5, distill_temperature=2.0)
    lab = AuxiliaryLabeler(rot_model(), tasks=task).double().eval()
    x, y = rot_batch()
    p = rot_params(lab)
    views = torch.cat([rot(x, k) for k in range(K)])
    h = torch.tanh(views.flatten(1) @ p["1.weight"].T + p["1.bias"])
    joint = F.log_softmax(h @ p["head.weight"].T + p["head.bias"], 1).view(K, N, C, K)
    agg = torch.stack([joint[k, :, :, k] for k in range(K)]).mean(0)
    torch.testing.assert_close(lab.aggregated_log_probs(x), agg.detach())
    loss, _, _ = rot_hand_loss(p, x, y, views, torch.arange(K).repeat_interleave(N), "joint", 1.0)
    z_p = torch.tanh(x.flatten(1) @ p["1.weight"].T + p["1.bias"]) @ p["3.weight"].T + p["3.bias"]
    target = F.softmax(agg.detach() / 2.0, 1)
    kl = (target * (target.log() - F.log_softmax(z_p / 2.0, 1))).sum(1).mean()
    lab.train()
    out = lab.step(x, y, torch.optim.SGD(lab.model_parameters(), lr=0.1))
    torch.testing.assert_close(out["loss"], (loss + 0.5 * 4.0 * kl).detach())


def test_weight_zero_is_single_task_training() -> None:
    lab = AuxiliaryLabeler(rot_model(bn=True), tasks=TransformLabels(weight=0.0)).double()
    reference = copy.deepcopy(lab.model)
    x, y = rot_batch()
    out = lab.step(x, y, torch.optim.SGD(lab.model_parameters(), lr=0.1))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    F.cross_entropy(reference(x), y).backward()
    ref_opt.step()
    assert float(out["aux_loss"]) == 0.0
    for p, q in zip(lab.model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    for b, rb in zip(lab.model.buffers(), reference.buffers()):  # no views were forwarded
        torch.testing.assert_close(b, rb)


def test_custom_transforms_on_token_ids() -> None:
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 6)
            self.order = nn.Linear(6 * 5, 6)
            self.fc = nn.Linear(6, 2)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.order(self.emb(t).flatten(1))))

    def reverse(t: torch.Tensor) -> torch.Tensor:
        return t.flip(1)

    task = TransformLabels([None, reverse], form="predict")
    assert task.names == ["identity", "reverse"]
    lab = AuxiliaryLabeler(Bag(), tasks=task)
    x = torch.randint(0, 20, (8, 5))
    out = lab.step(x, torch.arange(8) % 2, torch.optim.SGD(lab.model_parameters(), lr=0.1))
    assert torch.isfinite(out["loss"]) and lab.aux_head.out_features == 2


def test_colour_permutations_as_transforms() -> None:
    from auxgen import colour_permutations

    transforms, names = colour_permutations()
    x = torch.randn(2, 3, 4, 4)
    outs = [x if fn is None else fn(x) for fn in transforms]
    assert len({tuple(o[0, :, 0, 0].tolist()) for o in outs}) == 6  # six distinct orders
    task = TransformLabels(transforms, names, form="joint")
    lab = AuxiliaryLabeler(rot_model(), tasks=task).double()
    out = lab.step(*rot_batch(), torch.optim.SGD(lab.model_parameters(), lr=0.1))
    assert lab.aux_head.out_features == C * 6 and torch.isfinite(out["loss"])


def test_rotations_helper() -> None:
    transforms, names = rotations()
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert transforms[0] is None and names[2] == "rot180"
    assert torch.equal(transforms[2](x), x.flip(2).flip(3))


# ------------------------------------------------------------------ several tasks, meta
def test_generated_labels_beside_transforms_meta_gradient_equals_double_backward() -> None:
    model = rot_model()
    torch.manual_seed(1)
    gen = nn.Sequential(nn.Flatten(), nn.Linear(48, 2 * C)).double()
    maxl = GeneratedLabels([2] * C, generator=gen, entropy_weight=0.3, weight=0.8)
    lab = AuxiliaryLabeler(model, tasks=[TransformLabels(form="predict", weight=0.6), maxl])
    lab = lab.double()
    x, y = rot_batch(2)
    p = rot_params(lab)  # the transform head
    w_m = lab.aux_heads[1].weight.detach().clone().requires_grad_(True)
    b_m = lab.aux_heads[1].bias.detach().clone().requires_grad_(True)
    phi = [q.detach().clone().requires_grad_(True) for q in gen.parameters()]
    t = masked_softmax(x.flatten(1) @ phi[0].T + phi[1], y, maxl.owner)
    views = torch.cat([rot(x, k) for k in range(K)])
    loss, _, _ = rot_hand_loss(p, x, y, views, torch.arange(K).repeat_interleave(N), "predict", 0.6)
    h = torch.tanh(x.flatten(1) @ p["1.weight"].T + p["1.bias"])
    ell = -F.log_softmax(h @ w_m.T + b_m, 1)
    loss = loss + 0.8 * (t * ell).sum(1).mean()
    theta = [p["1.weight"], p["1.bias"], p["3.weight"], p["3.bias"]]
    grads = torch.autograd.grad(loss, theta, create_graph=True)
    lr = 0.2
    w1, b1, w3, b3 = (q - lr * g for q, g in zip(theta, grads))
    lp_plus = F.cross_entropy(torch.tanh(x.flatten(1) @ w1.T + b1) @ w3.T + b3, y)
    meta = lp_plus + 0.3 * neg_entropy(t)
    want = torch.autograd.grad(meta, phi)
    opt = torch.optim.SGD(lab.model_parameters(), lr=lr)
    out = lab.step(x, y, opt, torch.optim.SGD(lab.generator_parameters(), lr=1.0))
    assert out["meta_updated"] and set(out["task_losses"]) == {"transform", "maxl"}
    torch.testing.assert_close(out["meta_loss"], meta.detach())
    for got, exp in zip(lab.generator_parameters(), want):
        torch.testing.assert_close(got.grad, exp)


def test_state_dict_round_trip_and_checkpoint_keys() -> None:
    def build(seed: int) -> AuxiliaryLabeler:
        torch.manual_seed(seed)
        tasks = [LearnedWeight(TransformLabels(form="predict")), GeneratedLabels([2] * C)]
        return AuxiliaryLabeler(rot_model(bn=True), tasks=tasks).double()

    lab = build(0)
    x, y = rot_batch()
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    lab.step(x, y, opt, torch.optim.SGD(lab.generator_parameters(), lr=0.1))
    state = lab.state_dict()
    assert {"tasks.0.loss_weight.log_weight", "tasks.1.head.weight", "tasks.1.owner"} <= set(state)
    other = build(1)
    other.load_state_dict(state)
    lab.eval(), other.eval()
    assert torch.equal(other(x), lab(x))
    assert other.tasks[0].weight == lab.tasks[0].weight
    # the layout before tasks owned their heads and weights (version 2) still loads
    old = {
        re.sub(r"^tasks\.(\d+)\.head\.", r"aux_heads.\1.", k).replace(
            "loss_weight.log_weight", "log_weight"
        ): v
        for k, v in state.items()
    }
    assert {"tasks.0.log_weight", "aux_heads.1.weight"} <= set(old)
    third = build(2)
    third.load_state_dict(old)
    third.eval()
    assert torch.equal(third(x), lab(x)) and third.tasks[0].weight == lab.tasks[0].weight
    for a, b in zip(third.aux_heads.parameters(), lab.aux_heads.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ errors
def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"at least 2 transforms \(K >= 2\), got 1"):
        TransformLabels([None])
    with pytest.raises(TypeError, match=r"transforms\[1\] must be a callable .* got int"):
        TransformLabels([None, 3])
    with pytest.raises(TypeError, match="transforms must be a sequence of callables"):
        TransformLabels(torch.flip)
    with pytest.raises(ValueError, match=r"names must be one str per transform \(2\)"):
        TransformLabels([None, torch.neg], names=["a"])
    with pytest.raises(ValueError, match=r"form must be one of \('joint', 'predict', 'both'\)"):
        TransformLabels(form="pairs")
    with pytest.raises(ValueError, match=r"views must be one of \('all', 'one'\), got 'two'"):
        TransformLabels(views="two")
    with pytest.raises(ValueError, match="distill needs the aggregated joint prediction"):
        TransformLabels(form="predict", distill=1.0)
    with pytest.raises(ValueError, match="weight must be a non-negative number, got -1"):
        TransformLabels(weight=-1)
    with pytest.raises(ValueError, match="task must have fixed targets"):
        LearnedWeight(GeneratedLabels(2))
    with pytest.raises(ValueError, match="pass psi= or tasks=, not both"):
        AuxiliaryLabeler(rot_model(), psi=2, tasks=TransformLabels())
    with pytest.raises(TypeError, match=r"tasks\[1\] must be an AuxiliaryTask, got str"):
        AuxiliaryLabeler(rot_model(), tasks=[TransformLabels(), "rotation"])


def test_bad_transform_outputs_are_clear_errors() -> None:
    def transpose(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(-2, -1)

    lab = AuxiliaryLabeler(
        nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 6, 5), nn.Tanh(), nn.Linear(5, C)),
        tasks=TransformLabels([None, transpose]),
    )
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    x, y = torch.randn(N, 3, 4, 6), torch.arange(N) % C
    with pytest.raises(ValueError, match=r"transforms\[1\] \('transpose'\) returned shape \(6, 3, "
                       r"6, 4\) for a batch of shape \(6, 3, 4, 6\)"):  # fmt: skip
        lab.step(x, y, opt)
    # whole-image rotations asked for explicitly refuse non-square images and say what works
    lab = AuxiliaryLabeler(
        nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 6, 5), nn.Tanh(), nn.Linear(5, C)),
        tasks=TransformLabels(*rotations()),
    )
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"whole-image rotations need square images, got 4x6; "
                       r"use patch_rotations\(\)"):  # fmt: skip
        lab.step(x, y, opt)

    def to_double(t: torch.Tensor) -> torch.Tensor:
        return t.double()

    lab = AuxiliaryLabeler(rot_model().float(), tasks=TransformLabels([None, to_double]))
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    x = torch.randn(N, 3, 4, 4)
    with pytest.raises(ValueError, match=r"transforms\[1\] \('to_double'\) returned torch.float64"):
        lab.step(x, y, opt)
    lab = AuxiliaryLabeler(rot_model().float(), tasks=TransformLabels([None, lambda t: [t]]))
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"transforms\[1\] \('<lambda>'\) must return a Tensor"):
        lab.step(x, y, opt)
    with pytest.raises(ValueError, match="aux_target was given but no task takes"):
        lab.step(x, y, opt, aux_target=y)


# ------------------------------------------------------------ backbones, faults, optimisers
@pytest.mark.parametrize(
    "factory",
    [
        lambda: __import__("timm").create_model("test_resnet", pretrained=False, num_classes=3),
        lambda: __import__("torchvision").models.resnet18(num_classes=3),
        lambda: __import__("timm").create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8
        ),
    ],
    ids=["timm-test_resnet", "tv-resnet18", "timm-vit-tiny"],
)
def test_rotation_labels_on_real_backbones(factory) -> None:
    torch.manual_seed(0)
    lab = AuxiliaryLabeler(factory(), tasks=TransformLabels(views="one"))
    opt = torch.optim.AdamW(lab.model_parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    before = [p.clone() for p in lab.model_parameters()]
    out = lab.step(x, y, opt)
    assert torch.isfinite(out["loss"]) and lab.aux_head.out_features == C * K + K
    assert any(not torch.equal(p, b) for p, b in zip(lab.model_parameters(), before))


def test_any_optimizer_without_a_learned_task() -> None:
    """Nothing is looked ahead through without a learned task: timm's LAMB is fine."""
    import timm.optim

    lab = AuxiliaryLabeler(rot_model(), tasks=TransformLabels(form="predict")).double()
    out = lab.step(*rot_batch(), timm.optim.Lamb(lab.model_parameters(), lr=1e-2))
    assert torch.isfinite(out["loss"])
    lab = AuxiliaryLabeler(rot_model(), tasks=[TransformLabels(), GeneratedLabels([2] * C)])
    with pytest.raises(TypeError, match="Lamb cannot be mirrored exactly"):
        lab.double().step(*rot_batch(), timm.optim.Lamb(lab.model_parameters(), lr=1e-2))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_step_changes_nothing(policy: str) -> None:
    from auxgen import NonFiniteError

    lab = AuxiliaryLabeler(rot_model(bn=True), tasks=TransformLabels(), nonfinite=policy).double()
    opt = torch.optim.SGD(lab.model_parameters(), lr=0.1, momentum=0.9)
    x, y = rot_batch()
    lab.step(x, y, opt)
    state = copy.deepcopy(lab.state_dict())
    x[0, 0, 1, 2] = float("nan")  # poisons one image and, through BatchNorm, every view
    if policy == "raise":
        with pytest.raises(NonFiniteError, match="non-finite multi-task loss or gradient"):
            lab.step(x, y, opt)
    else:
        assert lab.step(x, y, opt)["skipped"] == 1
    for k, v in lab.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, state[k]), k


# ------------------------------------------------------------ any image shape, cheap forms
def _turned_somewhere(before: torch.Tensor, after: torch.Tensor, k: int, side: int) -> bool:
    """Whether ``after`` is ``before`` with one ``side x side`` window turned ``k`` times."""
    _, h, w = before.shape
    for top in range(h - side + 1):
        for left in range(w - side + 1):
            want = before.clone()
            win = before[:, top : top + side, left : left + side]
            want[:, top : top + side, left : left + side] = torch.rot90(win, k, dims=(1, 2))
            if torch.equal(want, after):
                return True
    return False


@pytest.mark.parametrize("k", [1, 2, 3])
def test_patch_rotation_turns_one_square_window_per_image(k: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 2, 6, 9)
    out = Rotate(k, patch=0.5)(x)  # a 3x3 window (half of the shorter side)
    assert out.shape == x.shape and not torch.equal(out, x)
    for before, after in zip(x, out):
        assert _turned_somewhere(before, after, k, side=3)
    assert torch.equal(
        Rotate(k, patch="auto")(x[:, :, :6, :6]), torch.rot90(x[:, :, :6, :6], k, (2, 3))
    )


def test_default_task_trains_on_non_square_images_and_refuses_non_images() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 6, 5), nn.Tanh(), nn.Linear(5, C))
    lab = AuxiliaryLabeler(model, tasks=TransformLabels())
    opt = torch.optim.SGD(lab.parameters(), lr=0.1)
    x, y = torch.randn(N, 3, 4, 6), torch.arange(N) % C
    for _ in range(2):
        opt.zero_grad()
        out = lab(x, y)
        out["loss"].backward()
        opt.step()
    assert torch.isfinite(out["task_losses"]["transform"])
    assert [type(t).__name__ for t in lab.tasks[0].transforms[1:]] == ["Rotate"] * 3
    # token ids (N, L) with N == L are not images: a clear error, not rotated samples
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(4 * N, C))
    lab = AuxiliaryLabeler(emb, tasks=TransformLabels())
    tokens = torch.randint(0, 10, (N, N))
    with pytest.raises(ValueError, match=r"rotations act on image batches \(N, C, H, W\) or \(N, "
                       r"H, W\) of floats, got shape \(6, 6\) of torch.int64; .* pass "
                       r"transforms="):  # fmt: skip
        lab(tokens, y)


def test_user_transforms_must_act_within_each_sample() -> None:
    x, y = rot_batch()
    mixing = AuxiliaryLabeler(rot_model(), tasks=TransformLabels([None, lambda t: t.roll(1, 0)]))
    with pytest.raises(ValueError, match=r"transforms\[1\] \('<lambda>'\) mixes samples: changing "
                       r"sample 0 of a batch of shape \(6, 3, 4, 4\) \(torch.float64\) changed "
                       r"output rows \[1\]"):  # fmt: skip
        mixing(x, y)

    # per-sample transforms pass, random ones included (both calls draw the same numbers)
    def jitter(t: torch.Tensor) -> torch.Tensor:
        return t + torch.randn(t.shape[0], 1, 1, 1, dtype=t.dtype)

    fine = [lambda t: t.flip(-1), jitter, *patch_rotations(0.5)[0][1:]]
    lab = AuxiliaryLabeler(rot_model(), tasks=TransformLabels([None, *fine]))
    state = torch.random.get_rng_state()
    lab(x, y)["loss"].backward()
    assert lab.tasks[0].transform_set.checked == {1, 2, 3, 4, 5}
    # the check itself leaves the global random stream as it found it: a second labeler
    # whose transforms were already checked draws the same numbers for the same step
    torch.random.set_rng_state(state)
    lab2 = copy.deepcopy(lab)
    torch.random.set_rng_state(state)
    out = lab2(x, y)
    torch.random.set_rng_state(state)
    lab3 = AuxiliaryLabeler(rot_model(), tasks=TransformLabels([None, *fine]))
    lab3.load_state_dict(lab2.state_dict())
    torch.random.set_rng_state(state)
    torch.testing.assert_close(lab3(x, y)["loss"], out["loss"])
    one = AuxiliaryLabeler(rot_model(), tasks=TransformLabels(*colour_permutations()))
    with pytest.raises(ValueError, match=r"colour permutations need images \(N, 3, H, W\) with 3 "
                       r"channels, got shape \(6, 1, 4, 4\)"):  # fmt: skip
        one(torch.randn(N, 1, 4, 4, dtype=torch.float64), y)


@pytest.mark.parametrize("views", ["all", "one"])
def test_fraction_trains_the_task_on_a_random_part_of_the_batch(views: str) -> None:
    """No BatchNorm, so each image's features do not depend on the rest of the batch: the
    task loss with ``fraction`` equals the full task's loss on the same drawn subset."""
    x, y = rot_batch()
    part = AuxiliaryLabeler(rot_model(), tasks=TransformLabels(views=views, fraction=0.5))
    whole = AuxiliaryLabeler(rot_model(), tasks=TransformLabels(views=views))
    whole.load_state_dict(part.state_dict())
    rows: list[int] = []
    hook = part.model[1].register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    torch.manual_seed(3)
    out = part(x, y)
    hook.remove()
    torch.manual_seed(3)
    subset = torch.randperm(N)[:3]
    ref = whole(x[subset], y[subset])  # "one": the same transform draws follow the subset's
    torch.testing.assert_close(out["task_losses"]["transform"], ref["task_losses"]["transform"])
    assert out["logits"].shape == (N, C)  # the primary loss is on the whole batch
    extra = 3 * (K - 1) if views == "all" else 3  # the views forwarded beside the batch
    assert rows == [N + extra]
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0"):
        TransformLabels(fraction=0)
    with pytest.raises(ValueError, match=r"distill needs every image's views: fraction=1"):
        TransformLabels(form="joint", distill=1.0, fraction=0.5)
