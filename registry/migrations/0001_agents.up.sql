-- Agents. One row per (tenant, id). The application validates every field
-- first (registry/model.py); these CHECKs are the second line.
CREATE TABLE registry.agents (
    tenant       text        NOT NULL CHECK (tenant ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    id           text        NOT NULL CHECK (id ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    name         text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 128),
    version      text        NOT NULL DEFAULT '' CHECK (char_length(version) <= 64),
    capabilities text[]      NOT NULL DEFAULT '{}'
        CHECK (cardinality(capabilities) <= 256 AND array_position(capabilities, NULL) IS NULL),
    endpoint_url text        NOT NULL
        CHECK (endpoint_url ~ '^https?://[^#?[:space:]]+$' AND char_length(endpoint_url) <= 2048),
    -- Kept in step with heartbeat_at by the sweeper; reads derive it afresh.
    status       text        NOT NULL DEFAULT 'healthy'
        CHECK (status IN ('healthy', 'stale', 'zombie')),
    heartbeat_at timestamptz NOT NULL,
    labels       jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(labels) = 'object'),
    weight       integer     NOT NULL DEFAULT 100 CHECK (weight BETWEEN 0 AND 1000),
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    CONSTRAINT agents_pkey PRIMARY KEY (tenant, id)
);

-- GET /agents?capability=...: array containment.
CREATE INDEX agents_capabilities_idx ON registry.agents USING gin (capabilities);
-- The sweeper looks for agents whose heartbeat is older than a threshold.
CREATE INDEX agents_sweep_idx ON registry.agents (heartbeat_at) WHERE status <> 'zombie';
