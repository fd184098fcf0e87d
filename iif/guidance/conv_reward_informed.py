"""``conv_reward_informed``: the reward-informed h-transform for images [IIF 16]:
``h(x_t, t | c) = NN1(x_t, x0_hat, grad r(x0_hat | c), t, c) + NN2(t) * grad r(x0_hat | c)``, NN1 a small UNet."""
from __future__ import annotations

import torch

from iif.base_models.unet import build_unet, network_timestep
from iif.guidance.base import Guidance
from iif.nn import TimeMLP
from iif.rewards.base import Reward

Tensor = torch.Tensor


class ConvRewardInformedGuidance(Guidance):
    """Reward-informed guidance on ``[C, H, W]`` samples (docs/methods.md §4.4).

    NN1 is a ``UNet2DModel`` on the ``3C`` channels ``[x_t, x0_hat, grad r(x0_hat)]`` (plus the condition's channels
    when the condition is an image, e.g. a measurement ``y``, resized to ``H x W``), with a class embedding when the
    condition is a label; its output convolution is zero-initialised. NN2 is a scalar MLP of ``t``, initialised to the
    constant ``nn2_init`` (default 0: ``h == 0`` at initialisation). ``grad r`` is taken at the frozen base's Tweedie
    estimate, as an input feature.

    Args:
        base: the frozen base model (sample shape).
        reward: a differentiable reward.
        block_out_channels, layers_per_block, norm_num_groups: NN1's size.
        num_classes: NN1 embeds a class-label condition (None: labels are not an input).
        cond_channels: channels of an image condition concatenated to NN1's input (0: none).
        t_dim, nn2_hidden: NN2's size.
        nn2_init: NN2's value at initialisation, a constant (its last layer's bias; weights 0). 0 (default): ``h == 0``,
            the first iteration samples the base model; ``a > 0``: the paper's MNIST choice ("NN2 initialised
            constant"), the first iteration samples the base guided by ``a * grad r(x0_hat)`` (the path RND accounts
            for it).
        nn2_scale: ``s_2``: ``NN2(t) = s_2 MLP(t)``. The optimiser moves ``MLP``'s weights by about its learning
            rate a step (Adam), so ``NN2`` by about ``s_2`` times that: ``s_2 < 1`` resolves a coefficient of
            ``grad r`` smaller than the learning rate (super-resolution: the optimal coefficient is about 1e-3 at
            high noise, docs/images.md). ``nn2_init`` stays ``NN2``'s value at initialisation.
        nn2_prior: ``NN2(t) = kappa(t) + s_2 MLP(t)``: the learned coefficient is a correction to ``kappa``, the
            optimal coefficient for a Gaussian base ``N(0, I)`` (the reward's ``gaussian_kappa``; super-resolution
            has one). At initialisation ``h = (kappa(t) + nn2_init) grad r``, a closed-form guidance that IIF's
            weights then correct towards the model's own posterior (experiments/figure2: at CI scale it starts
            at SC loss 123 and consistency 1.8, against the base's 3367 and 105). Beyond the paper.
        grad_feature_scale: ``s``: NN1 sees ``s * grad r(x0_hat)`` (NN2's term keeps ``grad r``). A reward whose
            gradient is large by construction (super-resolution: ``-A^T (Ax - y) / sigma_y^2``, 400 times the residual
            at ``sigma_y = 0.05``) feeds NN1 inputs hundreds of times the size of ``x``; ``s = sigma_y^2`` makes
            it the residual. Measured on figure2 at CI scale it did not remove seed 0's early blow-up (whose cause
            was NN2's sign, which ``nn2_scale`` mends), so the experiments keep ``s = 1``.
    """

    requires = frozenset({"differentiable_reward"})

    def __init__(self, base, reward: Reward, block_out_channels=(32, 64), layers_per_block: int = 1,
                 norm_num_groups: int = 8, num_classes: int | None = None, cond_channels: int = 0, t_dim: int = 32,
                 nn2_hidden: int = 64, nn2_init: float = 0.0, grad_feature_scale: float = 1.0,
                 nn2_scale: float = 1.0, nn2_prior: bool = False):
        super().__init__()
        if nn2_prior and not hasattr(reward, "gaussian_kappa"):
            raise ValueError(f"guidance.nn2_prior=true needs a reward with a closed-form Gaussian coefficient "
                             f"(gaussian_kappa, e.g. reward=superres); reward '{reward.name}' has none")
        self.nn2_prior = bool(nn2_prior)
        for name, value in (("grad_feature_scale", grad_feature_scale), ("nn2_scale", nn2_scale)):
            if not value > 0:
                raise ValueError(f"guidance.{name} must be > 0, got {value}")
        self.grad_feature_scale, self.nn2_scale = float(grad_feature_scale), float(nn2_scale)
        self.reward, self.num_classes, self.cond_channels = reward, num_classes, cond_channels
        self.base_schedule = base.schedule
        c = base.sample_shape[0]
        self.nn1 = build_unet(base.sample_shape, block_out_channels, layers_per_block, norm_num_groups,
                              num_classes, in_channels=3 * c + cond_channels, out_channels=c)
        torch.nn.init.zeros_(self.nn1.conv_out.weight)
        torch.nn.init.zeros_(self.nn1.conv_out.bias)
        self.nn2 = TimeMLP(0, 1, hidden=nn2_hidden, layers=2, t_dim=t_dim, zero_init=True)
        torch.nn.init.constant_(self.nn2.head.bias, float(nn2_init) / self.nn2_scale)

    def forward(self, x: Tensor, t: Tensor, x0_hat: Tensor, cond: Tensor | None = None) -> Tensor:
        grad_r = self.reward.grad_log_tilt(x0_hat, cond).to(x.dtype)  # [B, C, H, W]
        inputs = [x, x0_hat, self.grad_feature_scale * grad_r]
        labels = None
        if cond is not None and cond.dim() == 4:  # an image condition: resized and stacked as channels
            inputs.append(torch.nn.functional.interpolate(cond.to(x.dtype), size=x.shape[-2:], mode="nearest"))
        elif cond is not None and self.num_classes is not None:
            labels = cond.long()
        nn1 = self.nn1(torch.cat(inputs, dim=1), network_timestep(self.base_schedule, t), class_labels=labels).sample
        return nn1 + self.nn2_coefficient(t).view(-1, 1, 1, 1) * grad_r

    def nn2_coefficient(self, t: Tensor) -> Tensor:
        """``NN2(t) = s_2 MLP(t)`` (plus ``kappa(t)`` with ``nn2_prior``), the coefficient of ``grad r`` in ``h``:
        ``t [B] -> [B, 1]``."""
        coef = self.nn2_scale * self.nn2(t.new_zeros(t.shape[0], 0, dtype=self.nn2.head.weight.dtype), t)
        if self.nn2_prior:
            kappa = self.reward.gaussian_kappa(self.base_schedule.alpha(t), self.base_schedule.sigma(t))
            coef = coef + kappa.to(coef.dtype).view(-1, 1)
        return coef
