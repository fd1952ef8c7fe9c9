"""Redis key names: one tenant's topic is one stream, and nothing else can name it.

``nops:bus:{<tenant>}:<topic>`` is the stream, ``…:dlq`` its dead letters,
``…:idem:<sha256 of the key>`` an idempotency key. The braces are a Redis
Cluster hash tag, so all of a tenant's keys share one slot and the Lua
scripts that touch several of them stay valid on a cluster. Tenant, topic,
group and consumer names admit no ``:`` and no braces, so no name can reach
another topic's or another tenant's keys.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from bus.errors import MalformedRequest

__all__ = [
    "MAX_ID_PART",
    "MESSAGE_ID",
    "NAME",
    "TENANT",
    "check",
    "dlq_key",
    "idempotency_redis_key",
    "stream_key",
]

#: Topic, group and consumer names.
NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Tenant ids, as the gateway passes them in ``X-Nops-Tenant``.
TENANT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MESSAGE_ID: Final = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
#: Both parts of a stream entry id are unsigned 64-bit integers; Redis refuses larger ones.
MAX_ID_PART: Final = 2**64 - 1


def stream_key(tenant: str, topic: str) -> str:
    return f"nops:bus:{{{check(TENANT, tenant, 'tenant')}}}:{check(NAME, topic, 'topic')}"


def dlq_key(tenant: str, topic: str) -> str:
    return stream_key(tenant, topic) + ":dlq"


def idempotency_redis_key(tenant: str, topic: str, key: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()[:40]
    return f"{stream_key(tenant, topic)}:idem:{digest}"


def check(pattern: re.Pattern[str], value: str, what: str) -> str:
    if (
        not isinstance(value, str)
        or pattern.fullmatch(value) is None
        or (pattern is MESSAGE_ID and any(int(part) > MAX_ID_PART for part in value.split("-")))
    ):
        raise MalformedRequest(f"invalid {what}", reasons=(f"invalid_{what}",))
    return value
