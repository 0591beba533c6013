"""Reading an agent's answer field by field: a field missing or of the wrong type is a
:class:`~provisioner.errors.RemoteError` naming the host, the operation and the field.

The answer types of :mod:`provisioner.transport.agent.messages` read themselves through
:class:`Fields`; nothing here knows their shape. Fields the contract does not name are ignored,
so that a newer agent may add some. No message quotes a value: file contents carry passwords.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from provisioner.errors import RemoteError

CONTRACT = "docs/agent-protocol.md"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
"""A run id as the agent records it (the runner's are 12 hex digits)."""


@dataclass(frozen=True)
class Answer:
    """Whose answer is being read: for the messages."""

    op: str
    host: str

    def error(self, where: str, problem: str) -> RemoteError:
        """The protocol error for the field at ``where``."""
        at = f"{where} " if where else ""
        return RemoteError(
            f"the agent's {self.op} answer breaks the protocol ({CONTRACT}): {at}{problem}",
            host=self.host,
        )


def _kind(value: object) -> str:
    """What a JSON value is, in the contract's words (never the value itself)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class Fields:
    """One JSON object of an answer; each accessor checks the type the contract gives."""

    def __init__(self, data: object, answer: Answer, where: str = "") -> None:
        if not isinstance(data, Mapping):
            raise answer.error(where, f"is {_kind(data)}, not an object")
        self._data = data
        self.answer = answer
        self.where = where

    def _at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        """Whether the object names ``key`` at all."""
        return key in self._data

    def _get(self, key: str) -> object:
        if key not in self._data:
            raise self.answer.error(self._at(key), "is missing")
        return self._data[key]

    def _wrong(self, key: str, value: object, wanted: str) -> RemoteError:
        return self.answer.error(self._at(key), f"is {_kind(value)}, not {wanted}")

    def text(self, key: str) -> str:
        """A string."""
        value = self._get(key)
        if not isinstance(value, str):
            raise self._wrong(key, value, "a string")
        return value

    def text_or_none(self, key: str) -> str | None:
        """A string or null."""
        value = self._get(key)
        if value is not None and not isinstance(value, str):
            raise self._wrong(key, value, "a string or null")
        return value

    def choice(self, key: str, allowed: Collection[str]) -> str:
        """One of the strings the contract lists."""
        value = self.text(key)
        if value not in allowed:
            raise self.answer.error(self._at(key), f"is not one of {', '.join(sorted(allowed))}")
        return value

    def sha256_or_none(self, key: str) -> str | None:
        """A lower-case hex SHA-256, or null."""
        value = self.text_or_none(key)
        if value is not None and not _SHA256.fullmatch(value):
            raise self.answer.error(self._at(key), "is not a lower-case hex SHA-256")
        return value

    def run_id_or_none(self, key: str) -> str | None:
        """A run id (1 to 64 letters, digits, ``-`` or ``_``), or null; the value itself is
        never quoted: it may hold anything a workstation's state held."""
        value = self.text_or_none(key)
        if value is not None and not _RUN_ID.fullmatch(value):
            raise self.answer.error(
                self._at(key), "is not a run id (1 to 64 letters, digits, - or _)"
            )
        return value

    def flag(self, key: str) -> bool:
        """A boolean."""
        value = self._get(key)
        if not isinstance(value, bool):
            raise self._wrong(key, value, "a boolean")
        return value

    def count(self, key: str) -> int:
        """A whole number, zero or more."""
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self._wrong(key, value, "a whole number of zero or more")
        return value

    def count_or_none(self, key: str) -> int | None:
        """A whole number of zero or more, or null."""
        return None if self._get(key) is None else self.count(key)

    def base64_or_none(self, key: str) -> bytes | None:
        """Bytes sent as base64, or null."""
        value = self.text_or_none(key)
        if value is None:
            return None
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise self.answer.error(self._at(key), "is not base64") from None

    def object(self, key: str) -> Fields:
        """A nested object."""
        return Fields(self._get(key), self.answer, self._at(key))

    def object_or_none(self, key: str) -> Fields | None:
        """A nested object, or null."""
        value = self._get(key)
        return None if value is None else Fields(value, self.answer, self._at(key))

    def objects(self, key: str) -> list[Fields]:
        """An array of objects."""
        value = self._get(key)
        if not isinstance(value, list):
            raise self._wrong(key, value, "an array")
        return [
            Fields(item, self.answer, f"{self._at(key)}[{index}]")
            for index, item in enumerate(value)
        ]


def answer_fields(answer: Mapping[str, object], op: str, host: str) -> Fields:
    """The answer's own fields once ``protocol``, ``op`` and ``ok`` are checked.

    An agent that refused the request (``ok: false``) is a :class:`RemoteError` with its
    message: no answer type describes a refusal.
    """
    reading = Answer(op, host)
    fields = Fields(answer, reading)
    if answer.get("protocol") != 1:
        raise reading.error("protocol", "is not 1")
    if fields.text("op") != op:
        raise reading.error("op", f"is not {op!r}")
    if not fields.flag("ok"):
        error = fields.object("error")
        raise RemoteError(f"agent: {error.text('message')}", host=host)
    return fields
