"""The package's layers import only from below (README, "How the code is laid out"): config -> models ->
parallel -> methods -> trainer, with data, checkpoint, inference, metrics, planning and profiling beside
them at the ranks below. Every import of every module counts, also those inside functions."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "megatron_apt"

# a layer may import a layer of lower rank (or itself); equal ranks of different layers may not import each other
RANK = {"": 0, "utils": 0, "config": 1, "models": 2, "data": 3, "parallel": 3, "checkpoint": 4, "methods": 4,
        "inference": 5, "metrics": 6, "trainer": 7, "planning": 8, "profiling": 8, "cli": 9}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports():
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).with_suffix("")
        mod = ".".join(p for p in rel.parts if p != "__init__")
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                if n == "megatron_apt" or n.startswith("megatron_apt."):
                    yield mod, n, f"{f.relative_to(PKG.parent)}:{node.lineno}"


def test_every_layer_has_a_rank():
    layers = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    layers |= {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert layers <= set(RANK), f"unranked layers: {sorted(layers - set(RANK))}"


def test_no_module_imports_from_a_layer_above_it():
    bad = []
    for mod, target, where in _imports():
        a, b = _layer(mod), _layer(target)
        if b not in RANK:  # `from megatron_apt.x import name` also yields megatron_apt.x.name
            continue
        if a != b and RANK[b] >= RANK[a]:
            bad.append(f"{where}: {mod} ({a or 'root'}, rank {RANK[a]}) imports {target} ({b}, rank {RANK[b]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)
