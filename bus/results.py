"""What the bus's Python API returns (plain frozen values)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["DeadLetter", "Delivery", "Pending", "PendingEntry", "PublishResult", "Redriven"]


@dataclass(frozen=True, slots=True)
class PublishResult:
    #: The message id (the stream entry id) consumers ack.
    id: str
    #: The envelope id.
    event_id: str
    #: True when an earlier publish with the same idempotency key made the message.
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Delivery:
    id: str
    #: 1 on first delivery; more when reclaimed after the visibility timeout.
    deliveries: int
    #: The envelope as stored (validated JSON).
    envelope_json: bytes

    @property
    def envelope(self) -> dict[str, Any]:
        doc: dict[str, Any] = orjson.loads(self.envelope_json)
        return doc


@dataclass(frozen=True, slots=True)
class PendingEntry:
    id: str
    consumer: str
    idle_ms: int
    deliveries: int


@dataclass(frozen=True, slots=True)
class Pending:
    count: int
    consumers: dict[str, int]
    entries: list[PendingEntry]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    source_id: str
    group: str
    deliveries: int
    last_consumer: str
    reason: str
    dead_at_ms: int
    envelope_json: bytes


@dataclass(frozen=True, slots=True)
class Redriven:
    dead_letter_id: str
    #: The new message id on the topic, or None if the dead letter was not found.
    id: str | None
