"""Statement-by-statement alignment of a mirrored torch / Flax function pair.

Each function is flattened into statements (a compound statement's header — `if ...:`,
`for ...:`, `with ...:` — is a statement of its own, its body follows one level deeper; comments
travel with the statement below them). Each statement is normalised by `idioms.Normaliser`, and
the two lists are aligned by dynamic programming: equal canonical forms pair up first, then
statements with the same target and similar words; the rest stay on one side.

A row is
- `same`     the canonical forms are equal (the words may differ by known idioms, highlighted);
- `idiom`    the forms differ, but a `PAIR_IDIOMS` entry names the framework reason;
- `doc`      docstrings (shown, never counted);
- `differs`  paired, different, unexplained;
- `torch` / `flax`  on one side only (explained when a `ONE_SIDED_IDIOMS` entry matches).

The pair's `drift` is the number of unexplained rows (`differs`, and one-sided rows with no
idiom). `allowances.ALLOWANCES` bounds it per pair; tests/parity/test_explain_alignment.py checks it.
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import pkgutil
import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from .idioms import IDIOMS, ONE_SIDED_IDIOMS, PAIR_IDIOMS, normalise

__all__ = ["Pair", "Row", "Stmt", "align", "align_pair", "flatten", "mirrored_pairs", "module_sources", "one_sided",
           "source_of"]

TWINS = ("torch_impl", "flax_impl")
CALL = {"forward": "__call__"}  # torch's Module.forward is NNX's __call__


@dataclass(frozen=True)
class Stmt:
    """One statement (or compound-statement header) of a function, as shown and as compared."""

    kind: str  # def / doc / stmt / header
    depth: int  # nesting below the function's own body
    first: int  # first and last source line (1-based, in the module file), comments included
    last: int
    text: str  # what the page shows: the source lines, dedented to the function
    key: str  # the canonical form
    idioms: frozenset[str]
    explained: str | None = None  # an idiom that explains this statement standing alone


@dataclass
class Row:
    """One row of the side-by-side view."""

    torch: Stmt | None
    flax: Stmt | None
    status: str  # same / idiom / doc / differs / torch / flax
    idioms: tuple[str, ...] = ()

    @property
    def counts(self) -> bool:
        """True when the row adds to the pair's drift."""
        if self.status == "differs":
            return True
        if self.status in ("torch", "flax"):
            one = self.torch or self.flax
            return one.kind != "doc" and one.explained is None
        return False


@dataclass
class Pair:
    """A mirrored function or method: `qualname` in `module` of both twins (torch `forward`
    is `__call__` here)."""

    module: str  # path inside each twin, e.g. "layers/attention.py"
    qualname: str  # e.g. "Attention.__call__"
    torch_name: str  # e.g. "Attention.forward"
    torch_stmts: list[Stmt]
    flax_stmts: list[Stmt]
    torch_lines: tuple[int, int]
    flax_lines: tuple[int, int]
    rows: list[Row] = field(default_factory=list)

    @property
    def id(self) -> str:
        """`module:qualname`, the key of the allowance table."""
        return f"{self.module}:{self.qualname}"

    @property
    def drift(self) -> int:
        """Unexplained rows: statements that differ with no known idiom, or stand alone."""
        return sum(r.counts for r in self.rows)

    def tally(self) -> dict[str, int]:
        """Rows per status."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out


# ---- flattening -------------------------------------------------------------------------------
def flatten(fn: ast.FunctionDef, lines: list[str], side: str) -> list[Stmt]:
    """The statements of `fn` (its `def` line first), in order, with leading comments attached."""
    base = fn.col_offset
    out: list[Stmt] = []
    cursor = [(fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno) - 1]  # last line consumed

    def dedent(a: int, b: int) -> str:
        return "\n".join(line[base:] if line[:base].strip() == "" else line.lstrip() for line in lines[a - 1:b])

    def emit(kind: str, depth: int, first: int, last: int, key: str, used: frozenset = frozenset()) -> None:
        # comment lines between what was consumed and `first` belong to this statement
        start = first
        while start - 1 > cursor[0] and lines[start - 2].strip().startswith("#"):
            start -= 1
        explained = None
        if kind != "doc":
            code = "\n".join(line for line in lines[first - 1:last] if not line.strip().startswith("#"))
            for s, idiom, pattern in ONE_SIDED_IDIOMS:
                if s == side and pattern.search(code):
                    explained = idiom
            if key in ("None", "") and explained is None and used:
                explained = sorted(used)[0]  # a statement an idiom rewrote away (super().__init__())
        out.append(Stmt(kind, depth, start, last, dedent(start, last), key, used, explained))
        cursor[0] = max(cursor[0], last)

    def header_end(node: ast.AST, body: list[ast.stmt]) -> int:
        end = body[0].lineno - 1 if body else node.end_lineno
        while end > node.lineno and (lines[end - 1].strip().startswith("#") or not lines[end - 1].strip()):
            end -= 1
        if body and hasattr(body[0], "decorator_list") and body[0].decorator_list:
            end = min(end, body[0].decorator_list[0].lineno - 1)
        return end

    def shell(node: ast.AST) -> ast.AST:
        """A copy of a compound statement without its body, for its canonical header."""
        c = copy.copy(node)
        for attr in ("body", "orelse", "finalbody", "handlers"):
            if hasattr(c, attr):
                setattr(c, attr, [ast.Pass()] if attr == "body" else [])
        return c

    def header_key(node: ast.AST) -> tuple[str, frozenset]:
        key, used = normalise(shell(node), side)
        return key.split("\n")[-2] if "\n" in key else key, used

    def else_line(after: int, until: int, word: str) -> int:
        for i in range(after, until):
            if lines[i].strip().startswith(word):
                return i + 1
        return after + 1

    def block(body: list[ast.stmt], depth: int) -> None:
        for node in body:
            visit(node, depth)

    def visit(node: ast.stmt, depth: int, elif_: bool = False) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            emit("def", depth, first, header_end(node, node.body), *_def_key(node, side))
            body = node.body
            if body and _is_docstring(body[0]):
                emit("doc", depth + 1, body[0].lineno, body[0].end_lineno, "<doc>")
                body = body[1:]
            block(body, depth + 1)
            return
        if isinstance(node, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try)):
            key, used = header_key(node)
            emit("header", depth, node.lineno, header_end(node, node.body), ("el" + key) if elif_ else key, used)
            block(node.body, depth + 1)
            if isinstance(node, ast.Try):
                for h in node.handlers:
                    hk = ast.unparse(ast.ExceptHandler(h.type, h.name, [ast.Pass()])).split("\n")[0]
                    emit("header", depth, h.lineno, header_end(h, h.body), hk)
                    block(h.body, depth + 1)
            orelse = getattr(node, "orelse", [])
            if isinstance(node, ast.If) and len(orelse) == 1 and isinstance(orelse[0], ast.If) \
                    and lines[orelse[0].lineno - 1].strip().startswith("elif"):
                visit(orelse[0], depth, elif_=True)
            elif orelse:
                ln = else_line(node.body[-1].end_lineno, orelse[0].lineno, "else")
                emit("header", depth, ln, ln, "else:")
                block(orelse, depth + 1)
            if isinstance(node, ast.Try) and node.finalbody:
                ln = else_line(node.body[-1].end_lineno, node.finalbody[0].lineno, "finally")
                emit("header", depth, ln, ln, "finally:")
                block(node.finalbody, depth + 1)
            return
        emit("stmt", depth, node.lineno, node.end_lineno, *normalise(node, side))

    visit(fn, 0)
    return out


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _def_key(node: ast.AST, side: str) -> tuple[str, frozenset]:
    c = copy.copy(node)
    c.body = [ast.Pass()]
    if isinstance(c, ast.ClassDef):
        c.bases, c.keywords = [], []
        c.decorator_list = []
    key, used = normalise(c, side)
    key = "\n".join(line for line in key.split("\n") if line.strip() != "pass")
    return key, used


# ---- alignment ----------------------------------------------------------------------------------
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|\S")


@lru_cache(maxsize=None)
def _bag(key: str) -> Counter:
    return Counter(_TOKEN.findall(key))


def _similarity(a: str, b: str) -> float:
    """Shared tokens, 0 to 1 (difflib's quick_ratio: 2 * common / total)."""
    x, y = _bag(a), _bag(b)
    total = sum(x.values()) + sum(y.values())
    return 2.0 * sum((x & y).values()) / total if total else 1.0


def _target(key: str) -> str | None:
    m = re.match(r"^([A-Za-z_][\w.,\[\] ]*?)\s*(=|\+=|-=|\*=)(?!=)", key)
    return m.group(1).replace(" ", "") if m else None


def _pair_idiom(t: Stmt, f: Stmt) -> str | None:
    for p in PAIR_IDIOMS:
        if p.matches(t.text, f.text):
            return p.idiom
    return None


def _score(t: Stmt, f: Stmt) -> float | None:
    """How well two statements pair (None: they must not)."""
    if t.kind != f.kind:
        return None
    if t.kind == "doc":
        return 3.0
    if t.key == f.key:
        return 4.0 - 0.25 * abs(t.depth - f.depth)
    if t.kind == "def":
        return 2.0
    same_target = _target(t.key) is not None and _target(t.key) == _target(f.key)
    sim = _similarity(t.key, f.key)
    if _pair_idiom(t, f) and (same_target or sim >= 0.3):
        return 2.5
    if same_target:
        return 1.0 + sim
    if sim >= 0.55:
        return sim
    return None


def align(torch_stmts: list[Stmt], flax_stmts: list[Stmt]) -> list[Row]:
    """Needleman-Wunsch over the two statement lists (gaps cost nothing; pairs score `_score`)."""
    n, m = len(torch_stmts), len(flax_stmts)
    best = [[0.0] * (m + 1) for _ in range(n + 1)]
    move = [[""] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        for j in range(m + 1):
            if i == 0 and j == 0:
                continue
            options = []
            if i and j:
                s = _score(torch_stmts[i - 1], flax_stmts[j - 1])
                if s is not None:
                    options.append((best[i - 1][j - 1] + s, "d"))
            if i:
                options.append((best[i - 1][j], "t"))
            if j:
                options.append((best[i][j - 1], "f"))
            best[i][j], move[i][j] = max(options, key=lambda o: (o[0], o[1] == "d"))
    rows: list[Row] = []
    i, j = n, m
    while i or j:
        step = move[i][j]
        if step == "d":
            rows.append(_row(torch_stmts[i - 1], flax_stmts[j - 1]))
            i, j = i - 1, j - 1
        elif step == "t":
            rows.append(_one(torch_stmts[i - 1], None))
            i -= 1
        else:
            rows.append(_one(None, flax_stmts[j - 1]))
            j -= 1
    rows.reverse()
    return _order_gaps(rows)


def _order_gaps(rows: list[Row]) -> list[Row]:
    """Within a run of one-sided rows, torch rows first: the page reads top to bottom."""
    out, run = [], []
    for r in rows + [None]:
        if r is not None and r.status in ("torch", "flax"):
            run.append(r)
            continue
        out += [x for x in run if x.status == "torch"] + [x for x in run if x.status == "flax"]
        run = []
        if r is not None:
            out.append(r)
    return out


def _notable(used: frozenset[str]) -> tuple[str, ...]:
    return tuple(sorted(i for i in used if IDIOMS[i].notable))


def _row(t: Stmt, f: Stmt) -> Row:
    used = t.idioms | f.idioms
    if t.kind == "doc":
        return Row(t, f, "doc")
    if t.key == f.key:
        return Row(t, f, "same", _notable(used))
    idiom = _pair_idiom(t, f)
    if idiom is not None:
        return Row(t, f, "idiom", tuple(sorted(set(_notable(used)) | {idiom})))
    return Row(t, f, "differs", _notable(used))


def _one(t: Stmt | None, f: Stmt | None) -> Row:
    s = t or f
    status = "torch" if t is not None else "flax"
    return Row(t, f, status, (s.explained,) if s.explained else _notable(s.idioms) if s.kind != "doc" else ())


# ---- the twins' sources ---------------------------------------------------------------------------
@lru_cache(maxsize=None)
def module_sources(twin: str) -> dict[str, str]:
    """Every module of one twin package, read with `inspect` from the installed package: path
    inside the package (e.g. "layers/attention.py") -> source."""
    package = importlib.import_module(twin)
    out = {}
    for info in pkgutil.walk_packages(package.__path__, twin + "."):
        module = importlib.import_module(info.name)
        rel = info.name[len(twin) + 1:].replace(".", "/") + ("/__init__.py" if info.ispkg else ".py")
        out[rel] = _getsource(module)
    out["__init__.py"] = _getsource(package)
    return out


def _getsource(module: object) -> str:
    try:
        return inspect.getsource(module)
    except OSError:  # an empty file (a package's bare __init__.py) has no source lines
        return ""


def _definitions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """Top-level functions and class methods by qualified name (`forward` as `__call__`)."""
    out: dict[str, ast.FunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    out[f"{node.name}.{CALL.get(item.name, item.name)}"] = item
    return out


def align_pair(module: str, qualname: str) -> Pair:
    """Align one mirrored pair, e.g. `align_pair("layers/attention.py", "Attention.__call__")`."""
    for pair in mirrored_pairs(module):
        if pair.qualname == qualname:
            return pair
    raise KeyError(f"no mirrored pair {module}:{qualname}")


@lru_cache(maxsize=None)
def _module_pairs(module: str) -> tuple[Pair, ...]:
    sources = module_sources(TWINS[0]), module_sources(TWINS[1])
    if module not in sources[0] or module not in sources[1]:
        raise KeyError(f"{module} is not a module of both torch_impl and flax_impl (renamed? "
                       "parity/explain/components.py names the modules each page shows)")
    t_src, f_src = sources[0][module], sources[1][module]
    t_defs, f_defs = _definitions(ast.parse(t_src)), _definitions(ast.parse(f_src))
    t_lines, f_lines = t_src.splitlines(), f_src.splitlines()
    pairs = []
    for qualname, t_node in t_defs.items():
        f_node = f_defs.get(qualname)
        if f_node is None:
            continue
        torch_name = qualname.rsplit(".", 1)[0] + "." + t_node.name if "." in qualname else t_node.name
        t_stmts, f_stmts = flatten(t_node, t_lines, "torch"), flatten(f_node, f_lines, "flax")
        pair = Pair(module, qualname, torch_name, t_stmts, f_stmts, (t_stmts[0].first, t_node.end_lineno),
                    (f_stmts[0].first, f_node.end_lineno))
        pair.rows = align(t_stmts, f_stmts)
        pairs.append(pair)
    return tuple(pairs)


def mirrored_pairs(module: str | None = None) -> list[Pair]:
    """Every function and method defined in both twins (in one module, or in all), aligned."""
    modules = [module] if module else sorted(set(module_sources(TWINS[0])) & set(module_sources(TWINS[1])))
    return [p for m in modules for p in _module_pairs(m)]


def one_sided(module: str) -> dict[str, list[str]]:
    """Functions and methods of `module` defined in one twin only: side -> qualified names."""
    t = _definitions(ast.parse(module_sources(TWINS[0])[module]))
    f = _definitions(ast.parse(module_sources(TWINS[1])[module]))
    return {"torch": sorted(set(t) - set(f)), "flax": sorted(set(f) - set(t))}


def source_of(twin: str, module: str, qualname: str) -> tuple[str, int]:
    """The dedented source of one definition and its first line number."""
    src = module_sources(twin)[module]
    node = _definitions(ast.parse(src))[qualname]
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    return textwrap.dedent("\n".join(src.splitlines()[first - 1:node.end_lineno])), first


def main() -> None:
    """Print every pair's figures (`python -m parity.explain`): rows, alike, explained by an idiom,
    unexplained (drift) and the allowance; `PAST` marks a pair over its bound, `slack` one under it."""
    from .allowances import ALLOWANCES

    pairs = mirrored_pairs()
    print(f"{'pair':58s} {'rows':>4s} {'same':>4s} {'idiom':>5s} {'drift':>5s} {'allow':>5s}")
    for p in pairs:
        t = p.tally()
        allow = ALLOWANCES[p.id].rows if p.id in ALLOWANCES else 0
        flag = "  PAST" if p.drift > allow else "  slack" if p.drift < allow else ""
        print(f"{p.id:58s} {len(p.rows):4d} {t.get('same', 0):4d} {t.get('idiom', 0):5d} {p.drift:5d} {allow:5d}{flag}")
    rows = sum(len(p.rows) for p in pairs)
    drift = sum(p.drift for p in pairs)
    worst = max(pairs, key=lambda p: p.drift)
    print(f"{len(pairs)} pairs, {rows} rows, {rows - drift} explained ({100 * (rows - drift) / rows:.1f}%), "
          f"{drift} unexplained in {sum(p.drift > 0 for p in pairs)} pairs ({len(ALLOWANCES)} allowances); "
          f"largest: {worst.id} ({worst.drift})")

if __name__ == "__main__":
    main()
