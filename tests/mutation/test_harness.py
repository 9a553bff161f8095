"""The mutation harness's own mechanics (the mutants themselves run under `make mutants`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from tests.mutation import order
from tests.mutation.harness import copy_repo, run_mutant, stale_reason
from tests.mutation.mutants import MUTANTS, Edit, Mutant


def test_a_snippet_must_occur_exactly_once(tmp_path):
    (tmp_path / "m.py").write_text("a = 1\nb = 1\n")
    mutant = lambda original: Mutant("m", "why", (Edit("m.py", original, "x"),), ())
    assert stale_reason(tmp_path, mutant("a = 1")) == ""
    assert "found 0 times" in stale_reason(tmp_path, mutant("c = 1"))
    assert "found 2 times" in stale_reason(tmp_path, mutant(" = 1"))
    assert "file not found" in stale_reason(tmp_path, Mutant("m", "why", (Edit("n.py", "a", "b"),), ()))


def test_every_mutant_still_applies_to_the_code():
    """A change that moves a mutant's snippet must update the mutant in the same change (keeping
    its bug): `make mutants` is not part of `make test`, so a stale one would go unseen."""
    root = Path(__file__).resolve().parents[2]
    stale = {m.name: why for m in MUTANTS if (why := stale_reason(root, m))}
    assert not stale, stale


def test_the_list_names_each_mutant_once_with_a_reason_and_guards():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))
    assert all(m.why and m.edits and m.guards for m in MUTANTS)
    assert all(e.original != e.mutated for m in MUTANTS for e in m.edits)


def test_guards_run_first_and_nothing_is_dropped(monkeypatch):
    monkeypatch.setenv("TWINLM_MUTANT_GUARDS", "tests/b.py\ntests/a.py::t2")
    items = [SimpleNamespace(nodeid=n) for n in ("tests/a.py::t1", "tests/a.py::t2", "tests/b.py::t1", "tests/c.py::t")]
    order.pytest_collection_modifyitems(None, None, items)
    assert [i.nodeid for i in items] == ["tests/b.py::t1", "tests/a.py::t2", "tests/a.py::t1", "tests/c.py::t"]


def test_a_mutant_is_applied_to_the_copy_and_undone(tmp_path):
    """A planted bug that a one-line suite catches; the copy is restored afterwards."""
    src, copy = tmp_path / "src", tmp_path / "copy"
    (src / "tests").mkdir(parents=True)
    (src / "tests" / "__init__.py").write_text("")
    (src / "mod.py").write_text("def f():\n    return 1\n")
    (src / "tests" / "test_mod.py").write_text("import mod\n\ndef test_f():\n    assert mod.f() == 1\n")
    (src / "tests" / "mutation").mkdir()  # the copy runs its own tree's plugin
    (src / "tests" / "mutation" / "__init__.py").write_text("")
    (src / "tests" / "mutation" / "order.py").write_text(Path(order.__file__).read_text())
    copy_repo(src, copy)
    mutant = Mutant("ret-2", "why", (Edit("mod.py", "return 1", "return 2"),), ("tests/test_mod.py",))
    outcome = run_mutant(copy, mutant, ["tests"], guards_only=False, timeout=120)
    assert outcome.status == "caught" and outcome.detail.startswith("tests/test_mod.py::test_f")
    assert (copy / "mod.py").read_text() == (src / "mod.py").read_text()
