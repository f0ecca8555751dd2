"""The code's layout rules, checked on the source: module sizes, imports that run one way, presets named in one
place."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cmoe"
MODULES = sorted(p for p in SRC.rglob("*.py"))


def test_no_module_over_300_lines_outside_the_kernels():
    long = [str(p.relative_to(SRC)) for p in MODULES
            if "kernels" not in p.parts and len(p.read_text().splitlines()) > 300]
    assert not long


def test_moe_imports_nothing_inside_functions_but_the_optional_kernels():
    for path in (SRC / "moe").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not inner, f"{path.name}: {node.name} imports inside"


def test_moe_modules_import_no_module_that_imports_them():
    graph = {}
    for path in (SRC / "moe").glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cmoe.moe."):
                names.add(node.module.split(".")[2])
            elif isinstance(node, ast.ImportFrom) and node.module == "cmoe.moe":
                names.update(alias.name for alias in node.names)
        graph[path.stem] = {name for name in names if (SRC / "moe" / f"{name}.py").exists()}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, seen + (n,))) for n in graph.get(start, ()))

    assert not [name for name in graph if name != "__init__" and reaches(name, name)]


def test_nothing_outside_moe_imports_an_underscored_name_from_it():
    for path in MODULES:
        if "moe" in path.relative_to(SRC).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cmoe.moe"):
                assert not [a.name for a in node.names if a.name.startswith("_")], path


def test_preset_names_are_compared_only_in_the_preset_table():
    for path in MODULES:
        if path.name in ("presets.py", "cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = [n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", None)
                         for n in [node.left, *node.comparators]]
                assert "preset" not in names, f"{path.relative_to(SRC)}:{node.lineno} compares a preset name"


def test_the_command_line_offers_every_preset_of_the_table():
    from cmoe.core.presets import PRESETS
    from cmoe.tools import cli

    assert set(cli.PRESETS) == set(PRESETS)
