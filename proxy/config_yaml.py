"""Reading the config's YAML without trusting it.

PyYAML's loaders build whatever the file describes: an anchor bomb ("billion laughs")
expands to gigabytes, a recursive alias builds a cycle the validator then walks forever,
and a deep nesting exhausts the stack. So this module builds the tree itself from the
parser's event stream, with bounds on size, depth and alias expansion, refuses
duplicate keys, keeps the line of every value (for ``file:line:`` in messages) and
expands ``${VAR}`` / ``${VAR:-default}`` in string values, remembering what the file
said so that no message ever shows a value taken from the environment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

MAX_CHARS = 1024 * 1024  # a config of a thousand backends is ~200 KB
MAX_DEPTH = 32  # the deepest real config is 7 levels
MAX_VALUES = 100_000  # values after alias expansion: a bomb stops here in milliseconds

Path = tuple[str | int, ...]

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_SCALAR_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "str")}
_COLLECTION_TAGS = {None, "!", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class YamlRefused(Exception):
    """The file cannot be read at all; ``line`` is 1-based."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class Env(str):
    """A string read through ``${VAR}``: messages show ``raw`` (what the file says), never it."""

    raw: str
    names: tuple[str, ...]  # every variable referred to, for "set X" hints
    unset: tuple[str, ...]  # those empty or unset in the environment


@dataclass
class Document:
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    problems: list[tuple[int, Path, str]] = field(default_factory=list)  # (line, place, message)

    def line_of(self, place: Path) -> int | None:
        """The line of ``place`` or of its nearest enclosing value."""
        for end in range(len(place), -1, -1):
            if place[:end] in self.lines:
                return self.lines[place[:end]]
        return None


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
        self.loader = loader
        self.environ = environ
        self.doc = Document(data=None)
        self.anchors: dict[str, tuple[Any, int]] = {}  # name -> (value, values inside it)
        self.open: set[str] = set()  # anchors whose value is still being read
        self.count = 0

    def document(self) -> Document:
        self.expect(yaml.StreamStartEvent)
        if self.loader.check_event(yaml.StreamEndEvent):
            self.doc.data = {}
            return self.doc
        self.expect(yaml.DocumentStartEvent)
        self.doc.data = self.value((), 0)
        self.expect(yaml.DocumentEndEvent)
        if not self.loader.check_event(yaml.StreamEndEvent):
            raise YamlRefused(self.line(), "expected one YAML document, found more")
        return self.doc

    def expect(self, kind: type[yaml.Event]) -> yaml.Event:
        event = self.loader.get_event()
        if not isinstance(event, kind):  # the parser guarantees the order; be sure anyway
            raise YamlRefused(event.start_mark.line + 1, "unexpected YAML structure")
        return event

    def line(self) -> int:
        return int(self.loader.peek_event().start_mark.line) + 1

    def value(self, place: Path, depth: int) -> Any:
        event = self.loader.get_event()
        line = event.start_mark.line + 1
        self.doc.lines.setdefault(place, line)
        if isinstance(event, yaml.AliasEvent):
            return self.alias(event.anchor, line)
        if depth > MAX_DEPTH:
            raise YamlRefused(line, f"nested deeper than {MAX_DEPTH} levels")
        anchor, before = event.anchor, self.count
        if anchor:
            self.open.add(anchor)
        if isinstance(event, yaml.ScalarEvent):
            result = self.scalar(event, place, line)
        elif event.tag not in _COLLECTION_TAGS:
            raise YamlRefused(line, f"unsupported tag {event.tag}")
        elif isinstance(event, yaml.SequenceStartEvent):
            result = self.sequence(place, depth)
        else:
            result = self.mapping(place, depth)
        self.counted(1, line)
        if anchor:
            self.open.discard(anchor)
            self.anchors[anchor] = (result, self.count - before)
        return result

    def counted(self, values: int, line: int) -> None:
        self.count += values
        if self.count > MAX_VALUES:
            raise YamlRefused(line, f"more than {MAX_VALUES} values once aliases are expanded")

    def alias(self, name: str, line: int) -> Any:
        if name in self.open:
            raise YamlRefused(line, f"recursive alias *{name}")
        if name not in self.anchors:
            raise YamlRefused(line, f"unknown alias *{name}")
        result, size = self.anchors[name]
        self.counted(size, line)  # shared, not copied: but whoever walks it walks it whole
        return result

    def scalar(self, event: yaml.ScalarEvent, place: Path, line: int) -> Any:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.loader.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == "tag:yaml.org,2002:timestamp":  # `2025-01-01`: a model id, not a date
            tag = "tag:yaml.org,2002:str"
        if tag not in _SCALAR_TAGS:
            raise YamlRefused(line, f"unsupported tag {tag}")
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        value = self.loader.yaml_constructors[tag](self.loader, node)
        if isinstance(value, str) and "${" in value:
            return self.interpolate(value, place, line)
        return value

    def sequence(self, place: Path, depth: int) -> list[Any]:
        items: list[Any] = []
        while not self.loader.check_event(yaml.SequenceEndEvent):
            items.append(self.value((*place, len(items)), depth + 1))
        self.loader.get_event()
        return items

    def mapping(self, place: Path, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        merged: list[tuple[Any, int]] = []
        while not self.loader.check_event(yaml.MappingEndEvent):
            event = self.loader.get_event()
            line = event.start_mark.line + 1
            if not isinstance(event, yaml.ScalarEvent):
                raise YamlRefused(line, "a mapping key must be a plain value")
            key = event.value
            if key == "<<" and event.implicit[0]:  # merge key: `<<: *defaults`
                merged.append((self.value(place, depth + 1), line))
                continue
            if key in result:
                first = self.doc.lines[(*place, key)]
                message = f"duplicate key '{key}' (first at line {first})"
                self.doc.problems.append((line, (*place, key), message))
                self.value((*place, key, "(duplicate)"), depth + 1)
                continue
            self.doc.lines[(*place, key)] = line
            result[key] = self.value((*place, key), depth + 1)
        self.loader.get_event()
        for source, line in merged:  # keys written out win over merged ones
            for part in source if isinstance(source, list) else [source]:
                if not isinstance(part, dict):
                    raise YamlRefused(line, "'<<' merges mappings only")
                for key, value in part.items():
                    result.setdefault(key, value)
        return result

    def interpolate(self, text: str, place: Path, line: int) -> str:
        names: list[str] = []
        try:
            value = _expand(text, 0, self.environ, names, nested=False)[0]
        except ValueError:
            message = f"malformed ${{VAR}} reference in {text!r} (expected ${{VAR}} or ${{VAR:-default}})"
            self.doc.problems.append((line, place, message))
            return text
        result = Env(value)
        result.raw = text
        result.names = tuple(dict.fromkeys(names))
        result.unset = tuple(n for n in result.names if not self.environ.get(n))
        return result


def _expand(
    text: str, i: int, environ: Mapping[str, str], names: list[str], *, nested: bool
) -> tuple[str, int]:
    """``text[i:]`` with references replaced; nested: stop after the ``}`` closing a default."""
    out: list[str] = []
    while i < len(text):
        if text.startswith("${", i):
            match = _NAME.match(text, i + 2)
            if not match:
                raise ValueError(text)
            name, i = match[0], match.end()
            names.append(name)
            value = environ.get(name, "")
            if text.startswith("}", i):
                i += 1
            elif text.startswith(":-", i):  # the default may itself hold ${OTHER}
                default, i = _expand(text, i + 2, environ, names, nested=True)
                value = value or default
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
