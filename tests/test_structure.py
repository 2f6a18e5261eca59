"""The single file keeps its map: sections in the order the module docstring lists, each using only what
the sections above it define, SQL only in the store, HTTP only in the transport and the API clients, no
I/O in the factory."""
import ast
import re
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "patchrelay.py"
BANNER = re.compile(r"^# =+ (.+)$")


def _sections():
    text = SOURCE.read_text()
    lines = text.splitlines()
    banners = [(i + 1, m.group(1).strip()) for i, line in enumerate(lines) if (m := BANNER.match(line))]
    return ast.parse(text), banners


def _section_of(banners, lineno):
    found = 0
    for index, (start, _) in enumerate(banners):
        if start <= lineno:
            found = index
    return found


def _top_level_names(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [n.id for target in node.targets for n in ast.walk(target) if isinstance(n, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _definitions(tree, banners):
    where = {}
    for node in tree.body:
        for name in _top_level_names(node):
            where.setdefault(name, _section_of(banners, node.lineno))
    return where


def test_banners_follow_the_map_in_the_module_docstring():
    """Each banner is `# ==== N. name`, numbered and named as the module docstring's map lists them."""
    tree, banners = _sections()
    doc = ast.get_docstring(tree)
    listed = [f"{n}. {name}" for n, name in re.findall(r"^\s*(\d+)\.\s+(\S+(?: and \S+)?)", doc, re.M)]
    assert [name for _, name in banners] == listed
    assert listed[0] == "1. errors and constants" and len(listed) >= 13


def test_every_section_uses_only_what_earlier_sections_define():
    tree, banners = _sections()
    defined = _definitions(tree, banners)
    wrong = set()
    for node in tree.body:
        here = _section_of(banners, node.lineno)
        owner = (_top_level_names(node) or [f"line {node.lineno}"])[0]
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and defined.get(sub.id, -1) > here:
                wrong.add(f"{banners[here][1]}: {owner} uses {sub.id} ({banners[defined[sub.id]][1]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_direction_check_can_fail():
    """The check above sees a reference to a later section (guards against a check that passes vacuously)."""
    tree = ast.parse("def a():\n    return b()\n\n# ==== later\ndef b():\n    return 1\n")
    banners = [(1, "first"), (4, "later")]
    defined = _definitions(tree, banners)
    uses = {sub.id for sub in ast.walk(tree.body[0]) if isinstance(sub, ast.Name)}
    assert defined["b"] > _section_of(banners, tree.body[0].lineno) and "b" in uses


def _section_text(name):
    text = SOURCE.read_text()
    lines = text.splitlines()
    _, banners = _sections()
    starts = [start for start, n in banners]
    index = [n.split(". ", 1)[-1] for _, n in banners].index(name)
    end = starts[index + 1] - 1 if index + 1 < len(starts) else len(lines)
    return "\n".join(lines[starts[index] - 1:end])


SQL = re.compile(r"\b(SELECT .* FROM|INSERT (?:OR \w+ )?INTO|UPDATE \w+ SET|DELETE FROM|CREATE (?:TABLE|INDEX))\b")


@pytest.mark.parametrize("section", ["errors and constants", "config", "transport", "linear", "github", "codex",
                                     "git", "factory", "apply", "worker", "tick", "cli"])
def test_sql_lives_only_in_the_store(section):
    assert not SQL.findall(_section_text(section)), f"SQL in the {section} section"


@pytest.mark.parametrize("section", ["errors and constants", "config", "store", "codex", "git", "factory", "apply",
                                     "worker", "tick", "cli"])
def test_http_goes_through_the_transport_and_the_clients(section):
    text = _section_text(section)
    assert not re.search(r"\brequests\.(get|post|request|Session)\b", text), f"HTTP in the {section} section"


def test_the_factory_does_no_io():
    text = _section_text("factory")
    for needle in ("subprocess.", "open(", "requests.", ".execute(", "os.environ", "time.sleep", "Path("):
        assert needle not in text, f"the factory uses {needle}"
