"""Nothing configurable goes undocumented: every config group and option in conf/, every key they
set, every top-level key and every preset is named in README.md or a page of docs/. A section lost
from the documentation fails here, naming what it took with it."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def documentation() -> str:
    return "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])


def keys(path: Path, prefix: str) -> list[str]:
    """The keys an option file sets, dotted (`trainer.lr`); Hydra's `defaults` list left out."""
    tree = yaml.safe_load(path.read_text()) or {}
    return [f"{prefix}.{k}" for k in tree if k != "defaults"]


def options() -> dict[str, list[Path]]:
    """group (`model`, `hydra/launcher`) -> its option files; presets are checked apart."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group not in (".", "experiment"):
            groups.setdefault(group, []).append(path)
    return groups


def what_is_undocumented(text: str) -> list[str]:
    missing = []
    for group, files in options().items():
        if f"`{group}`" not in text:
            missing.append(f"group {group}")
        for path in files:
            if f"{group}={path.stem}" not in text and f"`{path.stem}`" not in text:
                missing.append(f"option {group}={path.stem}")
            prefix = "hydra.launcher" if group == "hydra/launcher" else group
            missing += [f"key {k}" for k in keys(path, prefix) if f"`{k}`" not in text and f"{k}=" not in text]
    top = yaml.safe_load((CONF / "train.yaml").read_text())
    missing += [f"top-level key {k}" for k in top if k not in ("defaults", "hydra") and f"`{k}`" not in text]
    missing += [f"preset +experiment={p.stem}" for p in sorted((REPO / "experiments").glob("*.yaml"))
                if f"+experiment={p.stem}" not in text]
    return missing


def test_every_group_option_key_and_preset_is_documented():
    missing = what_is_undocumented(documentation())
    assert not missing, "documented nowhere in README.md or docs/: " + ", ".join(missing)


@pytest.mark.parametrize("lost", [["model=smollm2", "`smollm2`"], ["hydra/launcher=slurm", "`slurm`"],
                                  ["`trainer.loss_chunk_tokens`"], ["+experiment=gpu_100m"], ["`loss_scale`"],
                                  ["`hydra/launcher`"]])
def test_removing_every_mention_of_an_item_is_caught(lost):
    text = documentation()
    for words in lost:
        assert words in text
        text = text.replace(words, "")
    assert what_is_undocumented(text), f"deleting every {lost} went unnoticed"
