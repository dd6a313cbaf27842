//! The WhatsApp client's protocol state, per number: the SQL behind whatsapp-rust's store
//! traits. The adapter (`src/whatsapp/backend.rs`) maps each trait method onto these calls; no
//! SQL lives there.
//!
//! One table, `wa_state`, on the store's shared pool. A row is one entry of one [`Space`] of one
//! number, keyed by up to three parts (`k1`, `k2`, `k3`, empty when unused), with an optional
//! second lookup key `alt`, a value, and two numbers `n1`/`n2` that the queries filter or order
//! by. What each space keeps where:
//!
//! | space | k1, k2, k3 | alt | value | n1 | n2 |
//! |---|---|---|---|---|---|
//! | `identity` | Signal address | its user | identity key (sealed) | | |
//! | `session` | Signal address | its user | session record (sealed) | | |
//! | `prekey` | id | | record (sealed) | uploaded (0/1) | id |
//! | `signed_prekey` | id | | record (sealed) | | id |
//! | `sender_key` | sender-key address | | record (sealed) | | |
//! | `sync_key` | hex key id | | key as JSON (sealed) | | |
//! | `sync_key_latest` | '' | | the latest key id (sealed) | | |
//! | `app_version` | collection | | hash state as JSON | version | |
//! | `mutation_mac` | collection, hex index MAC | | value MAC | version | |
//! | `sender_key_device` | group, device | | '' | has key (0/1) | |
//! | `lid` | LID user | phone user | learning source | updated at | created at |
//! | `base_key` | address, message id | | base key | | |
//! | `device_list` | user | | record as JSON | timestamp | |
//! | `group_meta` | group | | blob | | |
//! | `tc_token` | JID | | token ('' = placeholder) | token time | sender time |
//! | `sent` | chat, message id | | payload (sealed) | sent at | |
//! | `pending_inbound` | chat, sender, id | | message (sealed) | stored at | |
//! | `msg_secret` | chat, sender, id | | secret (sealed) | expires at (0 = never) | message time |
//! | `device` | '' | | the device as JSON (sealed) | | |
//!
//! Times are Unix seconds, as the crate gives them. Sealed values are AES-256-GCM with the
//! session keys; the associated data is the number, the space and the key, so a value copied to
//! another row does not open. Every write runs in one transaction with the number's fence: a
//! stale token is refused ([`StoreError::Fenced`]). Batches are one statement per
//! [`MAX_STATEMENT_ROWS`] rows.

use sqlx::Row;
use sqlx::any::AnyRow;
use switchboard_actors::ids::PhoneNumber;
use switchboard_actors::store::{Fence, StoreError};

use super::cipher::Sealed;
use super::{AnyQuery, MAX_STATEMENT_ROWS, SqlStore, db, values_from};

/// A collection of one number's protocol state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    /// Identity keys of remote addresses.
    Identity,
    /// Signal sessions.
    Session,
    /// One-time pre-keys.
    PreKey,
    /// Signed pre-keys.
    SignedPreKey,
    /// Group sender keys.
    SenderKey,
    /// App-state sync keys.
    SyncKey,
    /// Which sync key was stored last.
    SyncKeyLatest,
    /// App-state collection versions.
    AppVersion,
    /// App-state mutation MACs.
    MutationMac,
    /// Which group devices hold our sender key.
    SenderKeyDevice,
    /// LID ↔ phone mappings.
    Lid,
    /// Base keys for retry collision detection.
    BaseKey,
    /// Device lists of users.
    DeviceList,
    /// Cached group metadata.
    GroupMeta,
    /// Trusted-contact privacy tokens.
    TcToken,
    /// Sent message payloads, kept for retry receipts.
    Sent,
    /// Decrypted inbound messages awaiting the durability hook's commit.
    PendingInbound,
    /// Message secrets of sent messages.
    MsgSecret,
    /// The device itself: its identity, keys and registration.
    Device,
}

impl Space {
    /// Its name in the `space` column.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Session => "session",
            Self::PreKey => "prekey",
            Self::SignedPreKey => "signed_prekey",
            Self::SenderKey => "sender_key",
            Self::SyncKey => "sync_key",
            Self::SyncKeyLatest => "sync_key_latest",
            Self::AppVersion => "app_version",
            Self::MutationMac => "mutation_mac",
            Self::SenderKeyDevice => "sender_key_device",
            Self::Lid => "lid",
            Self::BaseKey => "base_key",
            Self::DeviceList => "device_list",
            Self::GroupMeta => "group_meta",
            Self::TcToken => "tc_token",
            Self::Sent => "sent",
            Self::PendingInbound => "pending_inbound",
            Self::MsgSecret => "msg_secret",
            Self::Device => "device",
        }
    }

    /// Whether its values are secret: key material, or message content. Those are sealed.
    pub const fn sealed(self) -> bool {
        matches!(
            self,
            Self::Identity
                | Self::Session
                | Self::PreKey
                | Self::SignedPreKey
                | Self::SenderKey
                | Self::SyncKey
                | Self::SyncKeyLatest
                | Self::Sent
                | Self::PendingInbound
                | Self::MsgSecret
                | Self::Device
        )
    }
}

/// The key of a row within its space: up to three parts, `""` where unused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key<'a>(pub [&'a str; 3]);

impl<'a> Key<'a> {
    /// A one-part key.
    pub const fn one(k1: &'a str) -> Self {
        Self([k1, "", ""])
    }

    /// A two-part key.
    pub const fn two(k1: &'a str, k2: &'a str) -> Self {
        Self([k1, k2, ""])
    }

    /// A three-part key.
    pub const fn three(k1: &'a str, k2: &'a str, k3: &'a str) -> Self {
        Self([k1, k2, k3])
    }
}

/// One row to write.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Its space.
    pub space: Space,
    /// Its key.
    pub key: Key<'a>,
    /// Its second lookup key.
    pub alt: Option<&'a str>,
    /// Its value (sealed here if the space is secret).
    pub value: &'a [u8],
    /// Its first number.
    pub n1: i64,
    /// Its second number.
    pub n2: Option<i64>,
}

impl<'a> Entry<'a> {
    /// An entry with no `alt` and zero numbers.
    pub const fn new(space: Space, key: Key<'a>, value: &'a [u8]) -> Self {
        Self {
            space,
            key,
            alt: None,
            value,
            n1: 0,
            n2: None,
        }
    }
}

/// A row as read, its value opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRow {
    /// The key's three parts.
    pub key: [String; 3],
    /// The second lookup key.
    pub alt: Option<String>,
    /// The value.
    pub value: Vec<u8>,
    /// The first number.
    pub n1: i64,
    /// The second number.
    pub n2: Option<i64>,
}

/// Which rows of a space a read or delete touches.
#[derive(Debug, Clone, Copy)]
pub enum Select<'a> {
    /// Every row of the space.
    All,
    /// These keys.
    Keys(&'a [Key<'a>]),
    /// Rows whose first key part is this.
    First(&'a str),
    /// Rows whose second key part is one of these.
    SecondIn(&'a [&'a str]),
    /// Rows with this `alt`.
    Alt(&'a str),
    /// Rows whose `n1` is below this (a time the row was stored at).
    Before(i64),
    /// Rows whose `n1` is a deadline (0 = never) at or before this.
    DueBy(i64),
    /// Trusted-contact tokens with nothing live left: the token is a placeholder or older than
    /// the first cutoff, and the sender time is unset or older than the second.
    StaleTokens {
        /// Received tokens older than this are stale.
        token_cutoff: i64,
        /// Sender times older than this are stale.
        sender_cutoff: i64,
    },
}

/// How a write meets a row that is already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// The new row replaces it.
    Replace,
    /// Message secrets: the value is replaced, the later deadline wins (0 = never wins), and
    /// the later message time wins.
    Deadline,
    /// A received trusted-contact token: replaces a placeholder or an older token; the sender
    /// time is kept.
    NewerToken,
    /// A sender time: only moves forward; the token is kept.
    LaterSenderTime,
}

impl Merge {
    fn set_clause(self) -> &'static str {
        match self {
            Self::Replace => {
                "alt = excluded.alt, key_id = excluded.key_id, nonce = excluded.nonce, \
                 value = excluded.value, n1 = excluded.n1, n2 = excluded.n2"
            }
            Self::Deadline => {
                "key_id = excluded.key_id, nonce = excluded.nonce, value = excluded.value, \
                 n1 = CASE WHEN wa_state.n1 = 0 OR excluded.n1 = 0 THEN 0 \
                      WHEN excluded.n1 > wa_state.n1 THEN excluded.n1 ELSE wa_state.n1 END, \
                 n2 = CASE WHEN excluded.n2 > COALESCE(wa_state.n2, 0) THEN excluded.n2 \
                      ELSE COALESCE(wa_state.n2, 0) END"
            }
            Self::NewerToken => {
                "value = CASE WHEN length(wa_state.value) = 0 OR excluded.n1 >= wa_state.n1 \
                         THEN excluded.value ELSE wa_state.value END, \
                 n1 = CASE WHEN length(wa_state.value) = 0 OR excluded.n1 >= wa_state.n1 \
                      THEN excluded.n1 ELSE wa_state.n1 END"
            }
            Self::LaterSenderTime => {
                "n2 = CASE WHEN wa_state.n2 IS NULL OR excluded.n2 > wa_state.n2 \
                      THEN excluded.n2 ELSE wa_state.n2 END"
            }
        }
    }
}

/// One number's protocol state, written under its fence. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProtocolState {
    store: SqlStore,
    fence: Fence,
}

/// How much protocol state the store holds, over all numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// Rows of `wa_state`.
    pub rows: u64,
    /// Bytes of their keys and values (the data itself, without the database's per-row and
    /// index overhead).
    pub bytes: u64,
}

impl SqlStore {
    /// The protocol state of `fence`'s number, written under that fence.
    pub fn protocol_state(&self, fence: Fence) -> ProtocolState {
        ProtocolState {
            store: self.clone(),
            fence,
        }
    }

    /// The size of all numbers' protocol state.
    pub async fn protocol_footprint(&self) -> Result<Footprint, StoreError> {
        let (rows, bytes): (i64, Option<i64>) = self
            .watch
            .read(async {
                sqlx::query_as(
                    "SELECT COUNT(*), CAST(SUM(LENGTH(number) + LENGTH(space) + LENGTH(k1) \
                     + LENGTH(k2) + LENGTH(k3) + COALESCE(LENGTH(alt), 0) \
                     + COALESCE(LENGTH(key_id), 0) + COALESCE(LENGTH(nonce), 0) \
                     + LENGTH(value) + 16) AS BIGINT) FROM wa_state",
                )
                .fetch_one(&self.pool)
                .await
                .map_err(db)
            })
            .await?;
        Ok(Footprint {
            rows: u64::try_from(rows).unwrap_or(0),
            bytes: u64::try_from(bytes.unwrap_or(0)).unwrap_or(0),
        })
    }
}

const COLUMNS: &str = "number, space, k1, k2, k3, alt, key_id, nonce, value, n1, n2";
const ROW_COLUMNS: &str = "k1, k2, k3, alt, key_id, nonce, value, n1, n2";

/// Key rows per statement of a keyed read or delete (3 binds each).
const KEYS_PER_STATEMENT: usize = MAX_STATEMENT_ROWS;

impl ProtocolState {
    /// The number this state belongs to.
    pub fn number(&self) -> &PhoneNumber {
        &self.fence.number
    }

    /// The fence its writes carry.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Writes `entries` in one transaction, meeting existing rows as `merge` says. A key that
    /// appears more than once is written in order, as if one entry after the other: PostgreSQL
    /// refuses a statement that updates one row twice, so repeats go in later statements.
    pub async fn put(&self, entries: &[Entry<'_>], merge: Merge) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut sealed = Vec::with_capacity(entries.len());
        for e in entries {
            sealed.push(if e.space.sealed() {
                Some(self.seal(e.space, &e.key, e.value)?)
            } else {
                None
            });
        }
        let rows: Vec<(&Entry<'_>, Option<&Sealed>)> = entries
            .iter()
            .zip(sealed.iter().map(Option::as_ref))
            .collect();
        let passes = rounds(&rows, |(e, _)| (e.space, e.key));
        let number = self.fence.number.as_str();
        self.store
            .watch
            .write(async {
                let mut tx = self.store.fenced(&self.fence).await?;
                for round in &passes {
                    for chunk in round.chunks(MAX_STATEMENT_ROWS) {
                        let sql = format!(
                            "INSERT INTO wa_state ({COLUMNS}) VALUES {} \
                             ON CONFLICT (number, space, k1, k2, k3) DO UPDATE SET {}",
                            values_from(1, chunk.len(), 11),
                            merge.set_clause()
                        );
                        let mut q = sqlx::query(&sql);
                        for (e, seal) in chunk {
                            let [k1, k2, k3] = e.key.0;
                            q = q.bind(number).bind(e.space.as_str());
                            q = q.bind(k1).bind(k2).bind(k3).bind(e.alt);
                            q = match seal {
                                Some(s) => q
                                    .bind(Some(s.key_id.as_str()))
                                    .bind(Some(s.nonce.as_slice()))
                                    .bind(s.ciphertext.as_slice()),
                                None => q.bind(None::<&str>).bind(None::<&[u8]>).bind(e.value),
                            };
                            q = q.bind(e.n1).bind(e.n2);
                        }
                        q.execute(&mut *tx).await.map_err(db)?;
                    }
                }
                tx.commit().await.map_err(db)
            })
            .await
    }

    /// The rows of `space` that `select` names, in key order.
    pub async fn select(
        &self,
        space: Space,
        select: Select<'_>,
    ) -> Result<Vec<StateRow>, StoreError> {
        let mut out = Vec::new();
        for part in parts(select) {
            let sql = format!(
                "SELECT {ROW_COLUMNS} FROM wa_state WHERE number = $1 AND space = $2 AND {} \
                 ORDER BY k1, k2, k3",
                condition(part)
            );
            let rows = self
                .store
                .watch
                .read(async {
                    let q = self.scoped(&sql, space);
                    bind_select(q, part)
                        .fetch_all(&self.store.pool)
                        .await
                        .map_err(db)
                })
                .await?;
            for row in &rows {
                out.push(self.row_of(space, row)?);
            }
        }
        Ok(out)
    }

    /// The one row of `space` under `key`.
    pub async fn get(&self, space: Space, key: Key<'_>) -> Result<Option<StateRow>, StoreError> {
        Ok(self.select(space, Select::Keys(&[key])).await?.pop())
    }

    /// Whether any of `spaces` holds a row that `select` names.
    pub async fn exists(&self, spaces: &[Space], select: Select<'_>) -> Result<bool, StoreError> {
        for &space in spaces {
            for part in parts(select) {
                let sql = format!(
                    "SELECT 1 FROM wa_state WHERE number = $1 AND space = $2 AND {} LIMIT 1",
                    condition(part)
                );
                let found = self
                    .store
                    .watch
                    .read(async {
                        let q = self.scoped(&sql, space);
                        bind_select(q, part)
                            .fetch_optional(&self.store.pool)
                            .await
                            .map_err(db)
                    })
                    .await?;
                if found.is_some() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// The highest `n2` in `space`, if it holds any.
    pub async fn max_n2(&self, space: Space) -> Result<Option<i64>, StoreError> {
        self.store
            .watch
            .read(async {
                sqlx::query_scalar::<_, Option<i64>>(
                    "SELECT MAX(n2) FROM wa_state WHERE number = $1 AND space = $2",
                )
                .bind(self.fence.number.as_str())
                .bind(space.as_str())
                .fetch_one(&self.store.pool)
                .await
                .map_err(db)
            })
            .await
    }

    /// Deletes the rows of `space` that `select` names; returns how many went.
    pub async fn delete(&self, space: Space, select: Select<'_>) -> Result<u64, StoreError> {
        self.store
            .watch
            .write(async {
                let mut tx = self.store.fenced(&self.fence).await?;
                let mut deleted = 0;
                for part in parts(select) {
                    let sql = format!(
                        "DELETE FROM wa_state WHERE number = $1 AND space = $2 AND {}",
                        condition(part)
                    );
                    let q = self.scoped(&sql, space);
                    let done = bind_select(q, part).execute(&mut *tx).await.map_err(db)?;
                    deleted += done.rows_affected();
                }
                tx.commit().await.map_err(db)?;
                Ok(deleted)
            })
            .await
    }

    /// Deletes the row of `space` under `key` and returns it: one taker wins.
    pub async fn take(&self, space: Space, key: Key<'_>) -> Result<Option<StateRow>, StoreError> {
        let sql = format!(
            "DELETE FROM wa_state WHERE number = $1 AND space = $2 AND k1 = $3 AND k2 = $4 \
             AND k3 = $5 RETURNING {ROW_COLUMNS}"
        );
        let [k1, k2, k3] = key.0;
        let row = self
            .store
            .watch
            .write(async {
                let mut tx = self.store.fenced(&self.fence).await?;
                let row = self
                    .scoped(&sql, space)
                    .bind(k1)
                    .bind(k2)
                    .bind(k3)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok(row)
            })
            .await?;
        row.map(|r| self.row_of(space, &r)).transpose()
    }

    /// Sets `n1` of the rows of `space` under `keys` that exist (it inserts nothing).
    pub async fn set_n1(&self, space: Space, keys: &[Key<'_>], n1: i64) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.store
            .watch
            .write(async {
                let mut tx = self.store.fenced(&self.fence).await?;
                for chunk in keys.chunks(KEYS_PER_STATEMENT) {
                    let sql = format!(
                        "UPDATE wa_state SET n1 = $3 WHERE number = $1 AND space = $2 AND {}",
                        keys_condition(4, chunk.len())
                    );
                    let q = self.scoped(&sql, space).bind(n1);
                    bind_keys(q, chunk).execute(&mut *tx).await.map_err(db)?;
                }
                tx.commit().await.map_err(db)
            })
            .await
    }

    /// A query on this number's rows of `space`: `$1` and `$2` bound.
    fn scoped<'q>(&'q self, sql: &'q str, space: Space) -> AnyQuery<'q> {
        sqlx::query(sql)
            .bind(self.fence.number.as_str())
            .bind(space.as_str())
    }

    fn aad(&self, space: Space, key: [&str; 3]) -> String {
        let [k1, k2, k3] = key;
        format!(
            "{}\u{1f}{}\u{1f}{k1}\u{1f}{k2}\u{1f}{k3}",
            self.fence.number,
            space.as_str()
        )
    }

    fn seal(&self, space: Space, key: &Key<'_>, value: &[u8]) -> Result<Sealed, StoreError> {
        self.store
            .cipher
            .seal(&self.aad(space, key.0), value)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    fn row_of(&self, space: Space, row: &AnyRow) -> Result<StateRow, StoreError> {
        let key: [String; 3] = [
            row.try_get("k1").map_err(db)?,
            row.try_get("k2").map_err(db)?,
            row.try_get("k3").map_err(db)?,
        ];
        let stored: Vec<u8> = row.try_get("value").map_err(db)?;
        let key_id: Option<String> = row.try_get("key_id").map_err(db)?;
        let value = match key_id {
            None => stored,
            Some(key_id) => {
                let sealed = Sealed {
                    key_id,
                    nonce: row
                        .try_get::<Option<Vec<u8>>, _>("nonce")
                        .map_err(db)?
                        .unwrap_or_default(),
                    ciphertext: stored,
                };
                let aad = self.aad(space, [&key[0], &key[1], &key[2]]);
                self.store
                    .cipher
                    .open(&aad, &sealed)
                    .map_err(|e| StoreError::Corrupt(format!("{} {key:?}: {e}", space.as_str())))?
            }
        };
        Ok(StateRow {
            key,
            alt: row.try_get("alt").map_err(db)?,
            value,
            n1: row.try_get("n1").map_err(db)?,
            n2: row.try_get("n2").map_err(db)?,
        })
    }
}

/// `items` in rounds with no key twice in one round, each item in the round after its key's
/// previous one, order kept within a round: writing the rounds in turn is writing the items one
/// by one.
fn rounds<T: Copy, K: std::hash::Hash + Eq>(items: &[T], key: impl Fn(&T) -> K) -> Vec<Vec<T>> {
    let mut seen: std::collections::HashMap<K, usize> = std::collections::HashMap::new();
    let mut rounds: Vec<Vec<T>> = Vec::new();
    for item in items {
        let n = seen.entry(key(item)).or_insert(0);
        if rounds.len() <= *n {
            rounds.push(Vec::new());
        }
        rounds[*n].push(*item);
        *n += 1;
    }
    rounds
}

/// `select`, split so that no statement binds more than [`KEYS_PER_STATEMENT`] keys.
fn parts(select: Select<'_>) -> Vec<Select<'_>> {
    match select {
        Select::Keys([]) | Select::SecondIn([]) => Vec::new(),
        Select::Keys(keys) => keys.chunks(KEYS_PER_STATEMENT).map(Select::Keys).collect(),
        Select::SecondIn(parts) => parts
            .chunks(KEYS_PER_STATEMENT)
            .map(Select::SecondIn)
            .collect(),
        other => vec![other],
    }
}

/// The condition `select` adds after `number = $1 AND space = $2`, its parameters from `$3`.
fn condition(select: Select<'_>) -> String {
    match select {
        Select::All => "TRUE".into(),
        Select::Keys(keys) => keys_condition(3, keys.len()),
        Select::First(_) => "k1 = $3".into(),
        Select::SecondIn(parts) => {
            let list: Vec<String> = (0..parts.len()).map(|i| format!("${}", i + 3)).collect();
            format!("k2 IN ({})", list.join(", "))
        }
        Select::Alt(_) => "alt = $3".into(),
        Select::Before(_) => "n1 < $3".into(),
        Select::DueBy(_) => "n1 <> 0 AND n1 <= $3".into(),
        Select::StaleTokens { .. } => {
            "(length(value) = 0 OR n1 < $3) AND (n2 IS NULL OR n2 < $4)".into()
        }
    }
}

/// `(k1, k2, k3) IN (VALUES ($first, …), …)` for `n` keys.
fn keys_condition(first: usize, n: usize) -> String {
    format!("(k1, k2, k3) IN (VALUES {})", values_from(first, n, 3))
}

fn bind_select<'q>(q: AnyQuery<'q>, select: Select<'q>) -> AnyQuery<'q> {
    match select {
        Select::All => q,
        Select::Keys(keys) => bind_keys(q, keys),
        Select::First(k1) => q.bind(k1),
        Select::SecondIn(parts) => parts.iter().fold(q, |q, p| q.bind(*p)),
        Select::Alt(alt) => q.bind(alt),
        Select::Before(t) | Select::DueBy(t) => q.bind(t),
        Select::StaleTokens {
            token_cutoff,
            sender_cutoff,
        } => q.bind(token_cutoff).bind(sender_cutoff),
    }
}

fn bind_keys<'q>(q: AnyQuery<'q>, keys: &'q [Key<'q>]) -> AnyQuery<'q> {
    keys.iter().fold(q, |q, k| {
        let [k1, k2, k3] = k.0;
        q.bind(k1).bind(k2).bind(k3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_conditions_number_their_parameters_after_the_scope() {
        assert_eq!(
            condition(Select::Keys(&[Key::one("a"), Key::two("b", "c")])),
            "(k1, k2, k3) IN (VALUES ($3, $4, $5), ($6, $7, $8))"
        );
        assert_eq!(condition(Select::SecondIn(&["x", "y"])), "k2 IN ($3, $4)");
    }

    #[test]
    fn large_key_lists_split_into_statements_and_empty_ones_into_none() {
        let keys: Vec<Key<'_>> = (0..KEYS_PER_STATEMENT + 1).map(|_| Key::one("k")).collect();
        let split = parts(Select::Keys(&keys));
        assert_eq!(split.len(), 2);
        assert!(parts(Select::Keys(&[])).is_empty());
        assert!(parts(Select::SecondIn(&[])).is_empty());
        assert_eq!(parts(Select::All).len(), 1);
    }

    #[test]
    fn repeated_keys_go_in_later_rounds_in_order() {
        let items = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("c", 5)];
        let r = rounds(&items, |(k, _)| *k);
        assert_eq!(
            r,
            vec![
                vec![("a", 1), ("b", 2), ("c", 5)],
                vec![("a", 3)],
                vec![("a", 4)]
            ]
        );
        assert_eq!(rounds(&[("x", 1)], |(k, _)| *k).len(), 1);
    }

    #[test]
    fn key_material_and_message_content_are_sealed() {
        for space in [
            Space::Identity,
            Space::Session,
            Space::Device,
            Space::PendingInbound,
        ] {
            assert!(space.sealed(), "{}", space.as_str());
        }
        for space in [Space::Lid, Space::DeviceList, Space::MutationMac] {
            assert!(!space.sealed(), "{}", space.as_str());
        }
    }
}
