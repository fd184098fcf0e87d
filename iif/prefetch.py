"""``iif-prefetch [--dry-run] [overrides...]``: fetch every Hugging Face hub weight a run's config needs, so that
compute nodes without internet can then run it with ``HF_HUB_OFFLINE=1``.

The config is composed from the overrides exactly as ``iif-train`` composes it; every node with a ``_target_``
(``base_model``, ``reward``, ``evaluation`` and nested ones) names a class, and a class with a classmethod
``hub_downloads(node) -> list[HubDownload]`` (:mod:`iif.hub`) says what it loads from the hub. The downloads are merged
per repository and revision, printed, and fetched with ``huggingface_hub.snapshot_download`` into the cache that
``HF_HOME`` (or ``HF_HUB_CACHE``) chooses. ``--dry-run`` prints only. Errors are one line ``iif-prefetch: error: ...``
and exit status 1 (among them: ``HF_HUB_OFFLINE`` set, with something to fetch).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from omegaconf import OmegaConf

from iif.hub import HubDownload, is_hub_id, offline
from iif.utils import ConfigError


def snapshot_download(**kwargs):
    """``huggingface_hub.snapshot_download`` (imported late; tests replace this function)."""
    from huggingface_hub import snapshot_download as download

    return download(**kwargs)


def target_nodes(node, path: str = ""):
    """Every ``(dotted path, node)`` of a resolved config container whose dict has a ``_target_``, outermost first."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield path, node
        for key, value in node.items():
            yield from target_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from target_nodes(value, f"{path}[{i}]")


def collect(cfg) -> tuple[list[HubDownload], list[str]]:
    """The hub downloads of a composed config, and notes on nodes that name a hub id but declare no downloads.

    Each node's class (``hydra.utils.get_object``: a ``_target_`` may also be a function) is asked for ``hub_downloads(node)``; a ``what`` relative to the
    node (``pretrained``) is prefixed with the node's path (``reward.pretrained``). Downloads of one repository and
    revision are merged: the union of their file patterns, or the whole repository if one of them wants it.
    """
    from hydra.utils import get_object

    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    merged: dict[tuple[str, str | None], HubDownload] = {}
    notes = []
    for path, node in target_nodes(container):
        try:
            target = get_object(node["_target_"])
        except Exception as e:  # noqa: BLE001 -- an unimportable class is the config's error: one line
            raise ConfigError(f"{path}._target_: cannot import '{node['_target_']}' ({type(e).__name__}: {e})") from None
        declare = getattr(target, "hub_downloads", None)
        if declare is None:
            pretrained = node.get("pretrained")
            if isinstance(pretrained, str) and is_hub_id(pretrained):
                notes.append(f"note: {path}.pretrained '{pretrained}' looks like a hub id, but {node['_target_']} "
                             "declares no hub_downloads: not fetched")
            continue
        for d in declare(OmegaConf.create(node)):
            what = d.what if d.what.startswith(f"{path}.") or d.what == path else f"{path}.{d.what or 'weights'}"
            d = replace(d, what=what)
            key = (d.repo_id, d.revision)
            if key in merged:
                old = merged[key]
                patterns = (None if old.allow_patterns is None or d.allow_patterns is None
                            else tuple(dict.fromkeys(old.allow_patterns + d.allow_patterns)))
                whats = old.what.split(", ")
                d = replace(old, allow_patterns=patterns,
                            what=", ".join(whats + ([d.what] if d.what not in whats else [])))
            merged[key] = d
    return list(merged.values()), notes


def describe(d: HubDownload) -> str:
    """One line: repository, revision, files, config keys."""
    files = "all files" if d.allow_patterns is None else " ".join(d.allow_patterns)
    rev = f"@{d.revision}" if d.revision else ""
    return f"  {d.repo_id}{rev}: {files}  ({d.what})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="iif-prefetch",
        description="Fetch every Hugging Face hub weight the config composed from these overrides needs (as iif-train "
                    "composes it) into the cache of HF_HOME; then run with HF_HUB_OFFLINE=1.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for iif-train (e.g. reward=aesthetic)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched, fetch nothing")
    args = parser.parse_args(argv)
    try:
        from iif.config import compose

        cfg, _ = compose(args.overrides)
        downloads, notes = collect(cfg)
    except Exception as e:  # noqa: BLE001 -- a bad override or config: one line, not a traceback
        print(f"iif-prefetch: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    for note in notes:
        print(note)
    if not downloads:
        print("iif-prefetch: nothing to fetch (no component of this config loads weights from the hub)")
        return 0
    from huggingface_hub import constants

    print(f"iif-prefetch: {len(downloads)} hub repositories -> {constants.HF_HUB_CACHE}")
    for d in downloads:
        print(describe(d))
    if args.dry_run:
        return 0
    if offline():
        print("iif-prefetch: error: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: nothing can be downloaded; run "
              "iif-prefetch on a machine with internet (same HF_HOME), or unset it", file=sys.stderr)
        return 1
    failed = []
    for d in downloads:
        try:
            path = snapshot_download(repo_id=d.repo_id, revision=d.revision,
                                     allow_patterns=None if d.allow_patterns is None else list(d.allow_patterns))
            print(f"fetched {d.repo_id} -> {path}")
        except Exception as e:  # noqa: BLE001 -- report each failure in one line, go on with the others
            failed.append(d.repo_id)
            print(f"iif-prefetch: error: {d.repo_id} ({d.what}): {type(e).__name__}: {' '.join(str(e).split())[:300]}",
                  file=sys.stderr)
    if failed:
        return 1
    print("iif-prefetch: done; runs of this config can now use HF_HUB_OFFLINE=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
