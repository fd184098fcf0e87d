"""Read back an offline W&B run file (``run-<id>.wandb``) without the network.

The file is a LevelDB-style log (W&B header ``":W&B" <magic u16 = 0xBEE1> <version u8>``, then 32 KiB blocks of
records ``<crc u32> <length u16> <type u8> <payload>``; types full=1, first=2, middle=3, last=4) whose payloads are
``wandb_internal_pb2.Record`` protobufs. wandb >= 0.19 no longer ships a Python reader, so this is a small one;
it is what the tests use to check that config and metrics really arrived.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
RECORD = struct.Struct("<IHB")


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    """Yield the raw record payloads of a ``.wandb`` file."""
    data = Path(path).read_bytes()
    ident, magic, _ = HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = HEADER.size, b""
    while pos + RECORD.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < RECORD.size:  # block trailer padding
            pos += room
            continue
        _, length, kind = RECORD.unpack_from(data, pos)
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += room
            continue
        payload = data[pos + RECORD.size: pos + RECORD.size + length]
        pos += RECORD.size + length
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload
            pending = b""


def read_run(path: str | Path) -> tuple[dict, list[dict]]:
    """``(config, history rows)`` of an offline run file; values decoded from their JSON encoding."""
    from wandb.proto import wandb_internal_pb2

    config, history = {}, []
    for payload in iter_payloads(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        if rec.HasField("history"):
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif rec.HasField("run"):  # the run record carries the initial config
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif rec.HasField("config"):
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return config, history


def read_run_info(path: str | Path) -> dict:
    """Everything a test or ``scripts/wandb_sync.py`` checks in an offline run file, as plain Python:

    ``run_id``, ``project``, ``entity``, ``name``, ``group``, ``job_type``, ``tags`` (from the run record),
    ``config`` and ``history`` (as :func:`read_run`), ``summary`` (the last value of each key, W&B's own
    bookkeeping keys starting with ``_`` left out) and ``files`` (paths, relative to the run's ``files/`` folder,
    of the files the run saved: media such as logged images).
    """
    from wandb.proto import wandb_internal_pb2

    info = {"run_id": None, "project": None, "entity": None, "name": None, "group": None, "job_type": None,
            "tags": [], "summary": {}, "files": []}
    for payload in iter_payloads(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run" and info["run_id"] is None:
            r = rec.run
            info.update(run_id=r.run_id, project=r.project, entity=r.entity or None, name=r.display_name,
                        group=r.run_group or None, job_type=r.job_type or None, tags=list(r.tags))
        elif kind == "summary":
            for i in rec.summary.update:
                key = i.key or "/".join(i.nested_key)
                if not key.startswith("_"):
                    info["summary"][key] = json.loads(i.value_json)
        elif kind == "files":
            info["files"].extend(f.path for f in rec.files.files if f.path not in info["files"])
    info["config"], info["history"] = read_run(path)
    return info
