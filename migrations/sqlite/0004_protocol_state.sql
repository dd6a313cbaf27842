-- The WhatsApp client's protocol state (whatsapp-rust's store traits), per number, in one table.
--
-- A row is one entry of one collection (`space`: identity, session, prekey, …) of one number,
-- keyed by up to three parts (`k1`, `k2`, `k3`; '' when unused). `alt` is a second lookup key
-- (the phone of a LID mapping, the user of a Signal address). `n1`/`n2` are the numbers the
-- collection is queried by (ids, timestamps, flags). Secret values are AES-256-GCM sealed like
-- session blobs: `key_id` and `nonce` are set, and `value` is the ciphertext; plain values have
-- both NULL. The module `src/store/protocol.rs` documents what each space keeps where.
CREATE TABLE wa_state (
    number TEXT NOT NULL REFERENCES numbers (number) ON DELETE CASCADE,
    space  TEXT NOT NULL,
    k1     TEXT NOT NULL,
    k2     TEXT NOT NULL DEFAULT '',
    k3     TEXT NOT NULL DEFAULT '',
    alt    TEXT,
    key_id TEXT,
    nonce  BLOB,
    value  BLOB NOT NULL,
    n1     INTEGER NOT NULL DEFAULT 0,
    n2     INTEGER,
    PRIMARY KEY (number, space, k1, k2, k3)
);

CREATE INDEX wa_state_alt ON wa_state (number, space, alt) WHERE alt IS NOT NULL;
