"""The package layering the architecture doc promises: no module imports from a higher layer, no cycles.

Imports are read from the source (ast), including the ones inside functions, so a lazy import that
breaks the layering is caught too.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# low -> high; a module may import its own layer and the ones below it
LAYERS = [
    ["selfplay.config", "selfplay.types"],
    ["selfplay.models"],
    ["sandbox", "selfplay.data", "selfplay.telemetry", "selfplay.engines", "selfplay.learner"],
    ["roles"],
    ["selfplay.evaluation"],
    ["selfplay.rollout"],
    ["selfplay.run"],
    ["selfplay.cli", "selfplay.dashboard", "selfplay.__main__"],
]


def _component(module: str) -> str | None:
    best = None
    for layer in LAYERS:
        for comp in layer:
            if (module == comp or module.startswith(comp + ".")) and (best is None or len(comp) > len(best)):
                best = comp
    return best


def _rank(comp: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if comp in layer)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("selfplay", "roles", "sandbox"):
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in ("selfplay", "roles", "sandbox")}


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if m not in ("selfplay",) and _component(m) is None]
    assert not missing, f"modules outside every layer (add them to LAYERS and docs/architecture.md): {missing}"


def test_no_import_from_a_higher_layer():
    bad = []
    for mod, path in _modules().items():
        comp = _component(mod)
        if comp is None:
            continue
        for imp in _imports(path):
            target = _component(imp)
            if target is not None and _rank(target) > _rank(comp):
                bad.append(f"{mod} -> {imp}")
    assert not bad, "imports from a higher layer:\n" + "\n".join(sorted(bad))


def test_no_cycles_between_components():
    mods = _modules()
    edges: dict[str, set[str]] = {}
    for mod, path in mods.items():
        comp = _component(mod)
        if comp is None:
            continue
        for imp in _imports(path):
            target = _component(imp)
            if target and target != comp:
                edges.setdefault(comp, set()).add(target)
    # depth-first search for a back edge
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(n: str, stack: list[str]) -> bool:
        state[n] = 1
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                cycle.extend(stack[stack.index(m):] + [n, m] if m in stack else [n, m])
                return True
            if state.get(m) is None and visit(m, stack + [n]):
                return True
        state[n] = 2
        return False

    for n in sorted(edges):
        if state.get(n) is None and visit(n, [n]):
            break
    assert not cycle, f"import cycle between components: {' -> '.join(cycle)}"


def test_sandbox_is_standalone():
    for mod, path in _modules().items():
        if mod.startswith("sandbox"):
            assert not {i for i in _imports(path) if not i.startswith("sandbox")}, f"{mod} imports outside sandbox/"



def test_sandbox_jail_side_never_imports_the_host_side():
    """What runs inside the jail (sandbox/jail/) stays lean and cannot reach the pool's machinery: it may
    import the shared modules at sandbox/ top level, never sandbox.host (nor doctor/selftest, which drive a pool)."""
    shared = {"sandbox", "sandbox.linux", "sandbox.protocol", "sandbox.types"}
    for mod, path in _modules().items():
        if mod.startswith("sandbox.jail"):
            bad = {i for i in _imports(path) if not i.startswith("sandbox.jail") and i not in shared
                   and not (i.startswith("sandbox.") and i.split(".")[1] in {"linux", "protocol", "types"})}
            assert not bad, f"{mod} (jail side) imports {sorted(bad)}"

def test_nothing_cites_files_outside_the_repository():
    """Facts a reader needs live in docs/ (docs/anchors.md); nothing points at a collection outside the repo."""
    bad = []
    for p in ROOT.rglob("*"):
        if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".toml") and ".venv" not in p.parts \
                and ".git" not in p.parts and p.name != "test_layers.py":
            if "shared/reference" in p.read_text(errors="replace"):
                bad.append(str(p.relative_to(ROOT)))
    assert not bad, f"files citing shared/reference (outside the repository): {bad}"
