"""Read a config file (YAML, JSON, or a key of a Helm values file) into plain data plus source positions.

The YAML node graph is walked by hand, rather than constructed in one go, so that
every value keeps the line and column it came from: errors can then point at the
file. `!list` and `!range` tags become the plain knob forms `{"$list": ...}` and
`{"$range": ...}`.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from finetune.config.knobs import LIST_KEY, RANGE_KEY, Path, dotted

CORE = "tag:yaml.org,2002:"
MERGE_TAG = f"{CORE}merge"
VALUE_TAG = f"{CORE}value"  # what a plain `=` resolves to: read as the string "="
# The YAML tags a config may hold, by kind of node: the core schema's, and the knob tags !list and !range.
# Any other tag (!!python/..., !!binary, !!set, a custom !foo) is refused wherever it is, never ignored.
CORE_TAGS: dict[type, frozenset[str]] = {
    ScalarNode: frozenset(f"{CORE}{name}" for name in ("str", "int", "float", "bool", "null", "timestamp")),
    SequenceNode: frozenset({f"{CORE}seq"}),
    MappingNode: frozenset({f"{CORE}map"}),
}


class ConfigLoadError(Exception):
    """The config cannot be read at all (missing file, not YAML, bad --set): an unusable call."""


@dataclass(frozen=True)
class Location:
    source: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        return f"{self.source}:{self.line}:{self.column}" if self.line else self.source


@dataclass
class SourceDoc:
    """A loaded config: the plain data tree and where each path came from."""

    tree: Any
    source: str
    positions: dict[Path, Location] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)  # legacy keys read under their new names

    def locate(self, path: Path) -> Location:
        """The position of `path`, or of its nearest ancestor that exists in the file."""
        for end in range(len(path), -1, -1):
            location = self.positions.get(tuple(path[:end]))
            if location is not None:
                return location
        return Location(self.source)


# Limits that keep a small hostile file (a YAML alias bomb, a deeply nested document) from
# exhausting the machine: far above any real config.
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
MAX_VALUES = 20_000
MAX_DEPTH = 64


def tag_name(tag: str) -> str:
    """`tag:yaml.org,2002:python/object/apply:os.system` -> `!!python/object/apply:os.system`."""
    return "!!" + tag.removeprefix(CORE) if tag.startswith(CORE) else tag


class _NodeReader:
    def __init__(self, source: str, base: Path = ()) -> None:
        self.source = source
        self.base = base
        self.positions: dict[Path, Location] = {}
        self._constructor = YAML(typ="safe", pure=True).constructor
        self._values = 0

    def at(self, node: Node) -> Location:
        return Location(self.source, node.start_mark.line + 1, node.start_mark.column + 1)

    def fail(self, node: Node, message: str) -> ConfigLoadError:
        return ConfigLoadError(f"{self.at(node)}: {message}")

    def check_tag(self, node: Node, path: Path) -> None:
        """Refuse a tag the config language does not have, naming the file position and the key path."""
        if node.tag in CORE_TAGS[type(node)] or (node.tag == VALUE_TAG and isinstance(node, ScalarNode)):
            return
        kind = {ScalarNode: "a value", SequenceNode: "a sequence", MappingNode: "a mapping"}[type(node)]
        raise self.fail(node, f"{dotted((*self.base, *path))}: unknown YAML tag {tag_name(node.tag)} on {kind}; "
                              "the tags a config may use are !list and !range (and the plain YAML types)")

    def read(self, node: Node, path: Path) -> Any:
        self._values += 1
        if self._values > MAX_VALUES:
            raise self.fail(node, f"the document expands to more than {MAX_VALUES} values (through YAML aliases?); "
                                  "a config is far smaller, so it is refused")
        if len(path) > MAX_DEPTH:
            raise self.fail(node, f"values are nested more than {MAX_DEPTH} levels deep; a config is far shallower")
        self.positions[path] = self.at(node)
        if node.tag == "!list":
            if not isinstance(node, SequenceNode):
                raise self.fail(node, "!list takes a sequence, e.g. !list [8, 16, 32]")
            self.positions[(*path, LIST_KEY)] = self.at(node)
            return {LIST_KEY: self._sequence(node, (*path, LIST_KEY))}
        if node.tag == "!range":
            if not isinstance(node, MappingNode):
                raise self.fail(node, "!range takes a mapping, e.g. !range {start: 1e-5, end: 1e-3, log: true}")
            self.positions[(*path, RANGE_KEY)] = self.at(node)
            return {RANGE_KEY: self._mapping(node, (*path, RANGE_KEY))}
        self.check_tag(node, path)
        if isinstance(node, MappingNode):
            return self._mapping(node, path)
        if isinstance(node, SequenceNode):
            return self._sequence(node, path)
        return self._scalar(node)

    def _scalar(self, node: ScalarNode) -> Any:
        if node.tag == VALUE_TAG:
            return node.value
        try:
            value = self._constructor.construct_object(node, deep=True)
        except (YAMLError, ValueError, OverflowError) as error:  # a date like 0000-00-00 is a ValueError
            raise self.fail(node, f"cannot read this value: {error}") from None
        if isinstance(value, str) and any("\ud800" <= char <= "\udfff" for char in value):
            raise self.fail(node, "this text holds a lone surrogate (an escape such as \\ud800), which is not Unicode text")
        return value

    def _sequence(self, node: SequenceNode, path: Path) -> list[Any]:
        return [self.read(child, (*path, index)) for index, child in enumerate(node.value)]

    def _mapping(self, node: MappingNode, path: Path) -> dict[str, Any]:
        result: dict[str, Any] = {}
        explicit: set[Any] = set()
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                self._merge(result, explicit, value_node, path)
                continue
            self.check_tag(key_node, path)
            if not isinstance(key_node, ScalarNode):
                raise self.fail(key_node, f"{dotted((*self.base, *path))}: mapping keys must be plain scalars")
            key = self._scalar(key_node)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise self.fail(key_node, f"{dotted((*self.base, *path))}: mapping keys must be plain scalars")
            key = str(key) if not isinstance(key, str) else key
            if key in explicit:
                raise self.fail(key_node, f"duplicate key '{key}'")
            explicit.add(key)
            self.positions[(*path, key)] = self.at(key_node)
            result[key] = self.read(value_node, (*path, key))
            self.positions[(*path, key)] = self.at(key_node)
        return result

    def _merge(self, result: dict[str, Any], explicit: set[Any], node: Node, path: Path) -> None:
        if isinstance(node, SequenceNode):
            self.check_tag(node, path)
        sources = node.value if isinstance(node, SequenceNode) else [node]
        for source in sources:
            if not isinstance(source, MappingNode):
                raise self.fail(source, "a merge key '<<' takes a mapping or a list of mappings")
            self.check_tag(source, path)
            for key, value in self._mapping(source, path).items():
                if key not in explicit and key not in result:
                    result[key] = value


def parse_yaml_text(text: str, source: str, base: Path = ()) -> SourceDoc:
    """YAML (or JSON) text to a tree with positions, within the limits above.

    `base` is where the text goes in a config (a `--set` value): errors name their key path from there.
    """
    if len(text) > MAX_DOCUMENT_BYTES:
        raise ConfigLoadError(f"{source}: {len(text)} characters is over the limit of {MAX_DOCUMENT_BYTES} for a config")
    if _flow_depth(text) > MAX_DEPTH:
        raise ConfigLoadError(f"{source}: brackets are nested more than {MAX_DEPTH} levels deep; a config is far shallower")
    yaml = YAML(typ="safe", pure=True)
    try:
        nodes = list(yaml.compose_all(text))
    except MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigLoadError(f"{where}: not valid YAML: {error.problem}") from None
    except YAMLError as error:
        raise ConfigLoadError(f"{source}: not valid YAML: {error}") from None
    except RecursionError:
        raise ConfigLoadError(f"{source}: values are nested too deeply to read; a config is far shallower") from None
    if len(nodes) != 1 or nodes[0] is None:
        raise ConfigLoadError(f"{source}: expected exactly one YAML document, found {len(nodes)}")
    reader = _NodeReader(source, base)
    tree = reader.read(nodes[0], ())
    return SourceDoc(tree=tree, source=source, positions=reader.positions)


def _flow_depth(text: str) -> int:
    """The deepest nesting of [ ] and { } outside quotes and comments, found in one pass.

    The YAML scanner slows down badly on thousands of nested brackets, so they are refused first.
    """
    depth = deepest = 0
    quote = None
    comment = False
    for char in text:
        if comment:
            comment = char != "\n"
        elif quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#":
            comment = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest


def load_document(
    path: str | FilePath, values_key: str | None = None, overrides: list[str] | None = None
) -> SourceDoc:
    """Load a config file, pick `values_key` out of a Helm values file, apply `--set` overrides."""
    file_path = FilePath(path)
    if not file_path.is_file():
        raise ConfigLoadError(f"{file_path}: no such file")
    if file_path.stat().st_size > MAX_DOCUMENT_BYTES:
        raise ConfigLoadError(f"{file_path}: {file_path.stat().st_size} bytes is over the limit of {MAX_DOCUMENT_BYTES} for a config")
    try:
        text = file_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigLoadError(f"{file_path}: cannot read: {error}") from None
    doc = parse_yaml_text(text, str(file_path))
    if values_key:
        doc = select_key(doc, values_key)
    if not isinstance(doc.tree, dict):
        raise ConfigLoadError(f"{doc.locate(())}: a config must be a mapping of sections, got {type(doc.tree).__name__}")
    for override in overrides or []:
        apply_override(doc, override)
    translate_legacy_keys(doc)
    return doc


def translate_legacy_keys(doc: SourceDoc) -> None:
    """Keys of older transformers/TRL and SiloGen read under their new names (`finetune.config.compat`)."""
    from finetune.config.compat import translate_document

    for translation in translate_document(doc.tree):
        doc.notices.append(f"{doc.locate(translation.old)}: {translation.notice}")
        for known in [path for path in doc.positions if path[: len(translation.old)] == translation.old]:
            location = doc.positions.pop(known)
            if translation.new is not None:
                doc.positions[(*translation.new, *known[len(translation.old) :])] = location


def select_key(doc: SourceDoc, values_key: str) -> SourceDoc:
    prefix = tuple(values_key.split("."))
    node = doc.tree
    for depth, key in enumerate(prefix):
        if not isinstance(node, dict) or key not in node:
            here = list(node) if isinstance(node, dict) else []
            raise ConfigLoadError(
                f"{doc.source}: no key '{'.'.join(prefix[: depth + 1])}' in the values file"
                + (f" (keys there: {', '.join(map(str, here))})" if here else "")
            )
        parent, node = node, node[key]
    positions = {path[len(prefix) :]: loc for path, loc in doc.positions.items() if path[: len(prefix)] == prefix}
    selected = SourceDoc(tree=node, source=doc.source, positions=positions)
    defaults_key = f"{prefix[-1]}Defaults"
    if isinstance(parent.get(defaults_key), dict) and isinstance(node, dict):
        _fill_union_sections(selected, parent[defaults_key], doc.positions, (*prefix[:-1], defaults_key))
    return selected


# Where each section that comes in kinds lives in a config, for the chart's `finetuningDefaults`.
UNION_SECTION_PATHS: dict[str, Path] = {"validation_data": ("data_conf", "validation_data"), "peft_conf": ("peft_conf",),
                                        "quant_conf": ("quant_conf",)}


def _fill_union_sections(doc: SourceDoc, defaults: dict[str, Any], positions: dict[Path, Location], defaults_path: Path) -> None:
    """As the chart's template does: a section from `<key>Defaults` only where the config has none."""
    for name, path in UNION_SECTION_PATHS.items():
        node = doc.tree
        for part in path[:-1]:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if name not in defaults or not isinstance(node, dict) or path[-1] in node:
            continue
        node[path[-1]] = copy.deepcopy(defaults[name])
        source = (*defaults_path, name)
        for known, location in positions.items():
            if known[: len(source)] == source:
                doc.positions[(*path, *known[len(source) :])] = location


def parse_override(override: str) -> tuple[Path, Any]:
    """`a.b.0.c=value` -> (('a', 'b', 0, 'c'), value parsed as YAML, knob tags allowed)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigLoadError(f"--set {override!r}: expected KEY=VALUE, e.g. training_args.learning_rate=1e-4")
    parts = key.strip().split(".")
    if any(part.isnumeric() and not (part.isascii() and part.isdecimal()) for part in parts):  # '١', '²', '½'
        raise ConfigLoadError(f"--set {key.strip()!r}: a list index is written in ASCII digits (0, 1, ...)")
    path: Path = tuple(int(part) if part.isascii() and part.isdecimal() else part for part in parts)
    value = parse_yaml_text(raw, f"--set {key}", path).tree if raw.strip() else ""
    return path, value


def apply_override(doc: SourceDoc, override: str) -> None:
    path, value = parse_override(override)
    node = doc.tree
    for depth, part in enumerate(path):
        if isinstance(node, list) and not (isinstance(part, int) and part < len(node)):
            where = dotted(path[:depth])
            raise ConfigLoadError(f"--set {dotted(path)}: index {part} is outside the list {where} ({len(node)} item(s))")
        if depth == len(path) - 1:
            break
        child = node[part] if _has(node, part) else None
        if child is None:
            node[part] = child = {}
            doc.positions[path[: depth + 1]] = Location(f"--set {dotted(path)}")  # a key the file lacks: the --set made it
        elif not isinstance(child, (dict, list)):
            raise ConfigLoadError(f"--set {dotted(path)}: {dotted(path[: depth + 1])} is {child!r}, not a mapping")
        node = child
    node[path[-1]] = value
    for known in [p for p in doc.positions if p[: len(path)] == path]:
        del doc.positions[known]
    doc.positions[path] = Location(f"--set {dotted(path)}")


def _has(node: Any, part: Any) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and part < len(node)
