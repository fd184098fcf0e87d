"""Energies ``E(x)`` of unnormalised densities ``exp(-E(x))`` with an exact or reference ``log Z`` and exact
samples: the ground truth of the sampling experiments, where the reward ``r = -E - log p_base``
(:class:`iif.rewards.energy.EnergyReward`) turns sampling from ``exp(-E) / Z`` into tilting ``p_base``.

* :class:`iif.energies.gaussian.QuadraticEnergy`: a Gaussian, ``log Z`` in closed form.
* :class:`iif.energies.gmm.GMMEnergy`: an isotropic Gaussian mixture with a chosen normaliser ``log Z``.
* :class:`iif.energies.double_well.DoubleWellEnergy`: an asymmetric double well, ``log Z`` by quadrature.
"""
