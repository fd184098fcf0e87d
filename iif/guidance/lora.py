"""``lora``: the h-transform as a LoRA adapter (peft) on the base's own network (docs/methods.md §4.4).

``h(x_t, t | c) = (eps_0(x_t, t | c) - eps_A(x_t, t | c)) / sigma(t)`` in score units: the adapted network
``eps_A`` (adapter on) minus the frozen base ``eps_0`` (adapter off), both with the base's classifier-free guidance,
at the same state. The guided score ``s_0 + h = -eps_A / sigma`` is the adapted model's, so sampling with ``h`` is
sampling the fine-tuned model, and the IIF loss ``||sigma (s_0 + h) + eps||^2 = ||eps - eps_A||^2`` is the usual
denoising loss of the adapted network. The adapter's ``B`` matrices start at 0, so ``h == 0`` exactly at
initialisation.

The base model must follow this protocol (:class:`AdapterBase`; ``base_model=sd15`` and ``sd3`` do, through
:class:`~iif.base_models.text_to_image.TextToImageBase`):

- ``adapter_host``: the ``nn.Module`` the adapter is added to, a diffusers ``ModelMixin`` (``add_adapter``,
  ``enable_adapters``/``disable_adapters``), e.g. the UNet or SD3's transformer;
- ``adapter_enabled()``: a context manager within which ``eps``/``predict`` run the host with its adapters on
  (counted in ``nfe``); outside it the base runs with them off;
- ``frozen_eps(x, t, cond)``: the base's (adapter-off) noise prediction, which may reuse the evaluation the
  caller has just made at the same tensors;
- ``schedule`` (``sigma(t)``) and ``eps`` of :class:`~iif.base_models.base.BaseModel`;
- ``lora_target_modules``: the host's layers an adapter targets by default;
- ``lora_loader`` and ``denoiser_name``: the diffusers LoRA loader mixin (its name in ``diffusers.loaders``) and the
  host's component name in a pipeline (the key prefix in its LoRA files), so the files :meth:`LoRAGuidance.
  save_adapter` writes load into a stock diffusers pipeline (``StableDiffusionPipeline``,
  ``StableDiffusion3Pipeline``) with ``load_lora_weights``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ContextManager, Protocol

import torch
from torch import nn

from iif.guidance.base import Guidance
from iif.nn import keep_requires_grad, set_adapters_enabled  # noqa: F401 (re-exported)

Tensor = torch.Tensor

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' `save_lora_weights` / `load_lora_weights` file


class AdapterBase(Protocol):
    """What :class:`LoRAGuidance` needs of the base model (see the module docstring)."""

    adapter_host: nn.Module
    lora_target_modules: Sequence[str]
    lora_loader: str
    denoiser_name: str

    def adapter_enabled(self) -> ContextManager: ...

    def frozen_eps(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor: ...

    def eps(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor: ...


class LoRAGuidance(Guidance):
    """A peft LoRA adapter on the base's network; ``h = (eps_base - eps_adapted) / sigma(t)``.

    One call evaluates the adapted network once (counted in the base's ``nfe``, with CFG: 2 per sample) and reuses
    the base's own evaluation at the same state (``base.frozen_eps``). The guidance's module tree holds the host
    network (``net``): its ``named_parameters()`` are the adapter's weights, trainable, and the host's own, frozen,
    so the optimiser, the EMA and checkpoints of ``iif.methods.optim.Trainer`` hold the adapter only.

    Args:
        base: the base model, following the adapter protocol of this module (e.g. ``base_model=sd15``, ``sd3``).
        reward: unused (every guidance is built with the same arguments).
        rank: LoRA rank ``r``.
        alpha: LoRA ``alpha`` (the update is scaled by ``alpha / r``); None: ``r``.
        target_modules: names of the host's linear layers that get an adapter (peft's suffix match); None: the
            base's ``lora_target_modules`` (SD 1.5: the attention projections ``to_q, to_k, to_v, to_out.0``; SD3:
            those and the joint attention's text-stream projections ``add_q_proj, add_k_proj, add_v_proj,
            to_add_out``).
        seed: the random initialisation of the ``A`` matrices (``B = 0``), independent of the run's RNG.
        adapter_name: the adapter's name in the host (and in saved files' metadata).
    """

    requires = frozenset({"adapter_host"})

    def __init__(self, base: AdapterBase, reward=None, rank: int = 4, alpha: float | None = None,
                 target_modules: Sequence[str] | None = None, seed: int = 0, adapter_name: str = "iif"):
        super().__init__()
        from peft import LoraConfig

        missing = [a for a in ("adapter_host", "adapter_enabled", "frozen_eps", "lora_loader", "denoiser_name")
                   if not hasattr(base, a)]
        if missing:
            raise TypeError(f"guidance=lora needs a base model whose network takes an adapter (e.g. base_model=sd15 "
                            f"or sd3); {type(base).__name__} has no {', '.join(missing)}")
        if target_modules is None:
            target_modules = getattr(base, "lora_target_modules", None)
            if not target_modules:
                raise ValueError(f"guidance.target_modules is null and {type(base).__name__} names no default "
                                 "targets; list the layers")
        target_modules = [str(m) for m in target_modules]
        if rank < 1:
            raise ValueError(f"guidance.rank must be >= 1, got {rank}")
        alpha = float(rank if alpha is None else alpha)
        if not alpha > 0:
            raise ValueError(f"guidance.alpha must be > 0, got {alpha}")
        host = base.adapter_host
        if getattr(host, "peft_config", None):  # diffusers' add_adapter would make the new one the only active one
            raise ValueError(f"the base's network already has an adapter ({', '.join(host.peft_config)}); build one "
                             "LoRA guidance per base model")
        names = [name for name, _ in host.named_modules()]
        if not any(n == m or n.endswith("." + m) for n in names for m in target_modules):  # peft's suffix match
            raise ValueError(f"guidance.target_modules {list(target_modules)} match no layer of the base's network "
                             f"(e.g. '{names[-1]}')")
        self.config = LoraConfig(r=int(rank), lora_alpha=alpha, target_modules=list(target_modules),
                                 init_lora_weights=True)  # A: Kaiming-uniform, B: 0
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            try:
                host.add_adapter(self.config, adapter_name=adapter_name)
            except ValueError as e:  # peft: no layer matched
                raise ValueError(f"guidance.target_modules {list(target_modules)}: {e}") from e
        self.adapter_name = adapter_name
        self.net = host  # a submodule: the adapter's parameters appear in named_parameters()
        self._base = (base,)  # not a submodule (the VAE and text encoder are not the guidance's)
        for name, p in host.named_parameters():
            p.requires_grad_(self._is_adapter(name))
            if self._is_adapter(name) and p.dtype != torch.float32:
                p.data = p.data.float()  # a half-precision host trains a float32 adapter (peft casts its input)
        set_adapters_enabled(host, False)  # the base's own calls run without the adapter

    @property
    def base(self) -> AdapterBase:
        return self._base[0]

    def _is_adapter(self, name: str) -> bool:
        """Whether ``name`` (a host parameter's name) is a weight of this adapter (``....lora_A.<name>.weight``)."""
        return f".{self.adapter_name}." in name and ".lora_" in name

    def adapter_parameters(self) -> dict[str, Tensor]:
        """The adapter's weights by their name in the host."""
        return {name: p for name, p in self.net.named_parameters() if self._is_adapter(name)}

    def forward(self, x: Tensor, t: Tensor, x0_hat: Tensor, cond: Tensor | None = None) -> Tensor:
        base = self.base
        eps0 = base.frozen_eps(x, t, cond)
        with base.adapter_enabled():
            eps_a = base.eps(x, t, cond)
        sigma = base.schedule.sigma(t.to(torch.float64)).to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
        return (eps0 - eps_a) / sigma

    # ------------------------------------------------------------------ files for diffusers users
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The adapter in peft's format (keys without the adapter name, e.g. ``...to_q.lora_A.weight``)."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.net, adapter_name=self.adapter_name)

    def _loader(self):
        """The base's diffusers LoRA loader mixin (e.g. ``StableDiffusionLoraLoaderMixin``, ``SD3LoraLoaderMixin``)."""
        import diffusers.loaders

        return getattr(diffusers.loaders, self.base.lora_loader)

    def save_adapter(self, directory: str | Path) -> Path:
        """Write the adapter as the base's diffusers LoRA loader's ``save_lora_weights`` does
        (``pytorch_lora_weights.safetensors``, keys prefixed by the host's component name, ``unet.`` or
        ``transformer.``, with the LoRA config as metadata), so the stock pipeline's ``load_lora_weights(directory)``
        (``StableDiffusionPipeline``, ``StableDiffusion3Pipeline``) applies it. Saves the current weights (inside
        ``trainer.sampling_weights()``: the EMA). Returns the file."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        metadata = self.net.peft_config[self.adapter_name].to_dict()
        name = self.base.denoiser_name
        layers = {f"{name}_lora_layers": state, f"{name}_lora_adapter_metadata": metadata}
        self._loader().save_lora_weights(directory, weight_name=WEIGHT_NAME, **layers)
        return Path(directory) / WEIGHT_NAME

    @torch.no_grad()
    def load_adapter(self, directory: str | Path) -> None:
        """Load weights written by :meth:`save_adapter` (or diffusers' ``save_lora_weights`` for an adapter of the
        host with the same rank and targets) into this adapter; every adapter weight must be in the file, and nothing
        else."""
        from peft import set_peft_model_state_dict

        loaded = self._loader().lora_state_dict(str(directory), weight_name=WEIGHT_NAME, return_lora_metadata=True)
        state, metadata = loaded[0], loaded[-1]  # (state, metadata), or (state, network alphas, metadata)
        component = self.base.denoiser_name
        prefix = component + "."
        ours = self.net.peft_config[self.adapter_name]
        for key, value in (("r", ours.r), ("lora_alpha", ours.lora_alpha)):
            saved = (metadata or {}).get(prefix + key)
            if saved is not None and float(saved) != float(value):
                raise ValueError(f"{directory}: the adapter was saved with {key}={saved}, this guidance has {value}")
        other = [k for k in state if not k.startswith(prefix)]
        if other:
            raise ValueError(f"{directory}: holds weights for other components than the {component}, e.g. "
                             f"'{other[0]}'")
        state = {k[len(prefix):]: v for k, v in state.items()}
        expected = self.adapter_state_dict()
        if state.keys() != expected.keys():
            diff = sorted(state.keys() ^ expected.keys())
            raise ValueError(f"{directory}: the adapter's weights do not match this guidance's (rank, "
                             f"target_modules): e.g. '{diff[0]}'")
        shapes = [k for k in state if state[k].shape != expected[k].shape]
        if shapes:
            raise ValueError(f"{directory}: weight '{shapes[0]}' has shape {tuple(state[shapes[0]].shape)}, this "
                             f"guidance's {tuple(expected[shapes[0]].shape)} (guidance.rank differs)")
        with keep_requires_grad(self.net):
            set_peft_model_state_dict(self.net, state, adapter_name=self.adapter_name)
