-- Switchboard schema, PostgreSQL dialect. Times are Unix milliseconds (BIGINT) in both
-- dialects so that the two stores behave identically. Append-only: never edit once landed.

CREATE TABLE tenants (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    -- Keep whole message texts after processing (otherwise only a 100-character preview).
    full_transcripts BOOLEAN NOT NULL DEFAULT FALSE,
    created_at       BIGINT NOT NULL
);

CREATE TABLE numbers (
    number      TEXT PRIMARY KEY,               -- E.164
    tenant_id   TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    pinned_node TEXT,                           -- admin pin for placement
    settings    TEXT NOT NULL DEFAULT '{}',     -- JSON
    created_at  BIGINT NOT NULL
);
CREATE INDEX numbers_tenant ON numbers (tenant_id);

-- The highest fencing token seen per number; lower ones are refused.
CREATE TABLE fences (
    number TEXT PRIMARY KEY,
    token  BIGINT NOT NULL
);

-- Protocol key blobs, AES-256-GCM encrypted; key_id names the key so keys can rotate.
CREATE TABLE sessions (
    number     TEXT PRIMARY KEY REFERENCES numbers (number) ON DELETE CASCADE,
    key_id     TEXT NOT NULL,
    nonce      BYTEA NOT NULL,
    ciphertext BYTEA NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE contacts (
    number     TEXT NOT NULL REFERENCES numbers (number) ON DELETE CASCADE,
    contact    TEXT NOT NULL,                   -- JID
    opt_in     TEXT NOT NULL,                   -- unknown | opted_in | opted_out
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (number, contact)
);

CREATE TABLE conversations (
    number         TEXT NOT NULL REFERENCES numbers (number) ON DELETE CASCADE,
    chat           TEXT NOT NULL,
    checkpoint     TEXT NOT NULL,               -- JSON: the flow state after the last message
    human_takeover BOOLEAN NOT NULL DEFAULT FALSE,
    updated_at     BIGINT NOT NULL,
    PRIMARY KEY (number, chat)
);

-- Keyed by what identifies a message; seq keeps arrival order (no index of its own: the
-- partial indexes carry it), so a row costs as few index entries as possible.
CREATE TABLE inbound (
    seq          BIGSERIAL,
    number       TEXT NOT NULL REFERENCES numbers (number) ON DELETE CASCADE,
    chat         TEXT NOT NULL,
    sender       TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    sender_alt   TEXT,
    body         TEXT,                          -- whole text: until processed, or kept by tenant
    preview      TEXT NOT NULL,                 -- first 100 characters
    sent_at      BIGINT NOT NULL,
    received_at  BIGINT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'pending', -- pending | processed | dead
    processed_at BIGINT,
    error        TEXT,                          -- why it was dead-lettered
    PRIMARY KEY (number, chat, sender, message_id)
);
CREATE INDEX inbound_pending ON inbound (number, seq) WHERE status = 'pending';
CREATE INDEX inbound_dead ON inbound (number, seq) WHERE status = 'dead';

CREATE TABLE outbox (
    seq         BIGSERIAL,
    number      TEXT NOT NULL REFERENCES numbers (number) ON DELETE CASCADE,
    message_id  TEXT NOT NULL,                  -- deterministic: from the inbound id and step
    chat        TEXT NOT NULL,
    body        TEXT NOT NULL,
    reply_to    TEXT,
    status      TEXT NOT NULL DEFAULT 'queued', -- queued | sent | failed
    attempts    BIGINT NOT NULL DEFAULT 0,
    last_error  TEXT,
    created_at  BIGINT NOT NULL,
    sent_at     BIGINT,
    PRIMARY KEY (number, message_id)
);
CREATE INDEX outbox_queued ON outbox (number, seq) WHERE status = 'queued';

CREATE TABLE ai_jobs (
    id          TEXT PRIMARY KEY,
    number      TEXT NOT NULL REFERENCES numbers (number) ON DELETE CASCADE,
    chat        TEXT NOT NULL,
    inbound_id  TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    status      TEXT NOT NULL,                  -- running | done | failed
    result      TEXT,
    error       TEXT,
    created_at  BIGINT NOT NULL,
    finished_at BIGINT
);

CREATE TABLE flows (
    tenant_id    TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    version      BIGINT NOT NULL,
    status       TEXT NOT NULL,                 -- draft | published | retired
    definition   TEXT NOT NULL,                 -- JSON
    created_at   BIGINT NOT NULL,
    published_at BIGINT,
    PRIMARY KEY (tenant_id, name, version)
);

-- Events for webhooks and SSE, delivered from here with retries.
CREATE TABLE events (
    seq             BIGSERIAL PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    payload         TEXT NOT NULL,              -- JSON
    status          TEXT NOT NULL DEFAULT 'pending', -- pending | delivered | dead
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    delivered_at    BIGINT
);
CREATE INDEX events_due ON events (next_attempt_at) WHERE status = 'pending';

CREATE TABLE audit (
    seq       BIGSERIAL PRIMARY KEY,
    tenant_id TEXT,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    detail    TEXT NOT NULL,                    -- JSON
    at        BIGINT NOT NULL
);
CREATE INDEX audit_tenant ON audit (tenant_id, seq);
