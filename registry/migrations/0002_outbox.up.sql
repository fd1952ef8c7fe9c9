-- Events written in the same transaction as the change they describe, and
-- drained in seq order to the bus by the relay (registry/outbox.py).
CREATE TABLE registry.outbox (
    seq             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    tenant          text        NOT NULL,
    topic           text        NOT NULL,
    event           jsonb       NOT NULL,
    created_at      timestamptz NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    last_error      text,
    -- Set when the bus refused the event for good; such rows are kept, not sent.
    failed_at       timestamptz
);

CREATE INDEX outbox_pending_idx ON registry.outbox (seq) WHERE failed_at IS NULL;
