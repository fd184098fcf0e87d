"""What every latent text-to-image diffusers model here shares (``sd15``, ``sd3``): classifier-free guidance, the
prompt-embedding cache, the adapter host of :mod:`iif.guidance.lora`, decoding through the VAE, the memory options,
and the list of hub files a run loads (docs/text-to-image-models.md).

The frozen base is ``pred_w(z_t, t | c) = pred(z_t, t | "") + w (pred(z_t, t | c) - pred(z_t, t | ""))`` (CFG with
scale ``w``, in the network's own prediction type, converted to ``eps`` by :meth:`BaseModel.to_eps`) on the latents
``z`` of an ``AutoencoderKL``; the condition ``c`` of a sample is the index of its prompt in ``prompts``
(``iif.conditions.prompts``). Methods see latents; rewards see pixels through :meth:`TextToImageBase.decode`.
"""
from __future__ import annotations

import contextlib
import math
from typing import ClassVar

import torch
from torch import nn

from iif.base_models.base import DTYPES, BaseModel
from iif.hub import HubDownload, is_hub_id, missing_weights
from iif.nn import set_adapters_enabled
from iif.schedules.base import GaussianPath

Tensor = torch.Tensor

SLICINGS = ("auto", "max")  # or a positive int; None / false: off


def check_options(prompts, guidance_scale: float, dtype: str, attention_slicing) -> list[str]:
    """Validate the options every text-to-image base takes (before anything is loaded); returns the prompts as
    strings. Each error is one line naming the config key."""
    if dtype not in DTYPES:
        raise ValueError(f"base_model.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if not guidance_scale >= 0:
        raise ValueError(f"base_model.guidance_scale must be >= 0, got {guidance_scale}")
    if not (attention_slicing is None or attention_slicing is False or attention_slicing in SLICINGS
            or (type(attention_slicing) is int and attention_slicing >= 1)):
        raise ValueError(f"base_model.attention_slicing must be null, auto, max or a positive int, "
                         f"got '{attention_slicing}'")
    texts = [str(p) for p in prompts or ()]
    if not texts:
        raise ValueError("base_model.prompts must list at least one prompt (conditions=prompts sets it)")
    return texts


def weight_files(subfolder: str, stem: str = "diffusion_pytorch_model") -> tuple[str, ...]:
    """``allow_patterns`` of one component's config and safetensors weights, one file or sharded (no ``.bin``, no
    ``fp16``/``non_ema`` variants): ``{subfolder}/config.json``, ``{stem}.safetensors``,
    ``{stem}-*-of-*.safetensors`` and ``{stem}.safetensors.index.json``."""
    return (f"{subfolder}/config.json", f"{subfolder}/{stem}.safetensors", f"{subfolder}/{stem}-*-of-*.safetensors",
            f"{subfolder}/{stem}.safetensors.index.json")


@contextlib.contextmanager
def loading_errors(pretrained: str):
    """A component that cannot be loaded: :func:`iif.hub.missing_weights` for a hub id (one line naming the model
    and the prefetch command), a one-line ``OSError`` naming ``base_model.pretrained`` for a local folder."""
    try:
        yield
    except OSError as e:
        if is_hub_id(pretrained):
            raise missing_weights("base_model.pretrained", pretrained, e) from e
        raise OSError(f"base_model.pretrained: could not load '{pretrained}' (a folder in the diffusers layout): "
                      f"{' '.join(str(e).split())[:300]}") from e


class TextToImageBase(BaseModel):
    """A diffusers denoiser (UNet or transformer) + AutoencoderKL + text encoders, with classifier-free guidance.

    ``predict(z, t, c)`` (in :attr:`prediction_type`), for ``z [B, C, h, w]``, ``t [B]``, ``c [B]`` prompt indices:

    1. text inputs ``e(c)``, ``e("")``: the denoiser's keyword arguments (:meth:`conditioning`), cached per prompt
    2. ``k = timestep_scale * schedule.network_time(t)``                       (the denoiser's timestep)
    3. ``net``: the host denoiser, with its adapters on only inside :meth:`adapter_enabled` (or the network given
       to it)
    4. ``w == 1`` (or inside :meth:`conditional_only`): ``net(z, k, e(c))``; else
       ``u, v = net([z; z], [k; k], [e(""); e(c)])`` on the doubled batch (``cfg_chunk``: two passes,
       ``u = net(z, k, e(""))``, ``v = net(z, k, e(c))``: half the peak activations)
    5. ``u + w (v - u)``

    Subclasses load their components, implement :meth:`_encode` (texts -> the denoiser's text inputs) and
    :meth:`hub_files`, and name their denoiser and its LoRA loader (class attributes).

    Args:
        components: ``{name: module or tokenizer}``: the denoiser under :attr:`denoiser_name`, ``vae``, the text
            encoders and tokenizers the subclass's :meth:`_encode` uses (a None entry is kept as None).
        schedule, sample_shape, prediction_type: see :class:`BaseModel`.
        texts: the prompts a condition indexes.
        guidance_scale: CFG scale ``w`` (1: no CFG, one network evaluation per call).
        dtype: ``float32``, ``float16`` or ``bfloat16``: the weights and the network's arithmetic (samples, the CFG
            combination and what methods compute stay in the samples' dtype).
        gradient_checkpointing: recompute the denoiser's activations in the backward pass (only where gradients
            flow through it: LoRA training, the pathwise and adjoint methods); less memory for one more forward pass
            of the denoiser's blocks per backward.
        attention_slicing: compute attention in slices (None: off; ``auto``, ``max`` or an int; the meaning is the
            subclass's :meth:`_slice_attention`).
        vae_tiling: decode in overlapping tiles (``vae.enable_tiling()``): large images at bounded memory; tile seams
            are blended, so pixels differ slightly from an untiled decode.
        vae_slicing: decode a batch one image at a time (``vae.enable_slicing()``): the decoder's activations of one
            512 px image instead of the batch's (a training round decodes all its samples for the reward); the same
            pixels up to float rounding.
        cpu_offload: keep the text encoders and the VAE on the CPU and only the denoiser on the run's device
            (:meth:`place`): prompts are encoded on the CPU (once per prompt), and :meth:`decode` copies the VAE's
            weights to the latents' device for the call (freed after it).
        cfg_chunk: evaluate the unconditional and conditional halves of CFG in two passes instead of one doubled
            batch (step 4): less peak memory, the same result up to float rounding.

    Attributes:
        denoiser_name: the denoiser's attribute and diffusers component name (``unet``, ``transformer``): the prefix
            of its keys in a diffusers LoRA file.
        lora_loader: the name in ``diffusers.loaders`` of the pipeline's LoRA loader mixin (saves and loads the
            LoRA files a stock pipeline's ``load_lora_weights`` reads).
        lora_target_modules: the denoiser's layers a LoRA adapter targets by default (``guidance.target_modules:
            null``).
        timestep_scale: the denoiser's timestep per unit of ``schedule.network_time(t)``.
        evals_per_call: 2 with CFG (``w != 1``), else 1.
        adapter_host: the network a LoRA adapter is added to (the denoiser).
    """

    provides = frozenset({"differentiable_base", "adapter_host", "null_condition"})
    latent = True
    denoiser_name: ClassVar[str]
    lora_loader: ClassVar[str]
    lora_target_modules: ClassVar[tuple[str, ...]]
    timestep_scale: ClassVar[float] = 1.0

    def __init__(self, components: dict, schedule: GaussianPath, sample_shape: tuple[int, ...], prediction_type: str,
                 texts: list[str], guidance_scale: float, dtype: str, gradient_checkpointing: bool = False,
                 attention_slicing=None, vae_tiling: bool = False, cpu_offload: bool = False,
                 cfg_chunk: bool = False, vae_slicing: bool = False):
        super().__init__(schedule, sample_shape, prediction_type)
        for name, part in components.items():
            setattr(self, name, part)
        self.to(DTYPES[dtype])
        self.requires_grad_(False).eval()
        self.texts, self.guidance_scale, self.dtype = texts, float(guidance_scale), DTYPES[dtype]
        self.evals_per_call = 1 if self.guidance_scale == 1 else 2
        self.cpu_offload, self.cfg_chunk = bool(cpu_offload), bool(cfg_chunk)
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing(self._checkpoint_function())
        if attention_slicing is not None and attention_slicing is not False:
            self._slice_attention(attention_slicing)
        if vae_tiling:
            self.vae.enable_tiling()
        if vae_slicing:
            self.vae.enable_slicing()
        self._embeddings: dict[int, dict[str, Tensor]] = {}  # prompt index (-1: "") -> {keyword: [...]}, on device
        self._cfg = self.evals_per_call == 2  # CFG on (off inside conditional_only())
        self._active: nn.Module | None = None  # the network predict runs inside adapter_enabled()
        self._latest = None  # (x, x version, t, cond, CFG on, eps) of the latest eps call outside adapter_enabled()

    # ------------------------------------------------------------------ components
    @property
    def denoiser(self) -> nn.Module:
        """The UNet or transformer."""
        return getattr(self, self.denoiser_name)

    def _checkpoint_function(self):
        """diffusers' ``gradient_checkpointing_func``: ``torch.utils.checkpoint`` (non-reentrant) whose recomputation,
        in the backward pass, runs with the host's adapters on or off as they were in the forward pass (the backward
        usually runs after :meth:`adapter_enabled` has turned them off again). A closure, not a bound method: a copy
        of the denoiser (``copy.deepcopy``) must not copy the base."""
        base = self

        def checkpoint(module, *args):
            adapters_on = base._active is not None and base._active is base.denoiser
            contexts = lambda: (contextlib.nullcontext(), base._host_adapters(adapters_on))  # noqa: E731
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)

        return checkpoint

    @contextlib.contextmanager
    def _host_adapters(self, on: bool):
        """Within: the host's adapters on or off; after: as :meth:`adapter_enabled` has them."""
        now = self._active is not None and self._active is self.denoiser
        if on != now:
            set_adapters_enabled(self.denoiser, on)
        try:
            yield
        finally:
            if on != now:
                set_adapters_enabled(self.denoiser, now)

    def _slice_attention(self, size) -> None:
        """Compute attention in slices of ``size`` (``auto``, ``max`` or an int)."""
        raise NotImplementedError(f"{type(self).__name__} has no attention slicing")

    @classmethod
    def hub_files(cls, cfg) -> tuple[str, ...]:
        """The files of the pipeline's repository that the base loads (``allow_patterns``), for config ``cfg``."""
        raise NotImplementedError

    @classmethod
    def hub_downloads(cls, cfg) -> list[HubDownload]:
        """What ``iif-prefetch`` downloads for the base-model config node ``cfg``: the pipeline's subfolders this base
        loads, safetensors only; nothing for ``pretrained: tiny`` or a local folder."""
        pretrained = cfg.get("pretrained")
        if not is_hub_id(pretrained):
            return []
        return [HubDownload(str(pretrained), tuple(cls.hub_files(cfg)), "base_model.pretrained")]

    # ------------------------------------------------------------------ devices
    def place(self, device: torch.device) -> "TextToImageBase":
        """Move the model to ``device``; with ``cpu_offload`` only the denoiser moves (the rest stays on the CPU)."""
        self._embeddings.clear()
        self._latest = None
        if not self.cpu_offload:
            return super().place(device)
        self.to("cpu")
        self.denoiser.to(device)
        self.device = torch.device(device)
        return self

    # ------------------------------------------------------------------ text
    def _encode(self, texts: list[str]) -> dict[str, Tensor]:
        """``n`` texts -> the denoiser's text keyword arguments, each ``[n, ...]`` (no gradient)."""
        raise NotImplementedError

    def conditioning(self, cond: Tensor) -> dict[str, Tensor]:
        """``[B]`` prompt indices (-1: the empty prompt) -> the denoiser's text inputs ``{keyword: [B, ...]}`` on
        :attr:`device`, encoded once per prompt and cached."""
        idx = cond.long().view(-1).tolist()
        bad = [i for i in idx if not -1 <= i < len(self.texts)]
        if bad:
            raise IndexError(f"prompt index {bad[0]} outside the {len(self.texts)} prompts of base_model.prompts")
        missing = sorted(set(idx) - self._embeddings.keys())
        if missing:
            with torch.no_grad():
                encoded = self._encode(["" if i < 0 else self.texts[i] for i in missing])
            for j, i in enumerate(missing):
                self._embeddings[i] = {key: value[j].to(self.device) for key, value in encoded.items()}
        return {key: torch.stack([self._embeddings[i][key] for i in idx]) for key in self._embeddings[idx[0]]}

    def null_condition(self, cond: Tensor) -> Tensor:
        """The empty prompt (index -1) in place of every prompt of ``cond [B]``."""
        return torch.full_like(cond, -1)

    # ------------------------------------------------------------------ the network
    def predict(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """CFG prediction (in :attr:`prediction_type`): ``x [B, C, h, w]``, ``t [B]``, ``cond [B]`` prompt indices."""
        if cond is None:
            raise ValueError(f"base_model {type(self).__name__} needs a prompt per sample (conditions=prompts); "
                             "got cond=None")
        # 1. text inputs; 2. timestep; 3. network
        net = self.denoiser if self._active is None else self._active
        # the network's own dtype: a network given to adapter_enabled (a float32 trainable copy of a half-precision
        # denoiser) computes in its precision
        dtype = self.dtype if self._active is None else next(net.parameters()).dtype
        text = {key: v.to(dtype) for key, v in self.conditioning(cond).items()}
        k = self.timestep_scale * self.schedule.network_time(t)
        z = x.to(dtype)
        # 4. one pass without CFG (w == 1, or inside conditional_only())
        if not self._cfg:
            return net(z, timestep=k, **text).sample.to(x.dtype)
        empty = {key: v.to(dtype) for key, v in self.conditioning(torch.full_like(cond.view(-1), -1)).items()}
        if self.cfg_chunk:
            uncond = net(z, timestep=k, **empty).sample.to(x.dtype)
            conditional = net(z, timestep=k, **text).sample.to(x.dtype)
        else:
            both = net(torch.cat([z, z]), timestep=torch.cat([k, k]),
                       **{key: torch.cat([empty[key], text[key]]) for key in text}).sample
            uncond, conditional = both.to(x.dtype).chunk(2)
        # 5. CFG combination
        return uncond + self.guidance_scale * (conditional - uncond)

    def eps(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """:meth:`BaseModel.eps`; an evaluation outside :meth:`adapter_enabled` is remembered for :meth:`frozen_eps`."""
        e = super().eps(x, t, cond)
        self._latest = None if self._active is not None else (x, x._version, t, cond, self._cfg, e)
        return e

    def frozen_eps(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The base's (adapter-off) noise prediction at ``(x, t, cond)``: the latest :meth:`eps` result if it was
        evaluated at these very tensors (the sampler and the IIF loss evaluate the base right before the guidance,
        so the guidance need not evaluate it again), else a new, counted evaluation."""
        latest = self._latest
        if (latest is not None and latest[0] is x and latest[1] == x._version and latest[2] is t
                and latest[3] is cond and latest[4] == self._cfg):
            return latest[5]
        if self._active is not None:
            raise RuntimeError("frozen_eps called with the adapter enabled")
        return self.eps(x, t, cond)

    @contextlib.contextmanager
    def conditional_only(self):
        """Within this context :meth:`predict` is the denoiser's prediction at the prompt alone, without
        classifier-free guidance (one network evaluation per sample and call; for losses computed "with CFG in
        sampling only"). The identity when ``w == 1``."""
        saved = self._cfg, self.evals_per_call
        self._cfg, self.evals_per_call = False, 1
        try:
            yield
        finally:
            self._cfg, self.evals_per_call = saved

    # ------------------------------------------------------------------ adapter host (iif.guidance.lora)
    @property
    def adapter_host(self) -> nn.Module:
        return self.denoiser

    @contextlib.contextmanager
    def adapter_enabled(self, network: nn.Module | None = None):
        """Within this context :meth:`predict` and :meth:`eps` run the denoiser with its adapters on, or, if given,
        ``network`` (called as the denoiser is: ``network(z, timestep=k, **text).sample``; e.g. a trainable copy of
        the denoiser for full fine-tuning) in its place; counted in :attr:`nfe` like the base's own calls. Outside
        it the base runs the denoiser with its adapters off."""
        if self._active is not None:
            raise RuntimeError("adapter_enabled() is not reentrant")
        host = self.denoiser
        if network is None:
            set_adapters_enabled(host, True)
        self._active = host if network is None else network
        try:
            yield
        finally:
            if network is None:
                set_adapters_enabled(host, False)
            self._active = None

    # ------------------------------------------------------------------ pixels
    def decode(self, x: Tensor) -> Tensor:
        """Latents ``[B, C, h, w]`` -> pixels ``[B, 3, H, W]`` in ``[-1, 1]``: ``vae.decode(x / scaling_factor
        + shift_factor)``, clamped (as diffusers' image processor does); differentiable. With ``cpu_offload`` the
        VAE's weights are copied to ``x``'s device for this call."""
        cfg = self.vae.config
        z = x.to(self.dtype) / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        if not self.cpu_offload:
            return self.vae.decode(z).sample.to(x.dtype).clamp(-1, 1)
        # the VAE stays where it is; its weights are copied to z's device for this call (no copy on the same device)
        weights = {f"vae.{name}": w.to(z.device) for name, w in (*self.vae.named_parameters(),
                                                                    *self.vae.named_buffers())}
        return torch.func.functional_call(_Decoder(self.vae), weights, (z,)).to(x.dtype).clamp(-1, 1)


class _Decoder(nn.Module):
    """``forward(z) = vae.decode(z).sample`` (for ``torch.func.functional_call`` with the weights on another device)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode(z).sample


class BatchSlicedAttention:
    """An attention processor that runs another on slices of the batch (``size`` samples at a time; ``auto``: two
    slices, ``max``: one sample a slice), concatenating the outputs: the attention scores of only one slice are held
    at a time. The same values as the wrapped processor up to float rounding. For denoisers without diffusers'
    ``set_attention_slice`` (SD3's joint attention).

    Args:
        processor: the processor to wrap (e.g. ``JointAttnProcessor2_0``).
        size: ``auto``, ``max`` or samples per slice.
    """

    def __init__(self, processor, size):
        self.processor, self.size = processor, size

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, **kwargs):
        n = hidden_states.shape[0]
        size = {"auto": math.ceil(n / 2), "max": 1}.get(self.size, self.size)
        outs = []
        for start in range(0, n, size):
            rows = slice(start, start + size)
            outs.append(self.processor(
                attn, hidden_states[rows],
                encoder_hidden_states=None if encoder_hidden_states is None else encoder_hidden_states[rows],
                attention_mask=None if attention_mask is None else attention_mask[rows], **kwargs))
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outs))
        return torch.cat(outs)
