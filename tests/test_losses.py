import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cache.targets import TeacherTargets, stored_arrays
from pipeline.cache.targets import teacher_targets as teacher_targets_from_logits
from pipeline.train.losses import DistillationLoss, create_loss, soft_teacher_log_probs


def _soft_ce(x, target):
    return (-(target * F.log_softmax(x, -1)).sum(-1)).mean()


def _smooth(labels, c, eps=0.1):
    return F.one_hot(labels, c).float() * (1 - eps) + eps / c


def _data(b=8, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, c, generator=g) * 3
    cls, dist = torch.randn(b, c, generator=g), torch.randn(b, c, generator=g)
    target = _smooth(torch.randint(0, c, (b,), generator=g), c)
    return teacher, cls, dist, target


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_full_k_equals_direct_tempered_kl(tau):
    teacher, cls, dist, target = _data()
    c = teacher.shape[1]
    t = teacher_targets_from_logits(teacher, k=c)
    # fp16 rounding of the logits is the only error: |v - fp16(v)| <= |v| * 2**-11; a log-prob moves by at
    # most twice that over tau
    tol = 2 * teacher.abs().max().item() * 2 ** -11 / tau
    direct_logp = F.log_softmax(teacher / tau, -1)
    got = soft_teacher_log_probs(t, c, tau)
    assert (got - direct_logp).abs().max().item() <= tol
    assert (got - direct_logp).abs().max().item() > 0  # rounding really happened

    a = 0.5
    loss, parts = DistillationLoss("soft", alpha=a, tau=tau, num_classes=c)((cls, dist), target, t)
    p = direct_logp.exp()
    kl = (p * (direct_logp - F.log_softmax(dist / tau, -1))).sum(-1).mean() * tau ** 2
    expected = (1 - a) * _soft_ce(cls, target) + a * kl
    assert loss.item() == pytest.approx(expected.item(), abs=tol * tau ** 2)
    assert parts["distill"] == pytest.approx(kl.item(), abs=tol * tau ** 2)
    assert parts["base"] == pytest.approx(_soft_ce(cls, target).item(), abs=1e-6)


def test_soft_topk_tail_reconstruction_by_hand():
    # teacher logits over C=4: [1, -1, 2, 0]; the cache keeps K=2: values [2, 1] at classes [2, 0]
    full = [1.0, -1.0, 2.0, 0.0]
    z = sum(math.exp(v) for v in full)
    lse = math.log(z)
    t = TeacherTargets(argmax=torch.tensor([2]), topk_values=torch.tensor([[2.0, 1.0]]).half(),
                       topk_indices=torch.tensor([[2, 0]], dtype=torch.int16), logsumexp=torch.tensor([lse]))
    # tail mass (e^-1 + e^0)/Z spread over classes 1 and 3: tail logit = lse + log(mass/2) = log((e^-1 + 1)/2)
    tail = math.log((math.exp(-1) + 1) / 2)
    recon = [1.0, tail, 2.0, tail]

    # tau = 1: top-K probabilities exact, each tail class gets half the tail mass
    p1 = soft_teacher_log_probs(t, 4, 1.0).exp()[0].tolist()
    exp1 = [math.exp(1) / z, (math.exp(-1) + 1) / (2 * z), math.exp(2) / z, (math.exp(-1) + 1) / (2 * z)]
    assert p1 == pytest.approx(exp1, abs=1e-6)

    # tau = 2: temper the rebuilt logits
    tau = 2.0
    zt = sum(math.exp(r / tau) for r in recon)
    p = [math.exp(r / tau) / zt for r in recon]
    assert soft_teacher_log_probs(t, 4, tau).exp()[0].tolist() == pytest.approx(p, abs=1e-6)

    d = [0.5, 0.0, -0.5, 1.0]
    zq = sum(math.exp(x / tau) for x in d)
    q = [math.exp(x / tau) / zq for x in d]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    c_logits = [0.2, -0.3, 0.1, 0.0]
    y = [0.025, 0.925, 0.025, 0.025]  # label 1, smoothing 0.1
    zc = sum(math.exp(x) for x in c_logits)
    base = -sum(yi * (x - math.log(zc)) for yi, x in zip(y, c_logits))
    a = 0.3
    loss, parts = DistillationLoss("soft", alpha=a, tau=tau, num_classes=4)(
        (torch.tensor([c_logits]), torch.tensor([d])), torch.tensor([y]), t)
    assert loss.item() == pytest.approx((1 - a) * base + a * tau ** 2 * kl, abs=1e-6)
    assert parts["distill"] == pytest.approx(tau ** 2 * kl, abs=1e-6)


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_soft_targets_are_distributions(k, tau):
    teacher = _data(c=12)[0]
    p = soft_teacher_log_probs(teacher_targets_from_logits(teacher, k), 12, tau).exp()
    assert torch.allclose(p.sum(-1), torch.ones(p.shape[0]), atol=1e-6)
    assert (p <= 1).all() and (p > 0).all()


def test_topk_mass_above_one_is_clamped():
    # lse slightly too small (as fp16 rounding up of the top values can cause): sum p_k > 1
    t = TeacherTargets(None, torch.tensor([[3.0, 2.0]]), torch.tensor([[0, 1]]),
                       torch.tensor([math.log(math.exp(3) + math.exp(2)) - 1e-3]))
    for tau, bound in ((1.0, 1e-30), (2.0, 1e-15)):  # tail logit ~ lse - 88, tempered by tau
        logp = soft_teacher_log_probs(t, 5, tau)
        assert torch.isfinite(logp).all()
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
        assert (logp.exp()[0, 2:] < bound).all()


def test_hard_by_hand_and_online_argmax():
    teacher, cls, dist, target = _data(seed=1)
    t = teacher_targets_from_logits(teacher, k=0)
    assert torch.equal(t.argmax, teacher.argmax(-1))
    assert t.topk_values is None
    a = 0.5
    loss, parts = DistillationLoss("hard", alpha=a, num_classes=10)((cls, dist), target, t)
    ce_dist = -F.log_softmax(dist, -1)[torch.arange(8), teacher.argmax(-1)].mean()
    assert loss.item() == pytest.approx(((1 - a) * _soft_ce(cls, target) + a * ce_dist).item(), abs=1e-6)
    assert parts["distill"] == pytest.approx(ce_dist.item(), abs=1e-6)
    # a top-K teacher gives the same hard loss
    loss_k, _ = DistillationLoss("hard", alpha=a, num_classes=10)((cls, dist), target,
                                                                 teacher_targets_from_logits(teacher, 5))
    assert torch.equal(loss, loss_k)


def test_none_ignores_teacher_and_trains_both_heads():
    teacher, cls, dist, target = _data(seed=2)
    cls.requires_grad_(True)
    dist.requires_grad_(True)
    crit = DistillationLoss("none", num_classes=10)
    loss, parts = crit((cls, dist), target, None)
    loss2, _ = crit((cls, dist), target, teacher_targets_from_logits(teacher, 3))
    assert torch.equal(loss, loss2)
    expected = 0.5 * _soft_ce(cls, target) + 0.5 * _soft_ce(dist, target)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert cls.grad.abs().sum() > 0 and dist.grad.abs().sum() > 0
    # a single tensor (eval-style output) is both heads
    single, _ = crit(cls.detach(), target, None)
    assert single.item() == pytest.approx(_soft_ce(cls.detach(), target).item(), abs=1e-6)


@pytest.mark.parametrize("mode,k", [("soft", 3), ("soft", 10), ("hard", 3), ("hard", 0)])
def test_cache_and_online_identical(mode, k):
    teacher, cls, dist, target = _data(seed=3)
    online = teacher_targets_from_logits(teacher, k)
    # what the store writes, in its dtypes (docs/design.md, section 6)
    stored = {**stored_arrays(teacher.numpy(), k, np.dtype(np.int16)), "digest": np.zeros(8, np.uint32)}
    batch = {key: torch.from_numpy(v) for key, v in stored.items()}
    cached = TeacherTargets.from_batch(batch)
    assert cached.topk_values is None if not k else cached.topk_values.dtype == torch.float16
    for tau in (1.0, 2.0):
        crit = DistillationLoss(mode, alpha=0.5, tau=tau, num_classes=10)
        l_on, p_on = crit((cls, dist), target, online)
        l_ca, p_ca = crit((cls, dist), target, cached)
        assert torch.equal(l_on, l_ca) and p_on == p_ca


def test_mode_errors_are_named():
    teacher, cls, dist, target = _data()
    with pytest.raises(ValueError, match="distill.mode='kd' is unknown"):
        DistillationLoss("kd", num_classes=10)
    with pytest.raises(ValueError, match="distill.mode='bogus'"):
        create_loss({"mode": "bogus"}, 10)
    hard_only = teacher_targets_from_logits(teacher, 0)
    with pytest.raises(ValueError, match=r"distill.mode=soft needs topk_values/topk_indices/logsumexp.*"
                                         r"cache.topk=0.*missing: topk_values"):
        DistillationLoss("soft", num_classes=10)((cls, dist), target, hard_only)
    with pytest.raises(ValueError, match="distill.mode=soft.*no teacher targets"):
        DistillationLoss("soft", num_classes=10)((cls, dist), target, None)
    with pytest.raises(ValueError, match="distill.mode=hard needs argmax.*missing: argmax"):
        DistillationLoss("hard", num_classes=10)((cls, dist), target, TeacherTargets(None, None, None, None))
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss("hard", alpha=1.5, num_classes=10)
    with pytest.raises(ValueError, match="tau"):
        DistillationLoss("soft", tau=0.0, num_classes=10)


def test_create_loss_from_config():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"mode": "soft", "alpha": 0.25, "tau": 2.0, "source": "cache"})
    crit = create_loss(cfg, 7)
    assert (crit.mode, crit.alpha, crit.tau, crit.num_classes) == ("soft", 0.25, 2.0, 7)
    assert create_loss({"mode": "hard"}, 7).alpha == 0.5


@pytest.mark.parametrize("mode", ["none", "hard", "soft"])
def test_loss_decreases_with_sgd(mode):
    torch.manual_seed(0)
    n, d, c = 64, 16, 6
    x = torch.randn(n, d)
    teacher = x @ torch.randn(d, c)
    target = _smooth(teacher.argmax(-1).roll(1), c)  # labels disagree with the teacher a bit
    t = teacher_targets_from_logits(teacher, k=3)
    heads = torch.nn.ModuleList([torch.nn.Linear(d, c), torch.nn.Linear(d, c)])
    opt = torch.optim.SGD(heads.parameters(), lr=0.5)
    crit = DistillationLoss(mode, alpha=0.5, tau=2.0, num_classes=c)
    losses = []
    for _ in range(15):
        loss, _ = crit((heads[0](x), heads[1](x)), target, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))
