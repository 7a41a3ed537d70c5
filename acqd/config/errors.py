"""Config problems a person can act on: pydantic's errors in plain words, each at its YAML line and column.

``Found`` is a config as read (the mapping, the YAML nodes it was built from, the models' JSON Schema);
it words each pydantic error as a rule ("must be greater than 0, got -1", "unknown key 'colour';
allowed keys: ..." closest first), finds the key or value it is about in the YAML, and spells the
field path as the user wrote it (``streams[1] 'probe'.dtype``). Knows nothing of acqd's models.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import yaml

Loc = tuple[str | int, ...]
MISSING_HINTS = {("daemon", "data_root"): " (or give it as ACQD_DATA_ROOT or --data-root)"}
"""What to say after "required key ... is missing", by the key's path: where else it may come from."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config file: where (YAML line and column, 1-based; field path) and the rule."""

    path: str
    message: str
    line: int | None = None
    column: int | None = None

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}:{self.column}" if self.line is not None else source
        return f"{where}: {self.path}: {self.message}"


def closest_first(word: str, choices: Sequence[str]) -> list[str]:
    """``choices``, the most similar to ``word`` first (difflib's ratio)."""
    return difflib.get_close_matches(word, choices, n=len(choices), cutoff=0.0)


@dataclass(frozen=True)
class Found:
    """A config as read: ``raw`` (the mapping), ``node`` (its composed YAML, None when it was not read from
    YAML) and ``schema`` (the JSON Schema of the model it is validated against)."""

    raw: object
    node: yaml.Node | None = None
    schema: dict = field(default_factory=dict)

    def field_problems(self, errors: list[dict]) -> list[Problem]:
        """pydantic's errors, worded and located; a list's "too short" that only counts its failed items is
        dropped (each item's own error is reported)."""
        return [self.at(e["loc"], self.rule(e), at_key=e["type"] == "extra_forbidden", at_parent=e["type"] == "missing")
                for e in errors if not _echo(e, errors)]

    def duplicate_keys(self) -> list[Problem]:
        """YAML keys given twice in one mapping (PyYAML would silently keep the last)."""
        problems: list[Problem] = []
        stack: list[tuple[yaml.Node | None, Loc]] = [(self.node, ())]
        while stack:
            n, loc = stack.pop()
            if isinstance(n, yaml.MappingNode):
                seen: dict[object, yaml.Node] = {}
                for k, v in n.value:
                    key = k.value if isinstance(k, yaml.ScalarNode) else None
                    if key in seen:
                        rule = f"key {key!r} is given twice (first on line {seen[key].start_mark.line + 1})"
                        problems.append(Problem(self.path((*loc, key)), rule, k.start_mark.line + 1,
                                                k.start_mark.column + 1))
                    seen.setdefault(key, k)
                    stack.append((v, (*loc, key)))
            elif isinstance(n, yaml.SequenceNode):
                stack.extend((v, (*loc, i)) for i, v in enumerate(n.value))
        return problems

    def rule(self, err: dict) -> str:
        """pydantic's message for one error, said as a rule (no 'Value error, ', no links)."""
        kind, ctx, value, loc = err["type"], err.get("ctx") or {}, err.get("input"), err["loc"]
        if kind == "extra_forbidden":
            allowed = closest_first(str(loc[-1]), self.allowed_keys(loc[:-1]))
            return f"unknown key {loc[-1]!r}; allowed keys: {', '.join(allowed)}"
        if kind == "missing":
            return f"required key {loc[-1]!r} is missing" + MISSING_HINTS.get(tuple(map(str, loc)), "")
        if kind in ("value_error", "assertion_error"):
            return str(ctx.get("error", err["msg"]))
        if kind == "union_tag_invalid":
            return f"{ctx['discriminator'].strip(chr(39))} must be one of {ctx['expected_tags']}, got {ctx['tag']!r}"
        if kind == "union_tag_not_found":
            return f"needs a {ctx['discriminator']} key"
        if kind in ("model_type", "model_attributes_type", "dict_type"):
            return f"must be a mapping of keys to values, got {_kind_of(value)}"
        if kind in ("tuple_type", "list_type"):
            return f"must be a list, got {_kind_of(value)}"
        msg = re.sub(r"^(Input|Value|String|Tuple|List) should (be|have)", lambda m: f"must {m.group(2)}", err["msg"])
        msg = re.sub(r", unable to parse .*$", "", msg).replace(" after validation", "")
        return f"{msg}, got {value!r}" if isinstance(value, (str, int, float, bool)) else msg

    def allowed_keys(self, loc: Loc) -> list[str]:
        """The keys of the model at pydantic location ``loc`` (union tags in it pick the union's member)."""
        defs = self.schema.get("$defs", {})
        schema, value = self.schema, self.raw
        for i, key in enumerate(loc):
            schema = _resolve(schema, defs)
            if self._is_tag(loc, i, value) or (i == len(loc) - 1 and "discriminator" in schema):
                schema = defs[schema["discriminator"]["mapping"][key].split("/")[-1]]
                continue
            schema = schema.get("items", {}) if isinstance(key, int) else schema.get("properties", {}).get(key, {})
            value = value[key] if _has(value, key) else None
        return sorted(_resolve(schema, defs).get("properties", {}))

    def path(self, loc: Loc) -> str:
        """``streams[1] 'probe'.dtype``: a location as the user wrote it, with each stream's name."""
        parts: list[str] = []
        value = self.raw
        for i, key in enumerate(loc):
            if self._is_tag(loc, i, value):
                continue
            if isinstance(key, int):
                name = value[key].get("name") if _has(value, key) and isinstance(value[key], dict) else None
                parts.append(f"[{key}]" + (f" {name!r}" if isinstance(name, str) else ""))
            else:
                parts.append(("." if parts else "") + str(key))
            value = value[key] if _has(value, key) else None
        return "".join(parts) or "(top level)"

    def at(self, loc: Loc, message: str, *, at_key: bool = False, at_parent: bool = False) -> Problem:
        """The problem at ``loc``, with the line and column of its value (or key, or enclosing mapping)."""
        node = self.node
        mark = node.start_mark if node is not None else None
        value = self.raw
        for i, key in enumerate(loc):
            if self._is_tag(loc, i, value):
                continue
            last = i == len(loc) - 1
            found = None
            if isinstance(node, yaml.MappingNode):
                found = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(key)),
                             None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                found = (node.value[key], node.value[key])
            if found is None or (last and at_parent):
                break
            node = found[1]
            mark = (found[0] if last and at_key else found[1]).start_mark
            value = value[key] if _has(value, key) else None
        line = mark.line + 1 if mark is not None else None
        column = mark.column + 1 if mark is not None else None
        return Problem(self.path(loc), message, line, column)

    def _is_tag(self, loc: Loc, i: int, value: object) -> bool:
        """Is ``loc[i]`` a union tag pydantic put in the location (``sync.channel.bit`` for ``sync.bit`` of a
        ``source: channel`` sync) rather than a key of ``value``?"""
        return (i < len(loc) - 1 and isinstance(value, dict)
                and any(value.get(d) == loc[i] for d in _discriminators(self.schema)))


def _discriminators(schema: dict) -> set[str]:
    """Keys that choose a model in a union (``source``)."""
    found, stack = set(), [schema]
    while stack:
        s = stack.pop()
        if isinstance(s, dict):
            if isinstance(s.get("discriminator"), dict):
                found.add(s["discriminator"]["propertyName"])
            stack.extend(s.values())
        elif isinstance(s, list):
            stack.extend(s)
    return found


def _echo(err: dict, errors: list[dict]) -> bool:
    n = len(err["loc"])
    return err["type"] == "too_short" and any(len(o["loc"]) > n and o["loc"][:n] == err["loc"] for o in errors)


def _resolve(schema: dict, defs: dict) -> dict:
    """Follow $ref and step into the non-null member of ``X | None``."""
    while True:
        if "$ref" in schema:
            schema = defs[schema["$ref"].split("/")[-1]]
        elif "anyOf" in schema and len(options := [s for s in schema["anyOf"] if s.get("type") != "null"]) == 1:
            schema = options[0]
        else:
            return schema


def _has(node: object, key: object) -> bool:
    return (isinstance(node, dict) and key in node) or (isinstance(node, list) and isinstance(key, int)
                                                        and 0 <= key < len(node))


def _kind_of(value: object) -> str:
    return {list: "a list", dict: "a mapping", str: "text", type(None): "nothing"}.get(type(value), repr(value))
