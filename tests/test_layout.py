"""The shape of the code, kept by a test: short functions, shallow nesting, teaching files within
their budgets, and imports that follow the README's reading order. A failure says which rule,
where, and what to do; the next feature then pays for its own seam."""

import ast
import importlib
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60
MAX_NESTING = 4
BUDGETS = {"deltanet.py": 250, "model.py": 650, "lora.py": 550, "template.py": 350, "data.py": 600, "decode.py": 300,
           "train.py": 550, "infer.py": 550, "merge.py": 300}  # lines of each teaching file
BLOCKS = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match)
FAST_PATHS = ("speed", "fast_decode", "offload", "tiles")  # the files whose names GPU-only code reaches
FIX = ("split it into functions that each do one thing, or move the machinery to a file a first reading "
       "skips (as speed.py, fast_decode.py and offload.py hold the fast paths)")


def project_files() -> list[Path]:
    return sorted(ROOT.glob("*.py"))


def reading_order() -> list[str]:
    """The teaching files in the order of README's "Reading the code" table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Reading the code", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| \d+ \| `(\w+\.py)` \|", section, flags=re.M)


def project_imports(path: Path) -> set[str]:
    """The files of this project that `path` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return {f"{n}.py" for n in names if (ROOT / f"{n}.py").exists()} - {path.name}


def depth(node, level=0) -> int:
    """How deep blocks nest inside a function body (an elif is as deep as its if; a nested
    function is checked on its own)."""
    deepest = level
    for field, value in ast.iter_fields(node):
        for child in value if isinstance(value, list) else [value]:
            if not isinstance(child, ast.AST) or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            is_elif = isinstance(node, ast.If) and field == "orelse" and isinstance(child, ast.If) and len(value) == 1
            deeper = isinstance(child, BLOCKS) and not is_elif
            deepest = max(deepest, depth(child, level + deeper))
    return deepest


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_the_readme_names_the_reading_order():
    assert reading_order() == list(BUDGETS), (
        "README's 'Reading the code' table and tests/test_layout.py's BUDGETS list different teaching files: "
        f"{reading_order()} against {list(BUDGETS)}. Give a new teaching file a row in the table and a budget here.")


def test_no_function_is_longer_than_60_lines():
    long = [f"{p.name}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for p in project_files() for f in functions(p) if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}. To fix: {FIX}."


def test_no_block_nests_deeper_than_4():
    deep = [f"{p.name}:{f.lineno} {f.name} (depth {depth(f)})" for p in project_files() for f in functions(p)
            if depth(f) > MAX_NESTING]
    assert not deep, (f"blocks nested deeper than {MAX_NESTING}: {', '.join(deep)}. To fix: return early, or move "
                      f"the inner loop into a function of its own.")


def test_teaching_files_stay_within_their_budgets():
    over = [f"{name} has {n} lines, its budget is {budget}" for name, budget in BUDGETS.items()
            if (n := len((ROOT / name).read_text().splitlines())) > budget]
    assert not over, f"{'; '.join(over)}. To fix: {FIX}; README's file tables say which files a first reading skips."


def test_teaching_files_import_only_what_comes_before_them():
    """A teaching file imports teaching files above it in the reading order, and helper files whose
    own imports (through any helper) stay above it too: what a reader meets is never ahead of them."""
    order = reading_order()
    imports = {p.name: project_imports(p) for p in project_files()}

    def reaches(name, seen=()):  # every project file `name` imports, directly or through helpers
        direct = imports.get(name, set()) - set(seen)
        return direct | {r for d in direct if d not in order for r in reaches(d, (*seen, name, *direct))}

    wrong = [f"{name} imports {', '.join(sorted(later))}" for i, name in enumerate(order)
             if (later := {r for r in reaches(name) if r in order[i:]})]
    assert not wrong, (f"{'; '.join(wrong)}, which come at or after it in README's reading order ({', '.join(order)}), "
                       f"directly or through a helper file. To fix: move what is shared to a file above both.")


def test_no_global_statements():
    found = [f"{p.name}:{n.lineno}" for p in project_files() for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Global)]
    assert not found, f"`global` at {', '.join(found)}. To fix: keep the state on an object or in a cached function."


def test_the_readme_line_counts_are_close_to_the_files():
    """The line counts README gives each file, in its table and in the paragraph on the files a
    first reading skips, within 15% of the file's."""
    section = (ROOT / "README.md").read_text().split("## Reading the code", 1)[1].split("\n## ", 1)[0]
    given = re.findall(r"`(\w+\.py)` \| (\d+) \|", section) + re.findall(r"`(\w+\.py)` \((\d+):", section)
    off = [f"{name}: README says {n}, it has {have}" for name, n in given
           if abs((have := len((ROOT / name).read_text().splitlines())) - int(n)) > 0.15 * have]
    assert given and not off, f"{'; '.join(off)}. Update the counts in README's 'Reading the code' section."


def fast_path_aliases(tree) -> dict[str, str]:
    """The names under which a file imports the FAST_PATHS modules (`import offload`, `import speed as s`),
    at any depth of its code."""
    return {a.asname or a.name: a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
            for a in node.names if a.name in FAST_PATHS}


def names_taken(tree, aliases: dict[str, str]):
    """(line, module, name, how) for every name a file takes from a FAST_PATHS module: `speed.X` read
    (how "read"), `from offload import X` ("import"), `monkeypatch.setattr(speed, "X", ...)` ("patch"),
    and a quoted annotation `"speed.X"` ("read")."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            yield node.lineno, aliases[node.value.id], node.attr, "read"
        elif isinstance(node, ast.ImportFrom) and node.module in FAST_PATHS and node.level == 0:
            yield from ((node.lineno, node.module, a.name, "import") for a in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
              and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in aliases
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            yield node.lineno, aliases[node.args[0].id], node.args[1].value, "patch"
    for line, quoted in quoted_annotations(tree):
        module, _, name = quoted.partition(".")
        if module in FAST_PATHS and name.isidentifier():
            yield line, module, name, "read"


def quoted_annotations(tree):
    """(line, text) of each quoted annotation of an argument or a return value: "speed.PlanFlags"."""
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            note = node.annotation
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            note = node.returns
        else:
            continue
        if isinstance(note, ast.Constant) and isinstance(note.value, str):
            yield node.lineno, note.value


def test_every_name_taken_from_a_fast_path_file_is_defined_there():
    """Most of speed.py, fast_decode.py, offload.py and tiles.py runs only on a GPU, so a name that
    moved between them, read in a branch the CPU tests never take, would fail only there. Every
    `speed.X` (and `from offload import X`, monkeypatch.setattr(speed, "X"), "speed.X" annotation)
    in the project's files and tests must name something the module has; a function or class read
    must be named by the fast-path file that defines it, not one that imports it from another."""
    modules = {name: importlib.import_module(name) for name in FAST_PATHS}
    missing, elsewhere = [], []
    for path in project_files() + sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text())
        for line, module, name, how in names_taken(tree, fast_path_aliases(tree)):
            where = f"{path.relative_to(ROOT)}:{line} {module}.{name}"
            if not hasattr(modules[module], name):
                missing.append(where)
                continue
            found = getattr(modules[module], name)
            home = found.__module__ if isinstance(found, type) or inspect.isfunction(found) else module
            if how == "read" and home != module and home in FAST_PATHS:
                elsewhere.append(f"{where} (defined in {home}.py)")
    assert not missing, (f"names that their module does not have: {', '.join(missing)}. To fix: name the file that "
                         "defines each now (speed.py: training; fast_decode.py: decoding; offload.py: offloaded "
                         "checkpoints and long rows; tiles.py), and import that file.")
    assert not elsewhere, (f"names read through a file that only imports them: {', '.join(elsewhere)}. To fix: read "
                           "each from the file that defines it, where a monkeypatch would also have to reach it.")
