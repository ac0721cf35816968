"""Schema-guided JSON: the structure is written for the model, every value is decoded by the model.

Used where a reply must be valid JSON of a schema (a forced tool call, structured output on a
model without tools). No engine hook is needed: the writer appends the fixed JSON syntax (braces,
keys, quotes, separators) itself and asks the model to continue after it for each value, cutting the
continuation where the value ends (a closing quote, the end of a number) and validating it against
the value's type. A value the model fails to produce (no digits for an integer) falls back to the
schema's default (or 0/false/the first enum member) and is counted in ``GuidedJSON.fallbacks``.

``Continue`` is the one I/O point: ``continue_(forced_text)`` yields the model's text deltas after
the prompt plus ``forced_text``; the writer closes the iterator as soon as it has the value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .tools import ToolFormat, call_prefix, call_suffix

Continue = Callable[[str], Iterator[str]]

_INT = re.compile(r"-?\d+")
_NUM = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
MAX_ITEMS = 8


class GuidedJSON:
    """Writes one JSON value of ``schema`` after ``prefix``, asking ``continue_`` for every value."""

    def __init__(self, continue_: Continue, prefix: str = "", *, root: Mapping[str, Any] | None = None):
        self.continue_ = continue_
        self.text = prefix
        self.root: Mapping[str, Any] = root or {}
        self.fallbacks = 0
        self.calls = 0

    # -- the model's continuation ----------------------------------------------------------------
    def _gen(self, cut: Callable[[str], int | None]) -> str:
        """The model's text after ``self.text`` up to where ``cut`` says the value ends."""
        self.calls += 1
        buf = ""
        it = self.continue_(self.text)
        try:
            for delta in it:
                buf += delta
                end = cut(buf)
                if end is not None:
                    return buf[:end]
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        return buf

    def _emit(self, text: str) -> None:
        self.text += text

    # -- values -------------------------------------------------------------------------------
    def value(self, schema: Mapping[str, Any]) -> Any:
        """Write a value of ``schema``; return it."""
        schema = self._resolve(schema)
        if "const" in schema:
            self._emit(json.dumps(schema["const"], ensure_ascii=False))
            return schema["const"]
        if "enum" in schema:
            return self.choice(list(schema["enum"]))
        kind = _kind(schema)
        if kind == "object":
            return self._object(schema)
        if kind == "array":
            return self._array(schema)
        if kind in ("integer", "number"):
            return self._number(schema, kind == "integer")
        if kind == "boolean":
            return self._boolean(schema)
        if kind == "null":
            self._emit("null")
            return None
        return self._string()

    def choice(self, options: Sequence[Any]) -> Any:
        """One of ``options`` (JSON values): the one the model's text matches, else the closest prefix."""
        texts = [json.dumps(o, ensure_ascii=False) for o in options]
        if len(texts) > 1:
            longest = max(len(t) for t in texts)

            def cut(buf: str) -> int | None:
                s = buf.lstrip()
                if len(s) >= longest or not any(t.startswith(s) or s.startswith(t) for t in texts):
                    return len(buf)
                return None

            said = self._gen(cut).lstrip()
            best = max(range(len(texts)), key=lambda i: (_common(texts[i], said), -i))
            if _common(texts[best], said) == 0:
                self.fallbacks += 1
        else:
            best = 0
        self._emit(texts[best])
        return options[best]

    def _object(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        props: Mapping[str, Any] = schema.get("properties") or {}
        out: dict[str, Any] = {}
        self._emit("{")
        for i, (key, sub) in enumerate(props.items()):
            self._emit((", " if i else "") + json.dumps(key, ensure_ascii=False) + ": ")
            out[key] = self.value(sub)
        self._emit("}")
        return out

    def _array(self, schema: Mapping[str, Any]) -> list[Any]:
        items = schema.get("items") or {}
        out: list[Any] = []
        self._emit("[")
        while len(out) < MAX_ITEMS:
            nxt = self._gen(lambda b: len(b) if b.strip() else None).strip()
            if out and not nxt.startswith(","):
                break
            if not out and nxt.startswith("]"):
                break
            if out:
                self._emit(", ")
            out.append(self.value(items))
        self._emit("]")
        return out

    def _number(self, schema: Mapping[str, Any], integer: bool) -> int | float:
        pattern = _INT if integer else _NUM

        def cut(buf: str) -> int | None:
            s = buf.lstrip()
            m = pattern.match(s)
            if m is None:
                return len(buf) if s and s != "-" else None
            rest = s[m.end() :]
            if rest and not (not integer and rest in (".", "e", "E", "e-", "e+", "E-", "E+")):
                return len(buf) - len(rest)
            return None

        m = pattern.match(self._gen(cut).lstrip())
        if m is not None:
            value: int | float = int(m.group()) if integer else float(m.group())
        else:
            self.fallbacks += 1
            value = schema.get("default", schema.get("minimum", 0))
        if integer:
            value = int(value)
        self._emit(json.dumps(value))
        return value

    def _boolean(self, schema: Mapping[str, Any]) -> bool:
        said = self._gen(lambda b: len(b) if b.strip() else None).strip().lower()
        if said[:1] in ("t", "f"):
            value = said.startswith("t")
        else:
            self.fallbacks += 1
            value = bool(schema.get("default", False))
        self._emit("true" if value else "false")
        return value

    def _string(self) -> str:
        self._emit('"')

        def cut(buf: str) -> int | None:
            i = 0
            while i < len(buf):
                if buf[i] == "\\":
                    i += 2
                    continue
                if buf[i] in '"\n':
                    return i
                i += 1
            return None

        raw = self._gen(cut)
        if raw.endswith("\\") and not raw.endswith("\\\\"):
            raw = raw[:-1]
        try:
            value = json.loads(f'"{raw}"')
        except json.JSONDecodeError:
            value = raw.replace("\\", "")
        self.text = self.text[:-1] + json.dumps(value, ensure_ascii=False)
        return str(value)

    def _resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """Follow ``$ref`` into the root's ``$defs``; take the first non-null branch of a union."""
        for _ in range(32):
            ref = schema.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/"):
                node: Any = self.root
                for part in ref[2:].split("/"):
                    node = node.get(part, {}) if isinstance(node, Mapping) else {}
                schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
                continue
            branches = schema.get("anyOf") or schema.get("oneOf") or schema.get("allOf")
            if branches:
                pick = next((b for b in branches if b.get("type") != "null"), branches[0])
                schema = {**{k: v for k, v in schema.items() if k not in ("anyOf", "oneOf", "allOf")}, **pick}
                continue
            return schema
        return schema


def _kind(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    return str(kind)


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def guided_json(schema: Mapping[str, Any], continue_: Continue, prefix: str = "") -> tuple[str, Any]:
    """The JSON text (after ``prefix``) and value of one value of ``schema``, values decoded by the model."""
    g = GuidedJSON(continue_, prefix, root=schema)
    value = g.value(schema)
    return g.text[len(prefix) :], value


def guided_tool_call(fmt: ToolFormat, tools: Sequence[Mapping[str, Any]], forced: str | Sequence[str],
                     continue_: Continue) -> str:
    """The full text of a call to ``forced`` (a name, or the names the model picks from), arguments
    decoded by the model against the tool's parameter schema, written the way the template renders it."""
    from .tools import normalize_tools

    by_name = {t["function"]["name"]: t["function"] for t in normalize_tools(tools)}
    if isinstance(forced, str):
        name = forced
        g = GuidedJSON(continue_, call_prefix(fmt, name))
    else:
        g = GuidedJSON(continue_, call_prefix(fmt, None))
        name = g.choice(list(forced))
        g._emit(', "arguments": ' if fmt == "hermes" else ', "parameters": ')
    params = by_name[name].get("parameters") or {"type": "object", "properties": {}}
    g.root = params
    g.value(params)
    return g.text + call_suffix(fmt)
