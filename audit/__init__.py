"""The hash-chained, tamper-evident audit log (see docs/audit.md).

Importable on its own: nothing here imports the gateway. The gateway appends
:class:`Entry` objects to an :class:`AuditLog` and gets back durable
:class:`Record` objects; ``python -m audit verify`` checks a chain offline.
"""

from audit.chain import AppendFailed, AuditError, AuditLog, AuditStats, ChainConflict
from audit.record import Entry, Record, digest_document
from audit.setup import AuditSettings, open_audit_log
from audit.summary import ANONYMOUS_CODES, Summarizer

__all__ = [
    "ANONYMOUS_CODES",
    "AppendFailed",
    "AuditError",
    "AuditLog",
    "AuditSettings",
    "AuditStats",
    "ChainConflict",
    "Entry",
    "Record",
    "Summarizer",
    "digest_document",
    "open_audit_log",
]
