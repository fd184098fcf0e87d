"""Weights from the Hugging Face hub: what a component downloads (``iif-prefetch``) and the one error a run gives
when a weight is missing offline.

A component whose weights come from the hub (a Stable Diffusion pipeline, a CLIP model, ImageReward) declares them
with a classmethod ``hub_downloads(cfg) -> list[HubDownload]`` that reads only its config node (nothing is built,
nothing loaded), so ``iif-prefetch`` can fetch every weight a composed config needs on a machine with internet and
compute nodes then run with ``HF_HUB_OFFLINE=1``. Loading code turns a missing weight into
:func:`missing_weights`: one line naming the model and the prefetch command.
"""
from __future__ import annotations

import os
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from iif.utils import ConfigError

PREFETCH_HINT = "iif-prefetch <the run's overrides>"
# diffusers (0.42) still passes huggingface_hub an argument it ignores, and every load warns about it: noise a user
# cannot act on, printed above the one error line of a missing weight
warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated", category=UserWarning)


class MissingWeights(ConfigError):
    """A hub weight that is neither in the local cache nor downloadable (offline); raised before compute."""


@dataclass(frozen=True)
class HubDownload:
    """One hub repository (or the part of it, ``allow_patterns``) a component loads.

    Attributes:
        repo_id: the hub id, e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
        allow_patterns: glob patterns of the files needed (None: the whole repository).
        what: the config key that names it (for messages), e.g. ``base_model.pretrained``; ``iif-prefetch``
            prefixes a key relative to the component's node (``pretrained``) with the node's path.
    """

    repo_id: str
    allow_patterns: tuple[str, ...] | None = None
    what: str = ""
    revision: str | None = field(default=None)


def is_hub_id(pretrained: str | None) -> bool:
    """Whether ``pretrained`` names a hub repository: not ``tiny`` (random weights built in code), not an existing
    local folder or file."""
    return bool(pretrained) and pretrained != "tiny" and not Path(os.path.expanduser(str(pretrained))).exists()


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: nothing may be downloaded."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def missing_weights(what: str, repo_id: str, cause: BaseException | None = None) -> MissingWeights:
    """The one-line error for a weight that could not be loaded: the config key, the model, why, and the fix."""
    why = " ".join(str(cause).split())[:300] if cause is not None else ""
    mode = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline() else "it could not be loaded"
    return MissingWeights(f"{what}: '{repo_id}': {mode} ({type(cause).__name__ if cause else 'missing'}"
                          f"{': ' + why if why else ''}); fetch every weight of this config on a machine with "
                          f"internet with `{PREFETCH_HINT}` (HF_HOME chooses the cache), or point {what} at a local "
                          "folder")


def with_prefetch_command(error: Exception, overrides: list[str]) -> Exception:
    """``error`` with the placeholder of :func:`missing_weights`'s remedy replaced by the command for the run at hand,
    ``iif-prefetch <overrides>`` (quoted for a shell); any other error unchanged."""
    if not isinstance(error, ConfigError) or PREFETCH_HINT not in str(error):  # (instantiation re-wraps the error)
        return error
    command = " ".join(["iif-prefetch", *(shlex.quote(o) for o in overrides)])
    return MissingWeights(str(error).replace(PREFETCH_HINT, command))


def hub_file(source: str, filename: str, what: str) -> Path:
    """One weight file of a component: ``source`` itself when it is a local file, ``source/filename`` when it is a
    local folder, else ``filename`` of the hub repository ``source`` (``hf_hub_download``: the local cache first,
    HF_HOME chooses it). A file that cannot be had raises :func:`missing_weights` naming the config key ``what``."""
    local = Path(os.path.expanduser(str(source)))
    if local.is_file():
        return local
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise MissingWeights(f"{what}: the folder '{source}' has no file '{filename}'")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(str(source), filename))
    except (OSError, ValueError, EntryNotFoundError) as e:  # not cached offline, no connection, no such repo or file
        raise missing_weights(what, f"{source}/{filename}", e) from None
