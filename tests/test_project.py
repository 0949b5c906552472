"""The repository's own promises: clean notebooks, agreeing dependency lists, a CI that runs the tests."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _name(requirement: str) -> str:
    return re.split(r"[<>=!\[ ]", requirement, maxsplit=1)[0].lower().replace("-", "_")


def test_there_are_nine_numbered_notebooks():
    assert [p.name[:3] for p in NOTEBOOKS] == [f"0{i}_" for i in range(1, 10)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean_and_parameterised(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    wanted = ("profile", "run_dir") + (("interactive",) if path.name.startswith("06_") else ())
    for name in wanted:  # only the λ explorer has an interactive mode
        assert re.search(rf"^{name}\s*=", tagged[0].source, re.M), f"parameter {name} missing"
    if not path.name.startswith("06_"):
        assert "interactive" not in tagged[0].source, "an unused parameter"


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r.replace(" ", "") for r in project["dependencies"]}
    for extra in ("test", "own"):  # what `make setup` installs
        wanted.update(
            {_name(r): r.replace(" ", "") for r in project["optional-dependencies"][extra]}
        )
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-e")}
    assert listed == wanted
    assert "jupyterlab_widgets" in listed and "ipywidgets" in listed


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make reproduce" in readme


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The mmsoup modules a file imports anywhere (top level, functions, TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text())
    main_blocks = [  # a script's own block: there the module is __main__, so it closes no cycle
        node
        for node in tree.body
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
    ]
    skipped = {id(n) for block in main_blocks for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found & modules


def test_no_import_cycles():
    """Every import counts, TYPE_CHECKING and function-local ones included."""
    package = ROOT / "mmsoup"
    files = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in package.rglob("*.py")
    }
    graph = {m: _imports(p, set(files)) - {m, "mmsoup"} for m, p in files.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _recipe_spellings() -> set[str]:
    """Every name `recipe()` accepts, less the words that are also a kind of model ('ensemble',
    'wise': a results table's `kind` column)."""
    from mmsoup.recipes import KIND_ORDER, REGISTRY, slug

    return {s for r in REGISTRY for s in (r.name, slug(r.name), *r.aliases)} - set(KIND_ORDER)


def _is_trace_stage(node: ast.AST) -> bool:
    """`row["stage"]`: a trace row's stage ('greedy', 'ingredient'), not a recipe."""
    return (
        isinstance(node, ast.Subscript)
        and isinstance(node.slice, ast.Constant)
        and node.slice.value == "stage"
    )


def _is_spelling(node: ast.AST, spellings: set[str]) -> bool:
    return isinstance(node, ast.Constant) and node.value in spellings


def test_only_the_registry_lists_recipes_or_branches_on_their_names():
    """A recipe is added in mmsoup/recipes.py (one row) and its own module: no other module keeps
    a list of recipe names at module level, or tests a variable against one to choose what to
    build (`if recipe == "mms"`, `r in ("ensemble", ...)`)."""
    spellings = _recipe_spellings()
    found = []
    for path in sorted((ROOT / "mmsoup").rglob("*.py")):
        if path.name == "recipes.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        for node in tree.body:  # module-level recipe lists
            value = getattr(node, "value", None)
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(
                value, (ast.Tuple, ast.List, ast.Set)
            ):
                if sum(_is_spelling(e, spellings) for e in value.elts) >= 2:
                    found.append(f"{where}:{node.lineno} lists recipes")
        tests = [n.test for n in ast.walk(tree) if isinstance(n, (ast.If, ast.IfExp, ast.While))]
        tests += [c for n in ast.walk(tree) if isinstance(n, ast.comprehension) for c in n.ifs]
        for test in tests:
            for cmp in [n for n in ast.walk(test) if isinstance(n, ast.Compare)]:
                if isinstance(cmp.left, ast.Constant) or _is_trace_stage(cmp.left):
                    continue  # "Greedy soup" in results: reading a result, not choosing a build
                for right in cmp.comparators:
                    elts = (
                        right.elts if isinstance(right, (ast.Tuple, ast.List, ast.Set)) else [right]
                    )
                    if any(_is_spelling(e, spellings) for e in elts):
                        found.append(f"{where}:{cmp.lineno} branches on a recipe name")
    assert not found, "; ".join(found)


# -- chapters that say what they show, laid out for a page ---------------------------------
EXECUTED = sorted((ROOT / "notebooks" / "executed").glob("*.ipynb"))
LONG_FLOAT = re.compile(r"(?<![\w.])-?\d+\.\d{5,}(?!\d)")  # 83.518931, np.float64(0.00188...)
PAGE_INCHES = 10.5  # ~10 inches: a figure wider than this does not fit a page at its saved dpi
# Executed copies not yet re-executed by the current code would be listed here (strict xfail).
STALE_EXECUTED: set[str] = set()
NO_FINDINGS: set[str] = set()  # every chapter closes on what its run shows


def _png_inches(data: str) -> float:
    """Width in inches of a base64 PNG: pixels over the dpi of its pHYs chunk (72 without one)."""
    import base64
    import struct

    png = base64.b64decode(data)
    width = struct.unpack(">I", png[16:20])[0]
    dpi, i = 72.0, 8
    while i < len(png):
        length, kind = struct.unpack(">I4s", png[i : i + 8])
        if kind == b"pHYs":
            ppu, _, unit = struct.unpack(">IIB", png[i + 8 : i + 17])
            dpi = ppu * 0.0254 if unit == 1 else dpi
            break
        if kind == b"IDAT":
            break
        i += 12 + length
    return width / dpi


def page_problems(path: Path) -> list[str]:
    """What in an executed notebook would not read on a page: a float with more than four
    decimals in a table (text/plain or text/html outputs), or a figure wider than PAGE_INCHES."""
    nb = nbformat.read(path, as_version=4)
    out = []
    for k, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            data = o.get("data", {})
            for mime in ("text/plain", "text/html"):
                text = data.get(mime, "")
                text = text.split("</style>")[-1]  # a Styler's CSS is not the table
                if found := LONG_FLOAT.findall(text):
                    out.append(f"cell {k}: {mime} shows {found[0]}")
            if "image/png" in data and (w := _png_inches(data["image/png"])) > PAGE_INCHES:
                out.append(f"cell {k}: a figure {w:.1f} inches wide")
    return out


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(
            p,
            marks=pytest.mark.xfail(
                strict=True,
                reason="executed before the chapters closed on their findings; regenerate",
            )
            if p.name in STALE_EXECUTED
            else (),
        )
        for p in EXECUTED
    ],
    ids=lambda p: p.name,
)
def test_executed_chapters_fit_a_page(path):
    assert page_problems(path) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_chapter_ends_with_what_its_run_shows(path):
    if path.name in NO_FINDINGS:
        pytest.skip("chapter 06 closes on 'What the panel shows'")
    nb = nbformat.read(path, as_version=4)
    headings = [
        line
        for c in nb.cells
        if c.cell_type == "markdown"
        for line in c.source.splitlines()
        if line.startswith("#")
    ]
    assert any(h.lstrip("#").strip() == "What this run shows" for h in headings)
