"""The shape of the code, kept by a test: short functions, shallow nesting, teaching files within
their budgets, and imports that follow the README's reading order. A failure says which rule,
where, and what to do; the next feature then pays for its own seam."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60
MAX_NESTING = 4
BUDGETS = {"deltanet.py": 250, "model.py": 650, "lora.py": 550, "template.py": 300, "data.py": 600, "decode.py": 300,
           "train.py": 550, "infer.py": 550, "merge.py": 300}  # lines of each teaching file
BLOCKS = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match)
FIX = ("split it into functions that each do one thing, or move the machinery to a file a first reading "
       "skips (as speed.py holds the fast paths)")


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
