"""The raw recipe tree: YAML read with positions, `extends:` merged, overrides applied.

A `Tree` is plain data (dicts, lists, scalars) plus, for every mapping key and list
item, where it was written: file, line and column of the key and of the value. Merging
and overrides keep those positions, so a problem always points at the file that set the
offending value (a parent recipe, or `<command line>`).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

from llmbuild.recipe.paths import YamlPath, dotted, override_path_problem
from llmbuild.recipe.problems import COMMAND_LINE, Problem, describe
from llmbuild.recipe.schema import Recipe


class Loc(NamedTuple):
    file: str
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class Tree:
    data: dict[str, Any]
    file: str  # the recipe file that was loaded (the child of any extends chain)
    # path -> (position of the key, position of the value); list items have both equal
    positions: dict[YamlPath, tuple[Loc, Loc]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # every file read, child first

    def where(self, path: YamlPath, *, key: bool = False) -> Loc:
        """Position of the key (or value) at `path`, or of the nearest enclosing key."""
        if path in self.positions:
            return self.positions[path][0 if key else 1]
        while path:
            path = path[:-1]
            if path in self.positions:
                return self.positions[path][0]
        return Loc(self.file, 1, 1)

    def get(self, path: YamlPath, default: Any = None) -> Any:
        node: Any = self.data
        for seg in path:
            if not isinstance(node, dict) or seg not in node:
                return default
            node = node[seg]
        return node

    def replace(self, path: YamlPath, value: Any, positions: dict[YamlPath, tuple[Loc, Loc]]) -> None:
        """Set `path` to `value` (a copy), with `positions` for it and everything below."""
        self._drop(path)
        parent = self.data
        for seg in path[:-1]:
            parent = parent[seg]
        parent[path[-1]] = copy.deepcopy(value)
        self.positions.update(positions)

    def delete(self, path: YamlPath) -> None:
        parent = self.get(path[:-1])
        if isinstance(parent, dict) and path[-1] in parent:
            del parent[path[-1]]
            self._drop(path)

    def _drop(self, path: YamlPath) -> None:
        n = len(path)
        for p in [p for p in self.positions if p[:n] == path]:
            del self.positions[p]


def read_tree(file: str, problems: list[Problem], _chain: tuple[str, ...] = ()) -> Tree | None:
    """Read `file` and, recursively, the recipes it extends; the merged tree, or None
    with `problems` filled in if any file could not be read."""
    tree = _read_yaml(file, problems)
    if tree is None or "extends" not in tree.data:
        return tree
    value = tree.data["extends"]
    loc = tree.positions[("extends",)][1]
    tree.delete(("extends",))
    if not isinstance(value, str) or not value or "\0" in value:
        problems.append(_problem("extends", f"expected a recipe file name, found {describe(value)}", loc))
        return None
    parent = os.path.normpath(os.path.join(os.path.dirname(file), value))
    chain = _chain + (os.path.realpath(file),)
    if os.path.realpath(parent) in chain:
        cycle = " -> ".join([*(os.path.basename(f) for f in chain), os.path.basename(parent)])
        problems.append(_problem("extends", f"recipes extend each other in a cycle: {cycle}", loc))
        return None
    if not os.path.isfile(parent):
        problems.append(_problem("extends", f"extended recipe {parent[:200]} does not exist", loc))
        return None
    base = read_tree(parent, problems, chain)
    if base is None:
        return None
    base.file = tree.file
    base.files = tree.files + base.files
    _merge(base, tree.data, (), tree.positions)
    return base


def _merge(dst: Tree, src: dict, prefix: YamlPath, src_positions: dict) -> None:
    """Deep merge: mappings merge key by key, anything else (lists too) is replaced."""
    for key, value in src.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(dst.get(path), dict):
            dst.positions[path] = src_positions[path]
            _merge(dst, value, path, src_positions)
        else:
            n = len(path)
            dst.replace(path, value, {p: l for p, l in src_positions.items() if p[:n] == path})


# Bounds on what a recipe may expand to: a 400-byte file of nested aliases ("billion
# laughs") would otherwise expand to billions of values; deep nesting would end in a
# RecursionError. Real recipes are a few hundred values, nested 5 deep.
MAX_RECIPE_BYTES = 1 << 20
MAX_VALUES = 20_000
MAX_DEPTH = 32
_YAML_TAG = "tag:yaml.org,2002:"
ALLOWED_TAGS = ("str", "int", "float", "bool", "null", "map", "seq", "merge")


def _read_yaml(file: str, problems: list[Problem]) -> Tree | None:
    from ruamel.yaml.error import YAMLError

    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            problems.append(Problem("", f"recipe is larger than {MAX_RECIPE_BYTES} bytes; expected a small YAML file",
                                    file))
            return None
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problems.append(Problem("", f"cannot read recipe: {e}", file))
        return None
    try:
        doc = load_yaml_checked(text, file, problems)
    except YAMLError as e:
        problems.append(Problem("", f"cannot read recipe: {e}", file))
        return None
    if doc is _INVALID:
        return None
    tree = Tree({}, file, files=[file])
    data = _plain(doc, (), tree)
    if not isinstance(data, dict):
        # Not the value itself: a file that is no recipe (extends: /etc/passwd) is never echoed.
        found = f"a string of {len(data)} characters" if isinstance(data, str) else describe(data)
        problems.append(Problem("", f"expected a mapping of recipe keys, found {found}", file, 1, 1))
        return None
    tree.data = data
    return tree


_INVALID = object()


def load_yaml_checked(text: str, file: str, problems: list[Problem], *, typ: str = "rt",
                      loc: "Loc | None" = None) -> Any:
    """YAML text -> data, refusing (as problems with positions, returning _INVALID) what
    a recipe must not contain: tags other than the plain YAML types, values an explicit
    !!int/!!float tag cannot convert, more than MAX_VALUES values once aliases are
    expanded, nesting deeper than MAX_DEPTH. `loc`: report every problem there (an
    override on the command line) instead of at the node's position."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError

    def at(mark) -> tuple[str, int, int]:
        if loc is not None:
            return loc.file, loc.line, loc.column
        return (file, mark.line + 1, mark.column + 1) if mark is not None else (file, 0, 0)

    yaml = YAML(typ=typ, pure=True)
    try:
        node = yaml.compose(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = "; ".join(str(s) for s in (e.context, e.problem) if s)
        problems.append(Problem("", f"invalid YAML: {what}", *at(mark)))
        return _INVALID
    except RecursionError:
        problems.append(Problem("", f"invalid YAML: nested more than {MAX_DEPTH} levels deep", *at(None)))
        return _INVALID
    if node is None:
        return None
    found = _node_problems(node)
    if found:
        found.sort(key=lambda f: (f[1].line, f[1].column) if f[1] is not None else (0, 0))
        problems += [Problem("", message, *at(mark)) for message, mark in found]
        return _INVALID
    try:
        return yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = "; ".join(str(s) for s in (e.context, e.problem) if s)
        problems.append(Problem("", f"invalid YAML: {what}", *at(mark)))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:
        # a constructor's conversion the node checks did not foresee: unpositioned
        problems.append(Problem("", f"invalid YAML value: {e}", *at(None)))
    return _INVALID


def _node_problems(root) -> list[tuple[str, Any]]:
    """(message, mark) for the first node past a bound, and for every refused tag or
    unconvertible tagged scalar. Walks aliases as often as they are used (that is
    what loading would expand), stopping at the bounds."""
    from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

    found: list[tuple[str, Any]] = []
    count = 0
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            return [(f"recipe expands to more than {MAX_VALUES} values (nested YAML aliases?); "
                     "expected a small recipe", node.start_mark)]
        if depth > MAX_DEPTH:
            return [(f"recipe is nested more than {MAX_DEPTH} levels deep", node.start_mark)]
        tag = str(node.tag) if node.tag is not None else ""
        kind = tag[len(_YAML_TAG):] if tag.startswith(_YAML_TAG) else None
        if kind not in ALLOWED_TAGS:
            found.append((f"YAML tag {tag!r} is not allowed in a recipe; expected plain values"
                          f" ({', '.join('!!' + t for t in ALLOWED_TAGS[:5])})", node.start_mark))
            continue
        if isinstance(node, ScalarNode):
            problem = _tagged_scalar_problem(kind, node.value)
            if problem:
                found.append((problem, node.start_mark))
        elif isinstance(node, SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, MappingNode):
            for key, value in node.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
    return found


def _tagged_scalar_problem(kind: str, value: str) -> str | None:
    """Why an explicitly tagged scalar cannot be converted, or None."""
    text = value.replace("_", "").strip()
    if kind == "int":
        try:
            int(text, 0) if text.lstrip("+-")[:2].lower() in ("0x", "0o", "0b") else int(text)
        except ValueError:
            return f"!!int {value!r}: expected an integer"
    elif kind == "bool" and value.lower() not in ("true", "false", "yes", "no", "on", "off", "y", "n"):
        return f"!!bool {value!r}: expected true or false"
    elif kind == "null" and value.lower() not in ("", "~", "null"):
        return f"!!null {value!r}: expected null"
    elif kind == "float":
        if text.lower() not in (".inf", "+.inf", "-.inf", ".nan"):
            try:
                float(text)
            except ValueError:
                return f"!!float {value!r}: expected a number"
    return None


def _plain(node: Any, path: YamlPath, tree: Tree) -> Any:
    """ruamel round-trip nodes -> plain Python data, recording positions in `tree`."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(node, CommentedMap):
        out = {}
        for key, value in node.items():
            (kl, kc), (vl, vc) = _key_value_position(node, key)
            key = key if isinstance(key, str) else str(key)
            tree.positions[path + (key,)] = (Loc(tree.file, kl + 1, kc + 1), Loc(tree.file, vl + 1, vc + 1))
            out[key] = _plain(value, path + (key,), tree)
        return out
    if isinstance(node, CommentedSeq):
        out_list = []
        for i, value in enumerate(node):
            line, col = node.lc.item(i)
            loc = Loc(tree.file, line + 1, col + 1)
            tree.positions[path + (i,)] = (loc, loc)
            out_list.append(_plain(value, path + (i,), tree))
        return out_list
    for kind in (bool, int, float, str):  # drop ruamel's Scalar* subclasses
        if isinstance(node, kind):
            return kind(node)
    return node


def _key_value_position(node: Any, key: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """0-based positions of a key and its value; a key brought in by a YAML merge
    (`<<: *anchor`) is found in the anchored mapping."""
    merged = list(getattr(node, "merge", None) or [])
    for mapping in [node, *(m[1] if isinstance(m, tuple) else m for m in merged)]:
        try:
            return mapping.lc.key(key), mapping.lc.value(key)
        except (AttributeError, KeyError, TypeError):
            continue
    return (node.lc.line, node.lc.col), (node.lc.line, node.lc.col)


_KEY_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def apply_overrides(tree: Tree, overrides: Sequence[str], problems: list[Problem]) -> None:
    """Apply `a.b=value` (value parsed as YAML) and `~a.b` (delete: back to the default).

    Problems are reported at file `<command line>`, line 1, column = 1-based index of
    the override.
    """
    from ruamel.yaml.error import YAMLError

    for index, text in enumerate(overrides, start=1):
        loc = Loc(COMMAND_LINE, 1, index)
        if text.startswith("~"):
            key, raw = text[1:].strip(), None
        elif "=" in text:
            key, raw = (s.strip() for s in text.split("=", 1))
        else:
            key, raw = "", None
        if not _KEY_PATH.match(key):
            message = f"expected an override 'key.path=value' or '~key.path', found {text!r}"
            problems.append(_problem("", message, loc))
            continue
        path = tuple(key.split("."))
        bad_path = override_path_problem(Recipe, path)
        if bad_path is not None:
            problems.append(_problem(key, f"override {text!r}: {bad_path}", loc))
            continue
        if raw is None:
            tree.delete(path)
            continue
        found: list[Problem] = []
        try:
            value = load_yaml_checked(raw, COMMAND_LINE, found, typ="safe", loc=loc) if raw else None
        except YAMLError as e:
            found.append(Problem("", str(getattr(e, "problem", None) or e)))
        if found:
            reasons = "; ".join(p.message for p in found)
            problems.append(_problem(key, f"override {text!r}: cannot parse {raw!r} as YAML ({reasons})", loc))
            continue
        for i in range(1, len(path)):  # make the enclosing mappings exist
            if not isinstance(tree.get(path[:i]), dict):
                tree.replace(path[:i], {}, {path[:i]: (loc, loc)})
        tree.replace(path, value, {p: (loc, loc) for p in _paths(value, path)})


def _paths(value: Any, path: YamlPath) -> list[YamlPath]:
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, path + (str(k),))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, path + (i,))
    return out


def _problem(path: YamlPath | str, message: str, loc: Loc) -> Problem:
    name = path if isinstance(path, str) else dotted(path)
    return Problem(name, message, loc.file, loc.line, loc.column)
