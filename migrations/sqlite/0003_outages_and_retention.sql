-- Outages, retention and one node per store.
--
-- 1. `store_probe`: the one row the store writes while it is down, to learn when writes work again.
-- 2. `node_claims`: which node runs this store (one node per store until the cluster issue).
-- Pruning walks `seq` (the rowid, in arrival order): no index needed.
CREATE TABLE store_probe (
    id        INTEGER PRIMARY KEY,
    probed_at INTEGER NOT NULL
);
INSERT INTO store_probe (id, probed_at) VALUES (1, 0);

CREATE TABLE node_claims (
    id         INTEGER PRIMARY KEY,
    node       TEXT NOT NULL,
    host       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    claimed_at INTEGER NOT NULL
);
