-- Outages, retention and one node per store.
--
-- 1. `store_probe`: the one row the store writes while it is down, to learn when writes work again.
-- 2. BRIN indexes on arrival times, so that pruning processed inbound and sent outbox rows finds
--    the old ones without an index entry per row on the hot path (a BRIN index summarises
--    ranges of the table, which is filled in arrival order).
-- 3. `node_claims`: which node runs this store (one node per store until the cluster issue).
CREATE TABLE store_probe (
    id        INTEGER PRIMARY KEY,
    probed_at BIGINT NOT NULL
);
INSERT INTO store_probe (id, probed_at) VALUES (1, 0);

CREATE INDEX inbound_received_brin ON inbound USING brin (received_at);
CREATE INDEX outbox_created_brin ON outbox USING brin (created_at);

CREATE TABLE node_claims (
    id         INTEGER PRIMARY KEY,
    node       TEXT NOT NULL,
    host       TEXT NOT NULL,
    pid        BIGINT NOT NULL,
    claimed_at BIGINT NOT NULL
);
