"""Start-up checks of a run's config: each fails before any compute with one :class:`~iif.utils.ConfigError` that
names the options involved and how to fix them."""
from __future__ import annotations

import contextlib
import re
import tempfile
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from iif import distributed
from iif.utils import ConfigError

# which config group provides each capability a component may require
PROVIDERS = {"differentiable_reward": "reward", "per_step_kernels": "sampler", "differentiable_base": "base_model",
             "adapter_host": "base_model"}


def check_sizes(cfg: DictConfig) -> None:
    """The loop's own counts: ``iterations``, ``eval_every`` >= 0, ``checkpoint_every`` >= 1."""
    for key in ("iterations", "checkpoint_every", "eval_every"):
        if cfg[key] < (1 if key == "checkpoint_every" else 0):
            raise ConfigError(f"{key} must be {'>= 1' if key == 'checkpoint_every' else '>= 0'}, got {cfg[key]}")


def check_pairing(cfg: DictConfig, choices: dict[str, str]) -> None:
    """Fail before any compute if a component needs a capability another component does not provide."""
    reward_cls, base_cls = get_class(cfg.reward._target_), get_class(cfg.base_model._target_)
    with config_errors():
        sampler = instantiate(cfg.sampler)  # cheap; what it provides may depend on its settings (DDIM's eta)
    provided = (set(base_cls.provides) | set(sampler.provides)
                | ({"differentiable_reward"} if reward_cls.differentiable else set()))
    method_cls = get_class(cfg.method._target_)
    needers = [("method", method_cls.requires)]
    if method_cls.uses_guidance:
        needers.append(("guidance", get_class(cfg.guidance._target_).requires))
    for group, needs in needers:
        for need in sorted(set(needs) - provided):
            provider = PROVIDERS.get(need, "?")
            raise ConfigError(
                f"{group} '{choices.get(group, '?')}' needs {need.replace('_', ' ')}, which {provider} "
                f"'{choices.get(provider, '?')}' does not provide; choose another {provider} or {group}")


def check_world(cfg: DictConfig, choices: dict[str, str], ranks: distributed.World) -> None:
    """A run of several processes needs a method that splits its work across them."""
    if ranks.size > 1 and not get_class(cfg.method._target_).data_parallel:
        raise ConfigError(f"method '{choices.get('method', '?')}' runs in one process, and this run has "
                          f"{ranks.size} (torchrun --nproc_per_node, or resources.tasks_per_node); run it with one "
                          "process, or use a data-parallel method (iif, reward_only, pathwise, vargrad, am)")


def config_error_from(e: Exception) -> ConfigError | None:
    """A constructor that rejected its arguments (a ``ValueError`` naming the key, e.g. ``method.n_samples must be
    >= 1, got 0``), or that was given a key it does not take (a ``TypeError``: a key the experiment set for another
    option of the group), is the user's error: one line, not Hydra's instantiation traceback. ``None`` for anything
    else (a bug keeps its traceback)."""
    cause = e
    while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
        cause = cause.__cause__
    key = re.search(r"full_key: (\S+)", str(e))
    unexpected = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(cause))
    if isinstance(cause, TypeError) and key and unexpected:  # a key another option set, e.g. sampler.eta for ddpm
        node = key.group(1)
        return ConfigError(f"{node}.{unexpected.group(2)}: {unexpected.group(1)} takes no such argument (the key was "
                           f"set for another option, e.g. by the experiment); remove it with ~{node}.{unexpected.group(2)}")
    if cause is e or not isinstance(cause, ValueError):
        return None
    message = " ".join(str(cause).split())
    if key and key.group(1) not in message:
        message = f"{key.group(1)}: {message}"
    return ConfigError(message)


@contextlib.contextmanager
def config_errors():
    """Instantiation inside: a constructor's rejection of its arguments becomes a one-line ``ConfigError``
    (:func:`config_error_from`)."""
    try:
        yield
    except InstantiationException as e:
        if (error := config_error_from(e)) is None:
            raise
        raise error from e


def check_cache_writable(base, choices: dict[str, str]) -> None:
    """A base model that pretrains and caches its weights (``cache_path()``) and finds none cached must be able to
    write them, or its pretraining is lost at the end (checked before pretraining; a read-only cache that already
    holds the weights is fine)."""
    cache_path = getattr(base, "cache_path", None)
    if cache_path is None or cache_path() is None or (path := Path(cache_path())).exists():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise ConfigError(
            f"base_model '{choices.get('base_model', '?')}' has no cached weights at {path} and cannot write them "
            f"there ({type(e).__name__}: {e.strerror or e}); set cache_dir (or IIF_CACHE) to a writable folder, or "
            "copy the weights there") from None
