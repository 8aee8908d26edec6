"""The package's import structure, read from the source (every import statement, function-local ones
included): no import cycle between d2v modules, no upward import between layers, no private name
(`_x`) imported from another module.

Layers (each may import its own and the ones listed for it):
  base   log, _optional, preempt, runlock, recipes, rng, registry (pure data), _ext, kernels
  core   config, checkpoint (the file format), metrics, ops, masking, audio_frames, objective
  model  blocks, modalities, model, ema                     -> base, core
  data   data                                               -> base, core (never the model layer)
  train  optim, backends                                    -> base, core, model
  app    trainer, weights, probe                            -> everything above
  cli    cli, __main__, the package root

Run: .venv/bin/python -m pytest -q tests/test_layers.py
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYERS = {
    "base": ["d2v.log", "d2v._optional", "d2v.preempt", "d2v.runlock", "d2v.recipes", "d2v.rng",
             "d2v.registry", "d2v._ext", "d2v.kernels"],
    "core": ["d2v.config", "d2v.checkpoint", "d2v.metrics", "d2v.ops", "d2v.masking", "d2v.audio_frames",
             "d2v.objective"],
    "model": ["d2v.blocks", "d2v.modalities", "d2v.model", "d2v.ema"],
    "data": ["d2v.data"],
    "train": ["d2v.optim", "d2v.backends"],
    "app": ["d2v.trainer", "d2v.weights", "d2v.probe"],
    "cli": ["d2v.cli", "d2v.__main__", "d2v"],
}
MAY_IMPORT = {
    "base": {"base"},
    "core": {"base", "core"},
    "model": {"base", "core", "model"},
    "data": {"base", "core", "data"},
    "train": {"base", "core", "model", "train"},
    "app": {"base", "core", "model", "data", "train", "app"},
    "cli": set(LAYERS),
}


def _modules() -> dict[str, Path]:
    """Module name -> file, for d2v/ and kernels/ (installed as d2v.kernels)."""
    out = {}
    for top, prefix in ((ROOT / "d2v", ()), (ROOT / "kernels", ("d2v",))):
        for p in sorted(top.rglob("*.py")):
            parts = prefix + p.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, str, int]]:
    """(imported d2v module, imported name or "", line) for every import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub, "", node.lineno) if sub in modules else (base, a.name, node.lineno))
    out = []
    for mod, what, line in found:
        if not (mod == "d2v" or mod.startswith("d2v.")):
            continue
        while mod not in modules and "." in mod:  # d2v.kernels._triton.x -> the module that holds it
            mod = mod.rpartition(".")[0]
        out.append((mod, what, line))
    return out


def _layer(mod: str) -> str:
    best = max((p for ps in LAYERS.values() for p in ps if mod == p or mod.startswith(p + ".")), key=len)
    return next(layer for layer, ps in LAYERS.items() if best in ps)


def _graph():
    modules = _modules()
    edges = {m: {} for m in modules}
    for m, p in modules.items():
        for dep, what, line in _imports(m, p, modules):
            if dep != m and dep != "d2v":  # the package root runs first on any import: not a dependency
                edges[m].setdefault(dep, []).append((what, line))
    return modules, edges


def test_every_module_has_a_layer():
    modules, _ = _graph()
    assert len(modules) > 40
    for m in modules:
        _layer(m)  # raises if no layer prefix matches


def test_no_upward_import_between_layers():
    modules, edges = _graph()
    bad = [f"{modules[m].relative_to(ROOT)}:{line} ({_layer(m)}) imports {dep} ({_layer(dep)})"
           for m, deps in edges.items() for dep, uses in deps.items() for _, line in uses
           if _layer(dep) not in MAY_IMPORT[_layer(m)]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    _, edges = _graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_imported_from_another_module():
    modules, edges = _graph()
    bad = [f"{modules[m].relative_to(ROOT)}:{line} imports {dep}.{what}"
           for m, deps in edges.items() for dep, uses in deps.items() for what, line in uses
           if what.startswith("_") and not what.startswith("__")]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    """The parser finds an import inside a function and resolves a relative one."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from d2v.model import build_model\n    from .files import DataDecodeError\n")
    modules = _modules()
    got = _imports("d2v.data.x", f, modules)
    assert ("d2v.model", "build_model", 2) in got and ("d2v.data.files", "DataDecodeError", 3) in got


def test_import_d2v_is_light():
    """`import d2v` (the CLI's first import, and tools/aot_check.py's way into a source tree whose kernels
    are not installed yet) loads no model, ops or kernels; `d2v.build_model` still works, on first use."""
    import subprocess
    import sys

    code = ("import sys, d2v\n"
            "heavy = [m for m in ('d2v.model', 'd2v.ops', 'd2v.kernels', 'torch') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert d2v.build_model.__module__ == 'd2v.model'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
