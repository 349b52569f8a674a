"""Reading the config's YAML without trusting it.

PyYAML's loaders build whatever a file describes: an anchor bomb expands to gigabytes, a
recursive alias builds a cycle, deep nesting exhausts the stack. So the tree is built here
from the parser's events, within bounds of size, depth and alias expansion; duplicate keys
are problems; every value's line is kept (for ``file:line:``); and ``${VAR}`` in a string
becomes an ``Env`` that remembers what the file said, so no message shows the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

MAX_CHARS = 1024 * 1024  # a config of a thousand backends is ~200 KB
MAX_DEPTH = 32  # real configs nest 7 levels
MAX_VALUES = 100_000  # after alias expansion: a bomb stops here within milliseconds

Path = tuple[str | int, ...]
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TAG = "tag:yaml.org,2002:"
_SCALARS = {_TAG + t for t in ("null", "bool", "int", "float", "str")}
_COLLECTIONS = {None, "!", _TAG + "seq", _TAG + "map"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
    def __init__(self) -> None:
        self.data: Any = {}
        self.lines: dict[Path, int] = {}
        self.problems: list[tuple[int | None, Path, str]] = []  # (line, place, message)

    def line_of(self, place: Path) -> int | None:
        """The line of ``place`` or of the nearest value around it."""
        ends = (place[:n] for n in range(len(place), -1, -1))
        return next((self.lines[end] for end in ends if end in self.lines), None)


def read_yaml(text: str, environ: Mapping[str, str]) -> Document:
    if len(text) > MAX_CHARS:
        raise YamlRefused(None, f"file too large: over {MAX_CHARS // 1024} KiB")
    loader = _Loader(text)
    try:
        return _Builder(loader, environ).document()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlRefused(mark.line + 1 if mark else None, f"invalid YAML: {problem}") from None
    finally:
        loader.dispose()


class _Builder:
    def __init__(self, loader: yaml.SafeLoader, environ: Mapping[str, str]) -> None:
        self.loader, self.environ, self.doc = loader, environ, Document()
        self.anchors: dict[str, tuple[Any, int]] = {}  # name -> (value, values inside)
        self.open: set[str] = set()  # anchors whose value is still being read
        self.count = 0

    def document(self) -> Document:
        self.loader.get_event()  # stream start
        if not self.loader.check_event(yaml.StreamEndEvent):
            self.loader.get_event()  # document start
            self.doc.data = self.value((), 0)
            self.loader.get_event()  # document end
            if not self.loader.check_event(yaml.StreamEndEvent):
                line = self.loader.peek_event().start_mark.line + 1
                raise YamlRefused(line, "expected one YAML document, found more")
        return self.doc

    def value(self, place: Path, depth: int) -> Any:
        event = self.loader.get_event()
        line = event.start_mark.line + 1
        self.doc.lines.setdefault(place, line)
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.open:
                raise YamlRefused(line, f"recursive alias *{event.anchor}")
            if event.anchor not in self.anchors:
                raise YamlRefused(line, f"unknown alias *{event.anchor}")
            result, size = self.anchors[event.anchor]
            self.counted(size, line)  # shared, not copied: but whoever walks it walks it all
            return result
        if depth > MAX_DEPTH:
            raise YamlRefused(line, f"nested deeper than {MAX_DEPTH} levels")
        if not isinstance(event, yaml.ScalarEvent) and event.tag not in _COLLECTIONS:
            raise YamlRefused(line, f"unsupported tag {event.tag}")
        anchor, before = event.anchor, self.count
        self.open.add(anchor)
        if isinstance(event, yaml.ScalarEvent):
            result = self.scalar(event, place, line)
        elif isinstance(event, yaml.SequenceStartEvent):
            result = []
            while not self.loader.check_event(yaml.SequenceEndEvent):
                result.append(self.value((*place, len(result)), depth + 1))
            self.loader.get_event()
        else:
            result = self.mapping(place, depth)
        self.counted(1, line)
        self.open.discard(anchor)
        if anchor:
            self.anchors[anchor] = (result, self.count - before)
        return result

    def counted(self, values: int, line: int) -> None:
        self.count += values
        if self.count > MAX_VALUES:
            raise YamlRefused(line, f"more than {MAX_VALUES} values once aliases are expanded")

    def scalar(self, event: yaml.ScalarEvent, place: Path, line: int) -> Any:
        tag = event.tag
        if tag in (None, "!"):
            tag = self.loader.resolve(yaml.ScalarNode, event.value, event.implicit)
        tag = _TAG + "str" if tag == _TAG + "timestamp" else tag  # `2025-01-01`: text, not a date
        if tag not in _SCALARS:
            raise YamlRefused(line, f"unsupported tag {tag}")
        node = yaml.ScalarNode(tag, event.value, style=event.style)
        value = self.loader.yaml_constructors[tag](self.loader, node)
        return self.interpolate(value, place, line) if "${" in event.value else value

    def mapping(self, place: Path, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        merged: list[tuple[Any, int]] = []
        while not self.loader.check_event(yaml.MappingEndEvent):
            event = self.loader.get_event()
            key, line = getattr(event, "value", None), event.start_mark.line + 1
            if not isinstance(event, yaml.ScalarEvent) or not isinstance(key, str):
                raise YamlRefused(line, "a mapping key must be a plain value")
            if key == "<<" and event.implicit[0]:  # merge key: `<<: *defaults`
                merged.append((self.value(place, depth + 1), line))
            elif key in result:
                first = self.doc.lines[(*place, key)]
                message = f"duplicate key '{key}' (first at line {first})"
                self.doc.problems.append((line, (*place, key), message))
                self.value((*place, key, "(duplicate)"), depth + 1)
            else:
                self.doc.lines[(*place, key)] = line
                result[key] = self.value((*place, key), depth + 1)
        self.loader.get_event()
        for source, line in merged:  # keys written out win over merged ones
            for part in source if isinstance(source, list) else [source]:
                if not isinstance(part, dict):
                    raise YamlRefused(line, "'<<' merges mappings only")
                result = {**part, **result}
        return result

    def interpolate(self, text: str, place: Path, line: int) -> str:
        names: list[str] = []
        try:
            result = Env(_expand(text, 0, self.environ, names, nested=False)[0])
        except ValueError:
            message = f"malformed reference in {text!r}: expected ${{VAR}} or ${{VAR:-default}}"
            self.doc.problems.append((line, place, message))
            return text
        result.raw, result.names = text, tuple(dict.fromkeys(names))
        result.unset = tuple(n for n in result.names if not self.environ.get(n))
        return result


def _expand(
    text: str, i: int, environ: Mapping[str, str], names: list[str], *, nested: bool
) -> tuple[str, int]:
    """``text[i:]`` with references replaced; nested: up to the ``}`` that closes a default."""
    out: list[str] = []
    while i < len(text):
        if text.startswith("${", i):
            if not (match := _NAME.match(text, i + 2)):
                raise ValueError(text)
            names.append(match[0])
            value, i = environ.get(match[0], ""), match.end()
            if text.startswith(":-", i):  # the default may itself hold ${OTHER}
                default, i = _expand(text, i + 2, environ, names, nested=True)
                value = value or default
            elif text.startswith("}", i):
                i += 1
            else:
                raise ValueError(text)
            out.append(value)
        elif nested and text[i] == "}":
            return "".join(out), i + 1
        else:
            out.append(text[i])
            i += 1
    if nested:
        raise ValueError(text)  # a default never closed
    return "".join(out), i
