"""Reading the config's YAML without trusting it.

PyYAML's loaders build whatever a file describes: an anchor bomb expands to gigabytes, a
recursive alias builds a cycle. So only the node graph is composed (aliases stay shared
nodes: cheap), and values are built from it here, within bounds of size, depth and
expansion; duplicate keys are problems; every value's line is kept (for ``file:line:``);
and ``${VAR}`` in a string gives an ``Env`` that remembers what the file said, so that
no message shows the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

MAX_CHARS = 1024 * 1024  # a config of a thousand backends is ~200 KB
MAX_DEPTH = 32  # real configs nest 7 levels
MAX_VALUES = 50_000  # after alias expansion: a bomb stops here, within a fraction of a second

Path = tuple[str | int, ...]
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TAG = "tag:yaml.org,2002:"
_CONSTRUCT = {_TAG + t: f"construct_yaml_{t}" for t in ("null", "bool", "int", "float", "str")}
_CONSTRUCT[_TAG + "timestamp"] = "construct_yaml_str"  # `2025-01-01`: text, not a date
_REF_HEAD = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(\}|:-)")


class YamlRefused(Exception):
    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


class Env(str):
    """A string read through ``${VAR}``: messages show ``raw``, what the file says."""

    raw: str
    names: tuple[str, ...]  # every variable referred to, for "set X" hints
    unset: tuple[str, ...]  # those empty or unset


class Document:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.data: Any = {}
        self.lines: dict[Path, int] = {}
        self.problems: list[tuple[int | None, Path, str]] = []  # (line, place, message)
        self.constructor = yaml.constructor.SafeConstructor()

    def line_of(self, place: Path) -> int | None:
        """The line of ``place`` or of the nearest value around it."""
        ends = (place[:n] for n in range(len(place), -1, -1))
        return next((self.lines[end] for end in ends if end in self.lines), None)

    def build(self, node: yaml.Node, place: Path) -> Any:
        line = node.start_mark.line + 1
        self.lines.setdefault(place, line)
        if isinstance(node, yaml.SequenceNode) and node.tag == _TAG + "seq":
            return [self.build(item, (*place, i)) for i, item in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode) and node.tag == _TAG + "map":
            return self.mapping(node, place)
        if node.tag not in _CONSTRUCT:
            raise YamlRefused(line, f"unsupported tag {node.tag}")
        value = getattr(self.constructor, _CONSTRUCT[node.tag])(node)
        return self.interpolate(value, place, line) if "${" in node.value else value

    def mapping(self, node: yaml.MappingNode, place: Path) -> Any:
        result: dict[str, Any] = {}
        merged: list[dict[str, Any]] = []
        for key_node, value_node in node.value:
            key, line = key_node.value, key_node.start_mark.line + 1
            if key_node.tag == _TAG + "merge":  # `<<: *defaults`; keys written out win
                sources = self.build(value_node, place)
                merged += sources if isinstance(sources, list) else [sources]
            elif not isinstance(key_node, yaml.ScalarNode):
                raise YamlRefused(line, "a mapping key must be a plain value")
            elif key in result:
                message = f"duplicate key '{key}' (first at line {self.lines[(*place, key)]})"
                self.problems.append((line, (*place, key), message))
            else:
                self.lines[(*place, key)] = line
                result[key] = self.build(value_node, (*place, key))
        for source in merged:
            if not isinstance(source, dict):
                raise YamlRefused(node.start_mark.line + 1, "'<<' merges mappings only")
            result = {**source, **result}
        return result

    def interpolate(self, text: str, place: Path, line: int) -> str:
        """``${VAR}``, ``${VAR:-default}`` (a default may hold ``${OTHER}``), parsed in one
        pass: no marker in the text, so no byte of a value can be taken for one, and a
        variable's value is never expanded again."""
        names: list[str] = []
        try:
            expanded = _Expansion(text, self.environ, names).all()
        except _Malformed:
            message = f"malformed reference in {text!r}: expected ${{VAR}} or ${{VAR:-default}}"
            self.problems.append((line, place, message))
            return text
        result = Env(expanded)
        result.raw = text
        result.names = tuple(sorted(set(names), key=lambda name: text.index("${" + name)))
        result.unset = tuple(n for n in result.names if not self.environ.get(n))
        return result


class _Malformed(Exception):
    pass


class _Expansion:
    """A recursive-descent reading of one string's references, left to right."""

    def __init__(self, text: str, environ: Mapping[str, str], names: list[str]) -> None:
        self.text = text
        self.environ = environ
        self.names = names
        self.at = 0

    def all(self) -> str:
        out: list[str] = []
        while self.at < len(self.text):
            out.append(self._ref() if self.text.startswith("${", self.at) else self._char())
        return "".join(out)

    def _char(self) -> str:
        self.at += 1
        return self.text[self.at - 1]

    def _ref(self) -> str:
        head = _REF_HEAD.match(self.text, self.at)
        if head is None:
            raise _Malformed
        self.at = head.end()
        name = head[1]
        self.names.append(name)
        default = self._default() if head[2] == ":-" else ""
        return self.environ.get(name) or default

    def _default(self) -> str:
        out: list[str] = []
        while self.at < len(self.text):
            if self.text[self.at] == "}":
                self.at += 1
                return "".join(out)
            out.append(self._ref() if self.text.startswith("${", self.at) else self._char())
        raise _Malformed  # the text ended inside ${VAR:-...


def read_yaml(text: str, environ: Mapping[str, str]) -> Document:
    if len(text) > MAX_CHARS:
        raise YamlRefused(None, f"file too large: over {MAX_CHARS // 1024} KiB")
    doc = Document(environ)
    try:
        node = yaml.compose(text, Loader=_Loader)  # one document, aliases not expanded
    except (yaml.YAMLError, RecursionError) as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or ("nested too deep" if mark is None else exc)
        raise YamlRefused(mark.line + 1 if mark else None, f"invalid YAML: {problem}") from None
    if node is not None:
        _size(node, {}, frozenset())
        doc.data = doc.build(node, ())
    return doc


def _size(node: yaml.Node, sizes: dict[int, int], inside: frozenset[int]) -> int:
    """Values under ``node`` once aliases are expanded; each shared node counted only once."""
    line = node.start_mark.line + 1
    if id(node) in inside:
        raise YamlRefused(line, "an alias refers to a value that contains it")
    if len(inside) >= MAX_DEPTH:
        raise YamlRefused(line, f"nested deeper than {MAX_DEPTH} levels")
    if id(node) not in sizes:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        children = (
            [n for pair in node.value for n in pair]
            if isinstance(node, yaml.MappingNode)
            else children
        )
        sizes[id(node)] = 1 + sum(_size(child, sizes, inside | {id(node)}) for child in children)
        if sizes[id(node)] > MAX_VALUES:
            raise YamlRefused(line, f"more than {MAX_VALUES} values once aliases are expanded")
    return sizes[id(node)]
