"""The layout rules of docs/design.md: no source file in dsv3/ over 500 lines, no import cycle between its modules."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dsv3"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the package (a package is its __init__.py)."""
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (module level or inside functions: a lazy
    import that closes a cycle is still a cycle). `from pkg import mod` counts as importing pkg.mod; `from pkg import
    obj` as importing pkg (whose __init__ is what provides obj)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods}
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(module)
    return {m for m in found if m in mods and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_source_file_over_the_limit():
    sources = [p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".cpp", ".h")]
    assert len(sources) > 50
    long = {str(p.relative_to(PACKAGE.parent)): n for p in sources
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job (docs/design.md, 'Modules'): {long}"


def test_no_import_cycle():
    mods = _modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        graph[name] = _imports(name, path, mods)
    assert graph["dsv3.engine.distributed"] >= {"dsv3.engine.llm"}  # the graph does see imports
    cycles = _cycles(graph)
    assert not cycles, f"import cycles inside dsv3/ (make one side depend on the other only): {cycles}"


def test_the_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
