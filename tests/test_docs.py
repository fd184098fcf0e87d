"""The documents stay in step with the code: every option of every config group is named in
docs/configuration.md, every relative link of the README, docs/ and the experiments' READMEs points at a file
that exists (so moving a section leaves no dead link behind), and every ``iif-train`` / ``iif-reproduce`` command
they show composes and passes the start-up checks (a renamed option or key breaks a test, not a reader's run)."""
from __future__ import annotations

import re
import shlex
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


COMMAND = re.compile(r"^\s*([A-Z_]+=\S+\s+)*(iif-train|iif-reproduce)\s")  # env assignments, then the program


def documented_commands(program: str) -> list:
    """``pytest.param(words, id=doc:line)`` for every ``program`` command line of the documents' code blocks
    (``\\`` continuations joined, comments and leading ``VAR=value`` dropped); those with a placeholder (``...``)
    are left out."""
    found = []
    for doc in documents():
        text = doc.read_text()
        for block in re.finditer(r"```[a-z]*\n(.*?)```", text, re.S):
            first_line = text[:block.start()].count("\n") + 2
            lines = []  # (line number, the whole command)
            for k, raw in enumerate(block.group(1).splitlines()):
                if lines and lines[-1][1].endswith("\\"):
                    lines[-1] = (lines[-1][0], lines[-1][1][:-1] + " " + raw)
                else:
                    lines.append((first_line + k, raw))
            for line_no, line in lines:
                match = COMMAND.match(line)
                if not match or match.group(2) != program or "..." in line:
                    continue
                words = shlex.split(line, comments=True)
                words = words[next(i for i, w in enumerate(words) if w == program):]
                found.append(pytest.param(words, id=f"{doc.relative_to(ROOT)}:{line_no}"))
    return found


def test_documented_commands_are_found():
    """The extraction itself: a continuation, a comment and an environment variable."""
    train = {" ".join(p.values[0]) for p in documented_commands("iif-train")}
    reproduce = {" ".join(p.values[0]) for p in documented_commands("iif-reproduce")}
    assert "iif-train experiment=toy2d method=iif debug=fast logger=none" in train  # README, with a comment after it
    assert "iif-reproduce table2 --scale paper --settings rabbit --methods iif" in reproduce  # HF_HUB_OFFLINE=1 first
    assert any(c.startswith("iif-train experiment=sd15_imagereward") and c.endswith("iterations=40") for c in train)
    assert len(train) >= 20 and len(reproduce) >= 20


@pytest.mark.parametrize("words", documented_commands("iif-train"))
def test_every_documented_iif_train_command_composes_and_passes_the_start_up_checks(words):
    """Composed as ``iif-train`` would (a sweep's first value of each swept key), then the checks a run makes before
    building anything (sizes, pairings)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from iif.checks import check_pairing, check_sizes
    from iif.config import compose

    overrides = [w for w in words[1:] if w not in ("-m", "--multirun", "--cfg", "job")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    first = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else text
             for text, o in zip(overrides, parsed)]
    cfg, choices = compose(first)
    check_sizes(cfg)
    check_pairing(cfg, choices)


@pytest.mark.slow
@pytest.mark.parametrize("words", documented_commands("iif-reproduce"))
def test_every_documented_iif_reproduce_command_plans_its_runs(words, monkeypatch, capsys):
    """``--dry-run`` of the command: every run composed and checked, nothing run (CUDA taken as present: the paper
    scales name it). A command that adds nothing to its artifacts' spec at a scale but ``--jobs``/``--seeds`` runs
    the spec's own plan, which tests/test_reproduce.py composes and builds for every scale (slow): here only its
    artifacts and scale are checked. Studies and ``--skip-runs`` have no runs to plan."""
    import iif.device
    from iif.specs import load_spec
    from iif.reproduce import main as reproduce

    options = words[1:words.index("--")] if "--" in words else words[1:]
    taking_values = {"--scale", "--seeds", "--out", "--methods", "--settings", "--jobs"}
    artifacts = [w for k, w in enumerate(options) if not w.startswith("-") and options[k - 1] not in taking_values]
    scale = options[options.index("--scale") + 1] if "--scale" in options else "ci"
    specs = [load_spec(name) for name in artifacts]
    assert specs and all(scale in spec.scales for spec in specs), (artifacts, scale)
    if "--skip-runs" in words or any(spec.get("study") for spec in specs):
        return
    if not {"--", "--methods", "--settings"} & set(words):
        return
    monkeypatch.setattr(iif.device, "resolve", lambda *args, **kwargs: None)
    cut = words.index("--") if "--" in words else len(words)
    assert reproduce([*words[1:cut], "--dry-run", *words[cut:]]) == 0
    assert "iif-reproduce: dry run:" in capsys.readouterr().out
