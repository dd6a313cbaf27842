-- API tokens of the admin API: bearer secrets stored only as their SHA-256 (hex), each scoped to
-- one tenant with a role (admin, editor, viewer). A revoked token keeps its row, for the audit
-- log's sake, and authenticates nothing.
CREATE TABLE api_tokens (
    id         TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    role       TEXT NOT NULL,
    name       TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX api_tokens_tenant ON api_tokens (tenant_id, id);

-- The API lists a tenant's numbers in pages, by number.
CREATE INDEX numbers_tenant_number ON numbers (tenant_id, number);
