"""GeoPix's layering (docs/architecture.md): imports go down the layers only, and no two modules
import each other. Read from the source with ast, every import counted (type-only and
function-local ones too), so a new import that runs back up fails here, naming it."""

from __future__ import annotations

import ast
from pathlib import Path

import geopix

ROOT = Path(geopix.__file__).parent

# Bottom to top; a unit may import from any unit of a lower layer, and within itself.
LAYERS = [
    {"vocabulary", "chat_template", "answer_form", "imaging", "redaction", "plotting"},
    {"config", "storage"},
    {"outputs", "ray_job", "tracking", "stack", "weights"},
    {"leases", "data", "flow"},
    {"step_runner", "model"},
    {"train", "infer"},
    {"evaluate"},
    {"tune"},
    {"cli"},
]
LAYER_OF = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = ["geopix", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def geopix_imports() -> dict[str, set[str]]:
    """Each geopix module → the geopix modules (or packages) it imports."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("geopix"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    found.add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("geopix")}
        edges[name] = found - {"geopix", name}
    return edges


def unit(module: str) -> str:
    return module.split(".")[1]


def test_every_unit_has_a_layer():
    units = {unit(m) for m in geopix_imports() if m != "geopix"}
    assert units <= set(LAYER_OF), f"give these a layer in LAYERS and docs/architecture.md: {units - set(LAYER_OF)}"


def test_imports_only_go_down():
    upward = [
        f"{source} imports {target} ({unit(source)} is layer {LAYER_OF[unit(source)]}, {unit(target)} is {LAYER_OF[unit(target)]})"
        for source, targets in geopix_imports().items()
        if source != "geopix"
        for target in targets
        if unit(target) != unit(source) and LAYER_OF[unit(target)] >= LAYER_OF[unit(source)]
    ]
    assert not upward, "\n".join(upward)


def test_no_two_modules_import_each_other():
    edges = geopix_imports()
    circles = sorted({tuple(sorted((a, b))) for a, targets in edges.items() for b in targets if a in edges.get(b, ())})
    assert not circles, circles
