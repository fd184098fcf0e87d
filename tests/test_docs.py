"""The documents stay in step with the code: every option of every config group is named in
docs/configuration.md, and every relative link of the README, docs/ and the experiments' READMEs points at a file
that exists (so moving a section leaves no dead link behind)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROUPS_WITHOUT_TABLE = {"site"}  # Slurm site files: documented in docs/scale-out.md, one per cluster
LINK = re.compile(r"\]\(([^)\s]+)\)")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "experiments").glob("*/README.md"))]


def relative_links(text: str) -> list[str]:
    """The link targets of ``[text](target)`` that are paths in the repository (no URL, no pure anchor)."""
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_the_link_pattern_finds_relative_links_only():
    text = "see [a](docs/a.md#x), [b](https://x.org/y), [c](#top) and [d](../../README.md)"
    assert relative_links(text) == ["docs/a.md#x", "../../README.md"]


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path):
    dead = [t for t in relative_links(doc.read_text()) if not (doc.parent / t.split("#")[0]).exists()]
    assert not dead, f"{doc.relative_to(ROOT)}: dead links {dead}"


def test_every_config_option_is_in_the_configuration_manual():
    manual = (ROOT / "docs" / "configuration.md").read_text()
    groups = [g for g in sorted((ROOT / "conf").iterdir()) if g.is_dir() and g.name not in GROUPS_WITHOUT_TABLE]
    assert {g.name for g in groups} >= {"base_model", "method", "reward", "sampler", "experiment"}
    missing = [f"{g.name}={f.stem}" for g in groups for f in sorted(g.glob("*.yaml")) if f"`{f.stem}`" not in manual]
    assert not missing, f"docs/configuration.md does not name {missing}"
