"""The package's tree is its architecture: imports run one way, from the command down to the
foundation modules, and the analysis reaches the harness only through the artifact contract."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# harness/<unit>: what each may import (besides itself). A unit is a subpackage, or a module
# directly under harness/.
FOUNDATIONS = {"artifacts", "config", "distributed", "packaged"}
ALLOWED = {
    "artifacts": set(), "packaged": set(), "distributed": set(), "config": {"artifacts", "distributed"},
    "data": FOUNDATIONS, "model": FOUNDATIONS, "runs": FOUNDATIONS,
    "training": FOUNDATIONS | {"data", "model", "runs"},
    "launch": FOUNDATIONS | {"data", "model", "runs", "training"},
    "__main__": FOUNDATIONS | {"data", "model", "runs", "training", "launch"},
    "__init__": set(),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a `harness...` module in `path`, inside functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "harness":
                found += [(node.lineno, f"harness.{a.name}") for a in node.names]
            elif node.module.startswith("harness."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("harness.")]
    return found


def unit_of(path: Path, root: Path = REPO) -> str:
    return path.relative_to(root / "harness").with_suffix("").parts[0]


def upward_imports(root: Path) -> list[str]:
    wrong = []
    for path in sorted((root / "harness").rglob("*.py")):
        unit = unit_of(path, root)
        for line, module in imported_modules(path):
            target = module.split(".")[1]
            if target != unit and target not in ALLOWED[unit]:
                wrong.append(f"{path.relative_to(root)}:{line} imports {module}")
    return wrong


def test_every_module_sits_in_a_known_unit():
    units = {unit_of(p) for p in (REPO / "harness").rglob("*.py")}
    assert units <= set(ALLOWED), f"modules outside the known layers: {sorted(units - set(ALLOWED))}"


def test_no_import_runs_back_up():
    assert not upward_imports(REPO)


def test_the_analysis_imports_only_the_artifact_contract():
    imports = {m for p in sorted((REPO / "analysis").rglob("*.py")) for _, m in imported_modules(p)}
    assert imports <= {"harness.artifacts"}, sorted(imports)


def test_an_upward_import_is_caught(tmp_path):
    (tmp_path / "harness" / "data").mkdir(parents=True)
    (tmp_path / "harness" / "data" / "bad.py").write_text("def f():\n    from harness.training.loop import train\n")
    assert upward_imports(tmp_path) == ["harness/data/bad.py:2 imports harness.training.loop"]
