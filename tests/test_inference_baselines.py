"""The training-free baselines against independent references: classifier guidance's h (autograd of a
torch.distributions mixture; finite differences through Tweedie) and best-of-K (order statistics of the base)."""
from __future__ import annotations

import pytest
import torch
import torch.distributions as td

from iif.guidance.reward_gradient import ReconstructionGuidance, RewardGradient
from iif.build import build
from iif.config import compose
from iif.train import train
from iif.utils import ConfigError

MEANS = torch.tensor([[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-2.0, -2.0]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)


def _reference_log_q(x):
    mix = td.MixtureSameFamily(td.Categorical(WEIGHTS), td.MultivariateNormal(MEANS, torch.eye(2, dtype=torch.float64).expand(4, 2, 2)))
    return mix.log_prob(x)


def test_reward_gradient_guidance_is_gamma_times_grad_r():
    cfg, _ = compose(["base_model=gmm_exact", "logger=none", "method=cg", "reward.temperature=2.0"])
    comp = build(cfg)
    guide = comp.method.guide
    assert isinstance(guide, RewardGradient) and guide.gamma == 8.0
    x = (3 * torch.randn(64, 2, dtype=torch.float64)).requires_grad_(True)
    (ref,) = torch.autograd.grad(_reference_log_q(x).sum(), x)
    h = guide(x.detach(), torch.full((64,), 0.5, dtype=torch.float64), x.detach())
    assert torch.allclose(h, 8.0 * ref / 2.0, atol=1e-9)


def test_reconstruction_guidance_matches_finite_differences():
    """h = gamma grad_x r(x0_hat(x, t)): central differences of the composed scalar function."""
    cfg, _ = compose(["base_model=gmm_exact", "logger=none", "method=cg_tweedie", "method.guide.gamma=0.5"])
    comp = build(cfg)
    guide, base = comp.method.guide, comp.base
    assert isinstance(guide, ReconstructionGuidance)
    x = torch.tensor([[0.3, -1.1], [2.5, 1.0], [-1.7, 0.2]], dtype=torch.float64)
    t = torch.full((3,), 0.3, dtype=torch.float64)

    def f(z):
        return _reference_log_q(base.x0_hat(z, t, base.eps(z, t)))

    fd = torch.zeros_like(x)
    for d in range(2):
        e = torch.zeros_like(x)
        e[:, d] = 1e-5
        fd[:, d] = (f(x + e) - f(x - e)) / 2e-5
    assert torch.allclose(guide(x, t, x), 0.5 * fd, atol=1e-5)


@pytest.mark.slow
def test_topk_reward_law_is_the_max_of_k_base_draws():
    """E[r] of best-of-K equals E[max of K iid base rewards], from the empirical CDF of an independent base sample:
    E[max_K] = sum_i r_(i) ((i/n)^K - ((i-1)/n)^K)."""
    cfg, _ = compose(["base_model=gmm_exact", "logger=none", "method=topk", "sampler.n_steps=50"])
    comp = build(cfg)
    torch.manual_seed(0)
    r_topk = comp.reward(comp.method.sample(10_000).x0).double()
    torch.manual_seed(1)
    r_base, _ = torch.sort(comp.reward(comp.method.sampler.sample(comp.base, None, 100_000).x0).double())
    n = len(r_base)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    expected = (r_base * ((i / n) ** 4 - ((i - 1) / n) ** 4)).sum()
    assert r_topk.mean().item() == pytest.approx(expected.item(), abs=4 * r_topk.std().item() / 10_000 ** 0.5)


def test_cg_needs_a_differentiable_reward(tmp_path):
    cfg, choices = compose(["base_model=gmm_exact", "logger=none", "method=cg", "reward=gmm_blackbox"])
    with pytest.raises(ConfigError, match="method 'cg' needs differentiable reward.*reward 'gmm_blackbox'"):
        train(cfg, tmp_path / "r", choices)


def test_training_free_methods_run_and_topk_has_no_path_statistics(tmp_path):
    for method in ("cg", "topk"):
        cfg, choices = compose(["base_model=gmm_exact", "logger=none", f"method={method}", "debug=fast"])
        final = train(cfg, tmp_path / method, choices)
        assert 0 <= final["mode_tv"] <= 1
        assert ("sc_loss" in final) == (method == "cg")
