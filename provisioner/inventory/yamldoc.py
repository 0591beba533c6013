"""YAML with positions, and surgical edits that change only a scalar's own characters.

The only ruamel.yaml user besides the inventory loader. Files are composed (not constructed)
so that every scalar keeps its exact span in the original text; an edit splices new text
into that span and leaves comments, quoting, indentation and line endings untouched.
The C parser (libyaml) is used for speed; a file it rejects is retried with ruamel's
YAML 1.2 parser, which accepts ``:`` inside plain scalars in flow mappings.

Every file is untrusted input (anyone who can edit the inventory writes it), so a file is
refused, with file:line, when it is larger than :data:`MAX_FILE_BYTES`, nests collections
deeper than :data:`MAX_DEPTH` (checked before the C composer, which recurses in C and crashes
on deep input), or holds more than :data:`MAX_VALUES` values, counted before composing and
again with its aliases expanded (a few hundred bytes of nested anchors would otherwise expand
to billions of values).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
)
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.resolver import VersionedResolver
from ruamel.yaml.scanner import Scanner
from ruamel.yaml.tag import Tag

from provisioner.errors import InventoryError, YamlEditError
from provisioner.inventory.schema import join_pointer

_TAG_PREFIX = "tag:yaml.org,2002:"
_KEY_CONTROL = re.compile("[\x00-\x1f\x7f]")

#: The largest YAML file read (composing takes about 30 bytes of memory per byte of YAML).
MAX_FILE_BYTES = 16 * 1024 * 1024
#: The deepest nesting of mappings and sequences; an inventory needs about six levels.
MAX_DEPTH = 64
#: The most values (scalars, keys included, and collections) a file may hold, with every
#: alias counted as what it repeats: reading that many takes about 5 s and 0.5 GiB, and a
#: 10,000-user file holds about 150,000.
MAX_VALUES = 1_000_000


def _composer_safe() -> int:
    """How many nested collections ruamel's C composer survives, with a wide margin.

    libyaml's parser keeps its own stack, but the composer recurses in C, about 300 bytes of
    stack per level (it crashed past 26,000 levels with 8 MiB).
    """
    try:
        import resource
    except ImportError:  # Windows: the main thread has 1 to 2 MiB of stack
        return 1_000
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    return min(5_000, stack // 1024) if stack > 0 else 5_000


# Below this many collection starts, whatever they are, the C composer cannot go deep enough
# to crash; above, the depth is measured with the parser alone first.
_COMPOSER_SAFE = _composer_safe()
# Every nested block collection starts further right than its parent, or (a sequence under a
# key) one level later: when no line starts with this many units of indentation, "-", "?",
# ":" or &anchor/!tag (a "--- " too), a file holds at most 2 * _BLOCK_PREFIX levels of block
# nesting. YAML breaks lines at CR, LF, NEL, LS and PS.
_BLOCK_PREFIX = 200
_PREFIX_UNITS = r"(?:[ \t\-?:]|[&!][^ \t\r\n\x85\u2028\u2029]*+){" + str(_BLOCK_PREFIX) + "}"
_DEEP_FIRST_LINE = re.compile(_PREFIX_UNITS)
_DEEP_LINE_LF = re.compile("\n" + _PREFIX_UNITS)  # a literal first character: a fast scan
_DEEP_LINE_ANY = re.compile("[\r\n\x85\u2028\u2029]" + _PREFIX_UNITS)


@dataclass(frozen=True)
class ScalarRef:
    """A scalar leaf: its JSON-Pointer segments, value and exact place in the text."""

    segments: tuple[str, ...]
    value: str
    kind: str
    start: int
    end: int
    line: int
    column: int
    style: str
    anchored: bool
    aliased: bool
    tagged: bool
    in_flow: bool
    key_end: int

    @property
    def pointer(self) -> str:
        """The RFC 6901 path of this value."""
        return join_pointer(self.segments)


@dataclass(frozen=True)
class MappingRef:
    """A mapping and, for each key, the column and line of the key and whether it is flow."""

    segments: tuple[str, ...]
    flow: bool
    key_column: int
    single_line_keys: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Problem:
    """Something a loader must report: duplicate keys, bad key types, merge keys."""

    message: str
    line: int
    column: int
    segments: tuple[str, ...]


@dataclass(frozen=True)
class YamlText:
    """A composed YAML document: its text, scalar leaves, mappings and structural problems."""

    source: str
    text: str
    scalars: tuple[ScalarRef, ...]
    mappings: tuple[MappingRef, ...]
    problems: tuple[Problem, ...]

    @cached_property
    def _scalar_index(self) -> dict[tuple[str, ...], ScalarRef]:
        index: dict[tuple[str, ...], ScalarRef] = {}
        for ref in self.scalars:
            index.setdefault(ref.segments, ref)
        return index

    @cached_property
    def _mapping_index(self) -> dict[tuple[str, ...], MappingRef]:
        index: dict[tuple[str, ...], MappingRef] = {}
        for ref in self.mappings:
            index.setdefault(ref.segments, ref)
        return index

    def scalar(self, segments: tuple[str, ...]) -> ScalarRef | None:
        """The scalar at exactly these segments, if any."""
        return self._scalar_index.get(segments)

    def mapping(self, segments: tuple[str, ...]) -> MappingRef | None:
        """The mapping at exactly these segments, if any."""
        return self._mapping_index.get(segments)

    def has_prefix(self, segments: tuple[str, ...]) -> bool:
        """True when any value stands at or below ``segments``."""
        n = len(segments)
        return any(ref.segments[:n] == segments for ref in self.scalars) or any(
            ref.segments[:n] == segments for ref in self.mappings
        )


class _CachingResolver(VersionedResolver):
    """The YAML 1.2 resolver, with its per-scalar work cut to what an inventory needs.

    ruamel looks the YAML version up (through a failing attribute access under the C parser)
    and builds a new Tag object for every scalar; for large inventories that cost more than
    parsing. The version lookup is done once per document, and tags are shared objects.
    """

    _shared_tags: ClassVar[dict[str, Tag]] = {}

    @property
    def versioned_resolver(self) -> Any:
        cached = self.__dict__.get("_versioned")
        if cached is None:
            cached = VersionedResolver.versioned_resolver.fget(self)  # type: ignore[attr-defined]
            self.__dict__["_versioned"] = cached
        return cached

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is not ScalarNode or self.yaml_path_resolvers:
            return super().resolve(kind, value, implicit)
        if implicit[0]:
            first = value[:1]
            by_first: dict[str, list[tuple[Tag, Any]]] = self.__dict__.setdefault("_by_first", {})
            candidates = by_first.get(first)
            if candidates is None:
                candidates = by_first[first] = self._candidates(first)
            for tag, regexp in candidates:
                if regexp.match(value):
                    return tag
        return self.DEFAULT_SCALAR_TAG

    def _candidates(self, first: str) -> list[tuple[Tag, Any]]:
        """The implicit resolvers for scalars starting with ``first``, with shared tags."""
        table = self.versioned_resolver
        candidates = []
        for tag, regexp in (*table.get(first, ()), *table.get(None, ())):
            shared = self._shared_tags.setdefault(tag, Tag(suffix=tag))
            candidates.append((shared, regexp))
        return candidates


def _fast_yaml() -> YAML:
    yaml = YAML(typ="safe", pure=False)
    yaml.Resolver = _CachingResolver
    return yaml


class _ShallowScanner(Scanner):
    """ruamel's pure scanner, stopped past MAX_DEPTH flow levels.

    Its simple-key bookkeeping visits every open flow level for each token, so thousands of
    nested ``[`` took seconds before the composer's recursion limit was even reached.
    """

    def fetch_flow_collection_start(self, TokenClass: Any, to_push: str) -> None:
        if len(self.flow_context) >= MAX_DEPTH:
            mark = self.reader.get_mark()
            raise _TooDeep(mark.line + 1, mark.column + 1)
        super().fetch_flow_collection_start(TokenClass, to_push)


def _pure_yaml() -> YAML:
    """ruamel's YAML 1.2 parser (pure Python): slower, but it accepts what libyaml refuses."""
    yaml = YAML(typ="safe", pure=True)
    yaml.Scanner = _ShallowScanner
    return yaml


def mapping_key(
    key: Node, segments: tuple[str, ...], seen: dict[str, int], problems: list[Problem]
) -> str | None:
    """The key's name, or None after recording why it cannot be used (and ``seen`` updated)."""
    if (
        key.ctag is _CachingResolver.DEFAULT_SCALAR_TAG
        and isinstance(key, ScalarNode)
        and not _KEY_CONTROL.search(key.value)
        and key.value not in seen
    ):
        # The common case, a plain or quoted string key met first, without string formatting.
        seen[key.value] = key.start_mark.line + 1
        return str(key.value)
    key_tag = key.tag or ""
    where = (key.start_mark.line + 1, key.start_mark.column + 1)
    if not isinstance(key, ScalarNode) or key_tag.endswith(":merge"):
        what = "merge keys (<<)" if isinstance(key, ScalarNode) else "complex keys"
        problems.append(Problem(f"{what} are not supported", *where, segments))
    elif not key_tag.endswith((":str", ":int")):
        problems.append(Problem(f"key {key.value!r} must be a string", *where, segments))
    elif _KEY_CONTROL.search(key.value):
        problems.append(Problem("a key contains control characters", *where, segments))
    elif key.value in seen:
        name = str(key.value)
        problems.append(
            Problem(f"duplicate key {name!r} (first at line {seen[name]})", *where, segments)
        )
    else:
        name = str(key.value)
        seen[name] = where[0]
        return name
    return None


class _TooDeep(Exception):
    """A collection nested deeper than MAX_DEPTH, at ``line``:``column``."""

    def __init__(self, line: int, column: int) -> None:
        self.line, self.column = line, column
        super().__init__(line, column)


def _too_deep(source: str, line: int = 0, column: int = 0) -> InventoryError:
    return InventoryError(
        f"the YAML is nested too deeply here (more than {MAX_DEPTH} levels of mappings and"
        " sequences); an inventory needs about six",
        file=source,
        line=line,
        column=column,
    )


def _provably_shallow(text: str) -> bool:
    """True when the text cannot nest deep enough to crash the C composer (a cheap bound).

    The ``[`` and ``{`` in the text, plus the block nesting that its line prefixes allow,
    bound the depth; the walkers then check MAX_DEPTH exactly.
    """
    openers = text.count("[") + text.count("{")
    return openers + 2 * _BLOCK_PREFIX <= _COMPOSER_SAFE and not _long_line_prefix(text)


def _check_depth(text: str, source: str, yaml: YAML) -> None:
    """Measure the nesting and count the values with the parser alone, before any node is
    made (it keeps its own stack, so never crashes, and holds one event at a time)."""
    depth = values = 0
    try:
        for event in yaml.parse(io.StringIO(text)):
            if isinstance(event, MappingEndEvent | SequenceEndEvent):
                depth -= 1
                continue
            if isinstance(event, MappingStartEvent | SequenceStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    mark = event.start_mark
                    raise _TooDeep(mark.line + 1, mark.column + 1)
            elif not isinstance(event, ScalarEvent | AliasEvent):
                continue
            values += 1
            if values > MAX_VALUES:
                mark = event.start_mark
                raise _too_many(source, mark.line + 1, mark.column + 1)
    except _TooDeep as exc:
        raise _too_deep(source, exc.line, exc.column) from None
    except YAMLError:
        pass  # composing stops at the same place and reports it


def _too_many(source: str, line: int, column: int) -> InventoryError:
    return InventoryError(
        f"the file holds more than {MAX_VALUES:,} values (keys and values; this one is past"
        " that); split it into several files",
        file=source,
        line=line,
        column=column,
    )


def _long_line_prefix(text: str) -> bool:
    """True when a line starts with _BLOCK_PREFIX units of indentation and indicators."""
    if _DEEP_FIRST_LINE.match(text):
        return True
    other_breaks = (
        text.count("\r") != text.count("\r\n")
        or "\x85" in text
        or "\u2028" in text
        or "\u2029" in text
    )
    return (_DEEP_LINE_ANY if other_breaks else _DEEP_LINE_LF).search(text) is not None


def _compose(text: str, source: str) -> Node | None:
    # ruamel's C composer recurses in C: too deep a file crashes the process. It sees a file
    # only once its depth is known to be safe (see _COMPOSER_SAFE).
    # Each value takes at least a character: a shorter text cannot hold too many.
    if len(text) > MAX_VALUES or not _provably_shallow(text):
        _check_depth(text, source, _fast_yaml())
    try:
        return _fast_yaml().compose(io.StringIO(text))  # type: ignore[no-any-return]
    except YAMLError:
        pass
    try:
        return _pure_yaml().compose(io.StringIO(text))  # type: ignore[no-any-return]
    except _TooDeep as exc:
        raise _too_deep(source, exc.line, exc.column) from None
    except RecursionError:  # the YAML 1.2 composer recurses in Python: an exception, no crash
        _check_depth(text, source, _pure_yaml())  # names the line
        raise _too_deep(source) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        column = mark.column + 1 if mark is not None else 0
        problem = str(exc.problem or exc.context)
        if "mapping values are not allowed" in problem:
            problem += (
                "; a value that contains ': ' must be quoted, e.g. display_name: \"Bob: Smith\""
            )
        elif "expected <block end>" in problem or "expected <document start>" in problem:
            problem += (
                "; check the indentation of this line and the lines just above it (spaces "
                "only, the same depth for keys of one mapping)"
            )
        raise InventoryError(
            f"invalid YAML: {problem}", file=source, line=line, column=column
        ) from None
    except YAMLError as exc:
        raise InventoryError(f"invalid YAML: {exc}", file=source) from None


def _count_uses(root: Node, source: str) -> dict[int, int]:
    """How many times each node is used (an alias uses its anchor's node once more).

    Refuses a recursive alias, aliases that expand the file beyond :data:`MAX_VALUES`
    (each alias counts the whole size of what it repeats, nested aliases included), and
    aliases that nest deeper than MAX_DEPTH where they are used. Linear in the nodes
    written: each node's expanded size and height are computed once.
    """
    uses: dict[int, int] = {}
    measured: dict[int, tuple[int, int, Node]] = {}  # id -> expanded size, height, node
    open_nodes: set[int] = set()

    def visit(node: Node, depth: int) -> tuple[int, int]:
        key = id(node)
        uses[key] = uses.get(key, 0) + 1
        known = measured.get(key)
        if known is not None:
            if depth + known[1] > MAX_DEPTH:
                raise _TooDeep(node.start_mark.line + 1, node.start_mark.column + 1)
            return known[0], known[1]
        if key in open_nodes:
            raise InventoryError(
                "an alias refers to a node that contains it (a recursive alias)",
                file=source,
                line=node.start_mark.line + 1,
                column=node.start_mark.column + 1,
            )
        size, height = 1, 0
        if isinstance(node, MappingNode | SequenceNode):
            if depth >= MAX_DEPTH:
                raise _TooDeep(node.start_mark.line + 1, node.start_mark.column + 1)
            open_nodes.add(key)
            children = (
                [part for pair in node.value for part in pair]
                if isinstance(node, MappingNode)
                else node.value
            )
            for child in children:
                child_size, child_height = visit(child, depth + 1)
                size += child_size
                height = max(height, child_height)
            height += 1
            open_nodes.discard(key)
        measured[key] = (size, height, node)
        return size, height

    total, _ = visit(root, 0)
    if total > MAX_VALUES:
        # Name the node whose repetitions add the most.
        worst = max(
            (entry for key, entry in measured.items() if uses[key] > 1),
            key=lambda entry: (uses[id(entry[2])] - 1) * entry[0],
        )
        size, _, node = worst
        raise InventoryError(
            f"aliases expand this file to {total:,} values, more than the {MAX_VALUES:,} a"
            f" file may hold; the node here ({size:,} values) is repeated"
            f" {uses[id(node)] - 1:,} times",
            file=source,
            line=node.start_mark.line + 1,
            column=node.start_mark.column + 1,
        )
    return uses


def read_text(path: Path) -> str:
    """Read a YAML file as text, keeping its line endings exactly (at most MAX_FILE_BYTES)."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise InventoryError(f"cannot read: {exc.strerror}", file=str(path)) from None
    if len(raw) > MAX_FILE_BYTES:
        raise InventoryError(
            f"the file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB, the most a YAML"
            " file may hold; split it into several files",
            file=str(path),
            line=1,
        )
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InventoryError(
            f"not UTF-8 (byte {exc.start} cannot be decoded); save the file as UTF-8",
            file=str(path),
        ) from None


def load_text(path: Path) -> YamlText:
    """Compose a YAML file into a :class:`YamlText`."""
    return compose_text(read_text(path), str(path))


def compose_text(text: str, source: str) -> YamlText:
    """Compose YAML text, collecting every scalar leaf with its pointer and span."""
    root = _compose(text, source)
    walker = _Walker(text)
    if root is not None:
        try:
            if "&" in text:  # without an anchor no node is met twice: nothing to count
                walker.visits = _count_uses(root, source)
            walker.walk(root, (), in_flow=False, aliased=False)
        except _TooDeep as exc:
            raise _too_deep(source, exc.line, exc.column) from None
    return YamlText(
        source=source,
        text=text,
        scalars=tuple(walker.scalars),
        mappings=tuple(walker.mappings),
        problems=tuple(walker.problems),
    )


class _Walker:
    def __init__(self, text: str) -> None:
        self.text = text
        self.visits: dict[int, int] = {}
        self.scalars: list[ScalarRef] = []
        self.mappings: list[MappingRef] = []
        self.problems: list[Problem] = []

    def _prefix_flags(self, node: Node) -> tuple[bool, bool]:
        first = self.text[node.start_mark.index : node.start_mark.index + 1]
        return first == "&", first == "!"

    def walk(
        self,
        node: Node,
        segments: tuple[str, ...],
        *,
        in_flow: bool,
        aliased: bool,
        key_end: int = -1,
    ) -> None:
        aliased = aliased or self.visits.get(id(node), 0) > 1
        if isinstance(node, ScalarNode):
            anchored, tagged = self._prefix_flags(node)
            tag = node.tag or ""
            kind = tag[len(_TAG_PREFIX) :] if tag.startswith(_TAG_PREFIX) else tag
            self.scalars.append(
                ScalarRef(
                    segments=segments,
                    value=str(node.value),
                    kind=kind,
                    start=node.start_mark.index,
                    end=node.end_mark.index,
                    line=node.start_mark.line + 1,
                    column=node.start_mark.column + 1,
                    style=node.style if node.style in ('"', "'", "|", ">") else "",
                    anchored=anchored,
                    aliased=aliased,
                    tagged=tagged,
                    in_flow=in_flow,
                    key_end=key_end,
                )
            )
            return
        if len(segments) >= MAX_DEPTH:
            raise _TooDeep(node.start_mark.line + 1, node.start_mark.column + 1)
        flow = in_flow or bool(getattr(node, "flow_style", False))
        if isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                self.walk(item, (*segments, str(index)), in_flow=flow, aliased=aliased)
            return
        if not isinstance(node, MappingNode):
            return
        seen: dict[str, int] = {}
        single_line: list[tuple[str, int]] = []
        key_column = node.value[0][0].start_mark.column if node.value else 0
        for key, value in node.value:
            name = mapping_key(key, segments, seen, self.problems)
            if name is None:
                continue
            if (
                isinstance(value, ScalarNode)
                and value.style not in ("|", ">")
                and value.start_mark.line == value.end_mark.line == key.start_mark.line
            ):
                single_line.append((name, key.start_mark.line))
            self.walk(
                value, (*segments, name), in_flow=flow, aliased=aliased, key_end=key.end_mark.index
            )
        self.mappings.append(MappingRef(segments, flow, key_column, tuple(single_line)))


def iter_strings(doc: YamlText) -> Iterator[ScalarRef]:
    """Every scalar leaf that a loader would read as a string."""
    return (ref for ref in doc.scalars if ref.kind == "str")


# --------------------------------------------------------------------------- editing


def scalar_text(value: str, *, like: ScalarRef | None) -> str:
    """How to write a token-like ``value`` (no spaces or quotes) where ``like`` stood."""
    if like is not None and like.style in ('"', "'"):
        return f"{like.style}{value}{like.style}"
    # A plain scalar with ':' inside a flow mapping is valid YAML 1.2 but breaks libyaml-based
    # tools; quote it unless the file already wrote it that way.
    if like is not None and like.in_flow and ":" in value and ":" not in like.value:
        return f'"{value}"'
    return value


def replacement_span(doc: YamlText, ref: ScalarRef) -> tuple[int, int, str]:
    """Where a new value for ``ref`` goes, and the text to put before it."""
    if ref.anchored or ref.aliased or ref.tagged:
        raise YamlEditError(
            f"{doc.source}:{ref.line}: {ref.pointer} uses an anchor, alias or tag; "
            "secret values must be plain scalars, fix it by hand first"
        )
    if ref.style in ("|", ">"):
        raise YamlEditError(
            f"{doc.source}:{ref.line}: {ref.pointer} is a block scalar; "
            "write it on one line ('password: x') and retry"
        )
    if ref.start == ref.end and ref.kind == "null" and ref.key_end >= 0:
        colon = doc.text.find(":", ref.key_end)
        if colon < 0:
            raise YamlEditError(f"{doc.source}:{ref.line}: cannot find ':' after the key")
        return colon + 1, colon + 1, " "
    return ref.start, ref.end, ""


def replace_scalars(doc: YamlText, edits: Mapping[tuple[str, ...], str]) -> str:
    """New text with each scalar at a key of ``edits`` replaced by its value."""
    spans: list[tuple[int, int, str]] = []
    for segments, value in edits.items():
        ref = doc.scalar(segments)
        if ref is None:
            raise YamlEditError(f"{doc.source}: no value at {join_pointer(segments)}")
        start, end, before = replacement_span(doc, ref)
        spans.append((start, end, before + scalar_text(value, like=ref)))
    return splice(doc.text, spans)


def insert_key(doc: YamlText, parent: tuple[str, ...], key: str, value: str) -> str:
    """New text with ``key: value`` added to the block mapping at ``parent``."""
    mapping = doc.mapping(parent)
    where = join_pointer(parent) or "/"
    if mapping is None:
        raise YamlEditError(f"{doc.source}: no mapping at {where}")
    if mapping.flow or not mapping.single_line_keys:
        raise YamlEditError(
            f"{doc.source}: cannot add {key!r} to {where} in place (flow style or no "
            f"one-line key to anchor on); add '{key}:' by hand and retry"
        )
    anchor_line = mapping.single_line_keys[0][1]
    newline = "\r\n" if "\r\n" in doc.text else "\n"
    lines = doc.text.splitlines(keepends=True)
    if anchor_line >= len(lines):
        raise YamlEditError(f"{doc.source}: unexpected end of file near {where}")
    offset = sum(len(line) for line in lines[: anchor_line + 1])
    if not lines[anchor_line].endswith(("\n", "\r")):
        offset_text = newline + " " * mapping.key_column + f"{key}: {value}"
        return doc.text[:offset] + offset_text + doc.text[offset:]
    new_line = " " * mapping.key_column + f"{key}: {value}{newline}"
    return doc.text[:offset] + new_line + doc.text[offset:]


def splice(text: str, spans: list[tuple[int, int, str]]) -> str:
    """Replace non-overlapping ``(start, end, new)`` spans of ``text``."""
    out: list[str] = []
    cursor = 0
    for start, end, new in sorted(spans):
        if start < cursor:
            raise YamlEditError("overlapping edits")
        out.append(text[cursor:start])
        out.append(new)
        cursor = end
    out.append(text[cursor:])
    return "".join(out)


def verify_edit(
    before: YamlText, after_text: str, expected: Mapping[tuple[str, ...], str]
) -> YamlText:
    """Re-parse edited text; every scalar must be unchanged except the expected ones."""
    after = compose_text(after_text, before.source)
    old = {ref.segments: (ref.value, ref.kind) for ref in before.scalars}
    new = {ref.segments: (ref.value, ref.kind) for ref in after.scalars}
    for segments, value in expected.items():
        if new.get(segments, ("", ""))[0] != value:
            raise YamlEditError(
                f"{before.source}: {join_pointer(segments)} did not take the new value; "
                "the file was left unchanged"
            )
        old.pop(segments, None)
        new.pop(segments, None)
    if old != new or len(after.problems) != len(before.problems):
        raise YamlEditError(
            f"{before.source}: patching would change other values; the file was left unchanged"
        )
    return after


def load_data(path: Path) -> Any:
    """Load a small YAML file (recipients, identities) into plain Python data."""
    text = read_text(path)
    try:
        return _pure_yaml().load(io.StringIO(text))
    except _TooDeep as exc:
        raise _too_deep(str(path), exc.line, exc.column) from None
    except RecursionError:
        _check_depth(text, str(path), _pure_yaml())  # names the line
        raise _too_deep(str(path)) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise InventoryError(
            f"invalid YAML: {exc.problem or exc.context}",
            file=str(path),
            line=mark.line + 1 if mark is not None else 0,
            column=mark.column + 1 if mark is not None else 0,
        ) from None
    except YAMLError as exc:
        raise InventoryError(f"invalid YAML: {exc}", file=str(path)) from None


# --------------------------------------------------------------------------- positioned trees


@dataclass(slots=True)
class YNode:
    """A YAML value with its position: a mapping, a sequence or a typed scalar.

    Treat as immutable; not frozen because a frozen dataclass costs four times as much to
    build, and a large inventory builds hundreds of thousands.
    """

    kind: str
    line: int
    column: int
    value: Any = None
    items: tuple[tuple[str, YNode], ...] = ()
    key_positions: tuple[tuple[int, int], ...] = ()
    tag: str = ""
    shared: bool = False

    def get(self, key: str) -> YNode | None:
        """The child of a mapping at ``key``, or None."""
        for name, child in self.items:
            if name == key:
                return child
        return None

    def key_position(self, key: str) -> tuple[int, int]:
        """Line and column of ``key`` in a mapping (the node's own position if absent)."""
        for (name, _), position in zip(self.items, self.key_positions, strict=True):
            if name == key:
                return position
        return self.line, self.column


def _scalar_value(tag: str, text: str) -> Any:
    if tag == "int":
        try:
            return int(text.replace("_", ""), 0)
        except ValueError:
            try:
                return int(text.replace("_", ""))
            except ValueError:
                return text
    if tag == "float":
        lowered = text.lower()
        if lowered.endswith(".inf"):
            return float("-inf") if lowered.startswith("-") else float("inf")
        if lowered == ".nan":
            return float("nan")
        try:
            return float(text.replace("_", ""))
        except ValueError:
            return text
    if tag == "bool":
        return text.lower() in ("true", "yes", "on", "y")
    if tag == "null":
        return None
    return text


def load_tree(path: Path) -> tuple[YNode | None, tuple[Problem, ...]]:
    """Compose a YAML file into a positioned tree; problems (duplicates...) are returned."""
    return compose_tree(read_text(path), str(path))


def compose_tree(text: str, source: str) -> tuple[YNode | None, tuple[Problem, ...]]:
    """Compose YAML text into a positioned tree; problems (duplicates...) are returned."""
    # Without an anchor no node can be met twice, and tracking visits costs a dict entry each.
    anchored = "&" in text
    builder = _TreeBuilder(track_aliases=anchored)
    try:
        root = _compose(text, source)
        if root is None:
            return None, ()
        if anchored:
            _count_uses(root, source)
        tree = builder.build(root, ())
    except _TooDeep as exc:
        raise _too_deep(source, exc.line, exc.column) from None
    return tree, tuple(builder.problems)


class _TreeBuilder:
    def __init__(self, *, track_aliases: bool = True) -> None:
        self.track_aliases = track_aliases
        self.visits: set[int] = set()
        self.problems: list[Problem] = []
        self.short_tags: dict[int, tuple[Any, str]] = {}

    def short_tag(self, node: Node) -> str:
        ctag = node.ctag
        known = self.short_tags.get(id(ctag))
        if known is None:
            tag = node.tag or ""
            short = tag[len(_TAG_PREFIX) :] if tag.startswith(_TAG_PREFIX) else tag
            # The tag object is kept with its id so that the id cannot be reused meanwhile.
            known = self.short_tags[id(ctag)] = (ctag, short)
        return known[1]

    def build(self, node: Node, segments: tuple[str, ...]) -> YNode:
        mark = node.start_mark
        line, column = mark.line + 1, mark.column + 1
        shared = False
        if self.track_aliases:
            # An alias is the same node object met again; only the repeats are marked.
            shared = id(node) in self.visits
            self.visits.add(id(node))
        if isinstance(node, ScalarNode):
            short = self.short_tag(node)
            value = node.value if short == "str" else _scalar_value(short, str(node.value))
            return YNode("scalar", line, column, value, (), (), short, shared)
        if len(segments) >= MAX_DEPTH:
            raise _TooDeep(line, column)
        if isinstance(node, SequenceNode):
            items = tuple(
                (str(i), self.build(item, (*segments, str(i)))) for i, item in enumerate(node.value)
            )
            return YNode("seq", line, column, None, items, (), "", shared)
        entries: list[tuple[str, YNode]] = []
        positions: list[tuple[int, int]] = []
        seen: dict[str, int] = {}
        problems = self.problems
        for key, value in node.value:
            name = mapping_key(key, segments, seen, problems)
            if name is None:
                continue
            key_mark = key.start_mark
            entries.append((name, self.build(value, (*segments, name))))
            positions.append((key_mark.line + 1, key_mark.column + 1))
        return YNode("map", line, column, None, tuple(entries), tuple(positions), "", shared)
