"""Outputs appear whole or not at all: every writer goes through factft.tables' atomic helpers
(a temporary beside the target, renamed onto it), so no rule ever reads a half-written file."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from factft.errors import FactftError
from factft.tables import atomic_dir, atomic_path, read_table, remove_stale_temps, write_table, write_tsv

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "workflow/scripts").glob("*.py")) + sorted((ROOT / "workflow/scripts/factft").glob("*.py"))
ATOMIC_HELPERS = {"atomic_path", "atomic_dir"}
# Calls that create or fill a file (method or function name).
WRITERS = {"to_parquet", "to_csv", "to_json", "savefig", "save_pretrained", "write_text", "write_bytes", "save_file"}
# module.function writers, told apart from harmless namesakes (array.copy, str.join...).
QUALIFIED_WRITERS = {
    ("torch", "save"), ("pq", "write_table"), ("json", "dump"), ("np", "save"), ("np", "savez"),
    ("shutil", "copy"), ("shutil", "copy2"), ("shutil", "copyfile"), ("shutil", "copytree"), ("shutil", "move"),
    ("os", "link"), ("os", "symlink"),
}  # fmt: skip
# Writers that are not outputs a rule reads, with the reason.
ALLOWED = {
    # A job's log is appended to while it runs (so a killed job still shows why); no rule reads it.
    ("logging.py", "to_log"),
}


def writer_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Attribute):
        if isinstance(func.value, ast.Name) and (func.value.id, func.attr) in QUALIFIED_WRITERS:
            return f"{func.value.id}.{func.attr}"
        return func.attr if func.attr in WRITERS else None
    if isinstance(func, ast.Name):
        if func.id == "open":
            mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
            if isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+"):
                return "open"
            return None
        return func.id if func.id in WRITERS else None
    return None


def inside_atomic_helper(stack: list[ast.AST]) -> bool:
    for node in stack:
        if isinstance(node, ast.With):
            for item in node.items:
                expr = item.context_expr
                if isinstance(expr, ast.Call) and getattr(expr.func, "id", None) in ATOMIC_HELPERS:
                    return True
    return False


def bare_writes(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line function: writer` for each write that no atomic helper encloses."""
    found = []

    def visit(node: ast.AST, stack: list[ast.AST], function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Call):
            name = writer_name(node)
            allowed = (path.name, function) in ALLOWED or function in ATOMIC_HELPERS
            if name and not allowed and not inside_atomic_helper(stack):
                found.append(f"{path.relative_to(root)}:{node.lineno} {function}: {name}")
        for child in ast.iter_child_nodes(node):
            visit(child, stack + [node], function)

    visit(ast.parse(path.read_text()), [], "<module>")
    return found


def test_every_writer_in_the_library_and_scripts_goes_through_an_atomic_helper():
    assert len(SOURCES) > 20
    bare = [line for path in SOURCES for line in bare_writes(path)]
    assert bare == [], "write through factft.tables.atomic_path/atomic_dir (or write_table/write_tsv):\n" + "\n".join(bare)


def test_the_scan_sees_a_bare_write_and_accepts_one_inside_a_helper(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def bad(table, path, model):\n"
        "    table.to_parquet(path)\n"
        "    open(path, 'w').write('x')\n"
        "    model.save_pretrained(path)\n"
        "    torch.save({}, path)\n"
        "def good(table, path, model):\n"
        "    open(path).read()\n"
        "    with atomic_path(path) as tmp:\n"
        "        table.to_csv(tmp)\n"
        "    with atomic_dir(path) as tmp:\n"
        "        model.save_pretrained(tmp)\n"
    )
    assert bare_writes(sample, root=tmp_path) == [
        "sample.py:2 bad: to_parquet",
        "sample.py:3 bad: open",
        "sample.py:4 bad: save_pretrained",
        "sample.py:5 bad: torch.save",
    ]


# ---- the helpers themselves ---------------------------------------------------------------


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.tsv"
    write_tsv(pd.DataFrame({"x": [1]}), target)
    old = target.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a ta")
            raise RuntimeError("killed")
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.tsv"]


def test_a_folder_appears_whole_on_success_and_not_at_all_on_failure(tmp_path):
    target = tmp_path / "models" / "tiny"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not target.exists()
    assert [p.name for p in target.iterdir()] == ["config.json"]


def test_a_folder_output_replaces_only_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty") as tmp:
        (tmp / "a").write_text("a")
    assert (tmp_path / "empty" / "a").read_text() == "a"
    with pytest.raises(FactftError, match="it already exists as a folder that is not empty"):
        with atomic_dir(tmp_path / "empty"):
            pass
    assert (tmp_path / "empty" / "a").read_text() == "a"


def test_a_killed_writers_temporaries_are_removed_when_the_folder_is_written_again(tmp_path):
    stale = tmp_path / ".adapter.k1ll3d.tmp"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    other = tmp_path / ".metrics.tsv.abc.tmp"  # another output's temporary stays
    other.write_text("x")
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "adapter_config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".metrics.tsv.abc.tmp", "adapter"]
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_file_outputs_stale_temporary_goes_when_it_is_written_again_but_not_in_a_shared_cache(tmp_path):
    stale = tmp_path / ".a.png.k1ll3d.tmp"  # left by a writer of a.png killed with SIGKILL
    others = [tmp_path / ".a.png.x.abc.tmp", tmp_path / ".b.png.abc.tmp"]  # a.png.x's, b.png's
    for path in [stale, *others]:
        path.write_text("half")
    with atomic_path(tmp_path / "a.png", shared=True) as tmp:
        tmp.write_text("png")
    assert stale.exists()  # a cache's: maybe another process's, still being written
    with atomic_path(tmp_path / "a.png") as tmp:
        tmp.write_text("png")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.png.x.abc.tmp", ".b.png.abc.tmp", "a.png"]


def test_outputs_get_the_usual_permissions_not_the_temporarys_private_ones(tmp_path):
    previous = os.umask(0o022)
    try:
        write_table(pd.DataFrame({"x": [1]}), tmp_path / "t.parquet")
        with atomic_dir(tmp_path / "folder"):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "t.parquet").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def test_a_file_where_a_folder_belongs_and_a_folder_where_a_file_belongs_are_named(tmp_path):
    (tmp_path / "results").write_text("notes")
    with pytest.raises(FactftError, match=r"results is a file where a folder is expected; move or delete that file"):
        write_table(pd.DataFrame({"x": [1]}), tmp_path / "results" / "x" / "t.parquet")
    (tmp_path / "t.parquet").mkdir()
    with pytest.raises(FactftError, match=r"t\.parquet: it is a folder, where a file is expected"):
        write_table(pd.DataFrame({"x": [1]}), tmp_path / "t.parquet")
    assert (tmp_path / "results").read_text() == "notes"


def test_tables_round_trip_through_the_atomic_writers(tmp_path):
    table = pd.DataFrame({"id": ["a", "b"], "answers": [["x"], ["y", "z"]]})
    write_table(table, tmp_path / "t.parquet")
    assert read_table(tmp_path / "t.parquet")["answers"].map(list).tolist() == [["x"], ["y", "z"]]
