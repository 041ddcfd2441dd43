"""The package's shape: no import circles, top-level names, import cost."""

import ast
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = "tqmetal"


def package_dir() -> Path:
    # The installed package's sources, found without importing it.
    spec = importlib.util.find_spec(PACKAGE)
    return Path(next(iter(spec.submodule_search_locations)))


def module_names(pkg_dir: Path) -> set:
    names = {PACKAGE}
    for f in pkg_dir.glob("*.py"):
        if f.stem != "__init__":
            names.add(f"{PACKAGE}.{f.stem}")
    for d in pkg_dir.iterdir():
        if (d / "__init__.py").is_file():
            names.add(f"{PACKAGE}.{d.name}")
    return names


def _bound_in_init(pkg_dir: Path) -> set:
    """Names the package's __init__ binds itself (not submodules)."""
    tree = ast.parse((pkg_dir / "__init__.py").read_text())
    out = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom):
            out |= {a.asname or a.name for a in node.names}
    return out


def import_graph(pkg_dir: Path) -> dict:
    """module -> the package modules it imports anywhere (top level or inside functions).

    ``from . import x`` counts as importing the submodule ``x`` unless x is a name
    the package's __init__ binds; compiled submodules (``_ext``) have no source and
    no edges of their own.
    """
    modules = module_names(pkg_dir)
    init_names = _bound_in_init(pkg_dir)
    graph = {}
    for f in sorted(pkg_dir.glob("*.py")):
        me = PACKAGE if f.stem == "__init__" else f"{PACKAGE}.{f.stem}"
        edges = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    base = node.module or ""
                else:
                    base = PACKAGE + (f".{node.module}" if node.module else "")
                if base == PACKAGE:
                    targets = [PACKAGE if a.name in init_names else f"{PACKAGE}.{a.name}"
                               for a in node.names]
                else:
                    targets = [base]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
                  and node.args and isinstance(node.args[0], ast.JoinedStr)):
                # importlib.import_module(f"{__name__}.{...}") in __init__: every lazy target
                continue
            else:
                continue
            for t in targets:
                # tqmetal.a.b -> tqmetal.a; a compiled submodule (no source) drops out
                while t not in modules and t.count(".") > 1:
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != me:
                    edges.add(t)
        graph[me] = edges
    return graph


def find_cycle(graph: dict):
    """One import circle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def lazy_targets(pkg_dir: Path) -> set:
    """The modules __init__'s module ``__getattr__`` imports (its _LAZY table)."""
    tree = ast.parse((pkg_dir / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_LAZY" for t in node.targets):
            return {f"{PACKAGE}.{v}" for v in ast.literal_eval(node.value).values()}
    return set()


def test_no_import_circles():
    pkg = package_dir()
    graph = import_graph(pkg)
    graph[PACKAGE] |= lazy_targets(pkg)
    assert {f"{PACKAGE}.cache", f"{PACKAGE}.patch"} <= graph[PACKAGE]
    assert f"{PACKAGE}.patch" in graph[f"{PACKAGE}.cache"]  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_detector_finds_circles(tmp_path):
    # Function-level imports count: they were how the old circles hid.
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "a.py").write_text("from .b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    (tmp_path / "c.py").write_text("import tqmetal.a\n")
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle is not None and set(cycle) == {f"{PACKAGE}.a", f"{PACKAGE}.b"}


def _run(code: str):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


BLOCK_MLX_LM = """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "mlx_lm" or name.startswith("mlx_lm."):
                raise ImportError("mlx_lm blocked for this test")
    sys.meta_path.insert(0, _Block())
"""


def test_import_needs_no_mlx_lm():
    r = _run(BLOCK_MLX_LM + """
    import tqmetal
    assert "mlx_lm" not in sys.modules
    assert callable(tqmetal.sdpa_int4) and "patch_mlx_lm" in dir(tqmetal)
    try:
        tqmetal.make_prompt_cache
    except ImportError as e:
        print("lazy:", e)
    """)
    assert r.returncode == 0, r.stderr
    assert "lazy: mlx_lm blocked" in r.stdout


def test_top_level_names_are_the_modules_functions():
    pytest.importorskip("mlx_lm")
    r = _run("""
    import sys, tqmetal
    assert "tqmetal.cache" not in sys.modules and "mlx_lm" not in sys.modules
    from tqmetal.cache import make_prompt_cache
    from tqmetal.patch import patch_mlx_lm
    assert tqmetal.make_prompt_cache is make_prompt_cache
    assert tqmetal.patch_mlx_lm is patch_mlx_lm
    from tqmetal import make_prompt_cache as m2
    assert m2 is make_prompt_cache
    try:
        tqmetal.no_such_name
    except AttributeError as e:
        print("ok", e)
    """)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout
