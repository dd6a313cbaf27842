//! whatsapp-rust's storage `Backend` over Switchboard's store: the five store traits
//! (`SignalStore`, `AppSyncStore`, `ProtocolStore`, `MsgSecretStore`, `DeviceStore`) and the
//! pending-inbound buffer the durability hook needs.
//!
//! One [`WaBackend`] per number, all of them on the store's one pool. Every method is a call on
//! the number's [`ProtocolState`] (the SQL lives in `src/store/protocol.rs`); this file only
//! says which space and key each method means, and how values are encoded. Writes carry the
//! number's fence; a stale one fails the write (the client sees a database error) and
//! revokes the lease, which stops the number.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use switchboard_actors::coordinator::{FenceLoss, Lease};
use switchboard_actors::store::StoreError;
use switchboard_actors::telemetry::FENCING_REFUSALS;
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::stats::StorageResourceReport;
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::error::{Result, StoreError as WaStoreError};
use whatsapp_rust::wacore::store::traits::{
    AppStateSyncKey, AppSyncStore, DeviceListRecord, DeviceStore, LidPnMappingEntry,
    MsgSecretEntry, MsgSecretStore, PendingInboundKey, PendingInboundRow, ProtocolStore,
    SignalStore, TcTokenEntry,
};

use crate::store::{Entry, Key, Merge, ProtocolState, Select, Space, StateRow};

/// The storage of one number's WhatsApp client.
#[derive(Debug, Clone)]
pub struct WaBackend {
    state: ProtocolState,
    lease: Lease,
}

impl WaBackend {
    /// The backend over `state` (see `SqlStore::protocol_state`), written under `lease`: a write
    /// refused as fenced revokes it, which stops the number.
    pub fn new(state: ProtocolState, lease: Lease) -> Self {
        Self { state, lease }
    }

    /// The store's error as the crate's (see [`wa`]); a fenced write first revokes the lease.
    fn wa(&self, e: StoreError) -> WaStoreError {
        if matches!(e, StoreError::Fenced { .. }) {
            metrics::counter!(FENCING_REFUSALS).increment(1);
            self.lease.revoke(FenceLoss::StoreRefused);
        }
        wa(e)
    }

    /// The state it writes to.
    pub fn state(&self) -> &ProtocolState {
        &self.state
    }

    async fn value(&self, space: Space, key: Key<'_>) -> Result<Option<Vec<u8>>> {
        Ok(self
            .state
            .get(space, key)
            .await
            .map_err(|e| self.wa(e))?
            .map(|r| r.value))
    }

    async fn put_one(&self, entry: Entry<'_>) -> Result<()> {
        self.state
            .put(&[entry], Merge::Replace)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn delete(&self, space: Space, select: Select<'_>) -> Result<u32> {
        let n = self
            .state
            .delete(space, select)
            .await
            .map_err(|e| self.wa(e))?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

/// The store's error as the crate's: outages are connection errors, undecodable rows
/// serialization errors, the rest (a stale fence among them) database errors. The original is
/// the source. (A fence loss here fails the client's write, and [`WaBackend::wa`] revokes the
/// number's lease: the one path by which a number stops on losing its ownership.)
fn wa(e: StoreError) -> WaStoreError {
    match e {
        StoreError::Unavailable(_) | StoreError::Closed => WaStoreError::Connection(Box::new(e)),
        StoreError::Corrupt(_) => WaStoreError::Serialization(Box::new(e)),
        other => WaStoreError::Database(Box::new(other)),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| WaStoreError::Serialization(Box::new(e)))
}

fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| WaStoreError::Serialization(Box::new(e)))
}

/// The user part of a Signal address (`user@server` or `user:device@server`).
fn user_of(address: &str) -> &str {
    address
        .find(['@', ':'])
        .map_or(address, |end| &address[..end])
}

fn key32(bytes: &[u8], what: &str) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| WaStoreError::Validation(format!("{what} has {} bytes, not 32", bytes.len())))
}

fn id_of(row: &StateRow) -> Result<u32> {
    row.key[0]
        .parse()
        .map_err(|_| WaStoreError::Validation(format!("key id {:?} is not a number", row.key[0])))
}

fn lid_entry(row: StateRow) -> Result<LidPnMappingEntry> {
    let [lid, ..] = row.key;
    Ok(LidPnMappingEntry {
        lid,
        phone_number: row.alt.unwrap_or_default(),
        created_at: row.n2.unwrap_or(row.n1),
        updated_at: row.n1,
        learning_source: String::from_utf8(row.value)
            .map_err(|e| WaStoreError::Serialization(Box::new(e)))?,
    })
}

fn lid_row(e: &LidPnMappingEntry) -> Entry<'_> {
    Entry {
        alt: Some(&e.phone_number),
        n1: e.updated_at,
        n2: Some(e.created_at),
        ..Entry::new(Space::Lid, Key::one(&e.lid), e.learning_source.as_bytes())
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[async_trait]
impl SignalStore for WaBackend {
    async fn put_identity(&self, address: &str, key: [u8; 32]) -> Result<()> {
        self.put_identities_batch(&[(Arc::from(address), key)])
            .await
    }

    async fn put_identities_batch(&self, identities: &[(Arc<str>, [u8; 32])]) -> Result<()> {
        let rows: Vec<Entry<'_>> = identities
            .iter()
            .map(|(address, key)| Entry {
                alt: Some(user_of(address)),
                ..Entry::new(Space::Identity, Key::one(address), key)
            })
            .collect();
        self.state
            .put(&rows, Merge::Replace)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn load_identity(&self, address: &str) -> Result<Option<[u8; 32]>> {
        self.value(Space::Identity, Key::one(address))
            .await?
            .map(|v| key32(&v, "identity key"))
            .transpose()
    }

    async fn delete_identity(&self, address: &str) -> Result<()> {
        let keys = [Key::one(address)];
        self.delete(Space::Identity, Select::Keys(&keys))
            .await
            .map(drop)
    }

    async fn get_session(&self, address: &str) -> Result<Option<Bytes>> {
        Ok(self
            .value(Space::Session, Key::one(address))
            .await?
            .map(Bytes::from))
    }

    async fn put_session(&self, address: &str, session: &[u8]) -> Result<()> {
        self.put_one(Entry {
            alt: Some(user_of(address)),
            ..Entry::new(Space::Session, Key::one(address), session)
        })
        .await
    }

    async fn put_sessions_batch(&self, sessions: &[(Arc<str>, Bytes)]) -> Result<()> {
        let rows: Vec<Entry<'_>> = sessions
            .iter()
            .map(|(address, record)| Entry {
                alt: Some(user_of(address)),
                ..Entry::new(Space::Session, Key::one(address), record)
            })
            .collect();
        self.state
            .put(&rows, Merge::Replace)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn delete_session(&self, address: &str) -> Result<()> {
        let keys = [Key::one(address)];
        self.delete(Space::Session, Select::Keys(&keys))
            .await
            .map(drop)
    }

    async fn has_session(&self, address: &str) -> Result<bool> {
        let keys = [Key::one(address)];
        self.state
            .exists(&[Space::Session], Select::Keys(&keys))
            .await
            .map_err(|e| self.wa(e))
    }

    async fn has_signal_state_for_user(&self, user: &str) -> Result<bool> {
        self.state
            .exists(&[Space::Session, Space::Identity], Select::Alt(user))
            .await
            .map_err(|e| self.wa(e))
    }

    async fn store_prekey(&self, id: u32, record: &[u8], uploaded: bool) -> Result<()> {
        self.store_prekeys_batch(&[(id, Bytes::copy_from_slice(record))], uploaded)
            .await
    }

    async fn store_prekeys_batch(&self, keys: &[(u32, Bytes)], uploaded: bool) -> Result<()> {
        let ids: Vec<String> = keys.iter().map(|(id, _)| id.to_string()).collect();
        let rows: Vec<Entry<'_>> = keys
            .iter()
            .zip(&ids)
            .map(|((id, record), key)| Entry {
                n1: i64::from(uploaded),
                n2: Some(i64::from(*id)),
                ..Entry::new(Space::PreKey, Key::one(key), record)
            })
            .collect();
        self.state
            .put(&rows, Merge::Replace)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn load_prekey(&self, id: u32) -> Result<Option<Bytes>> {
        let id = id.to_string();
        Ok(self
            .value(Space::PreKey, Key::one(&id))
            .await?
            .map(Bytes::from))
    }

    async fn load_prekeys_batch(&self, ids: &[u32]) -> Result<Vec<(u32, Bytes)>> {
        let names: Vec<String> = ids.iter().map(u32::to_string).collect();
        let keys: Vec<Key<'_>> = names.iter().map(|n| Key::one(n)).collect();
        let rows = self
            .state
            .select(Space::PreKey, Select::Keys(&keys))
            .await
            .map_err(|e| self.wa(e))?;
        let mut found: HashMap<u32, Bytes> = HashMap::with_capacity(rows.len());
        for row in rows {
            found.insert(id_of(&row)?, Bytes::from(row.value));
        }
        // In the order asked for, as the crate's own backends answer.
        Ok(ids
            .iter()
            .filter_map(|id| found.remove(id).map(|r| (*id, r)))
            .collect())
    }

    async fn mark_prekeys_uploaded(&self, ids: &[u32]) -> Result<()> {
        let names: Vec<String> = ids.iter().map(u32::to_string).collect();
        let keys: Vec<Key<'_>> = names.iter().map(|n| Key::one(n)).collect();
        self.state
            .set_n1(Space::PreKey, &keys, 1)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn remove_prekey(&self, id: u32) -> Result<()> {
        let id = id.to_string();
        let keys = [Key::one(&id)];
        self.delete(Space::PreKey, Select::Keys(&keys))
            .await
            .map(drop)
    }

    async fn get_max_prekey_id(&self) -> Result<u32> {
        let max = self
            .state
            .max_n2(Space::PreKey)
            .await
            .map_err(|e| self.wa(e))?;
        Ok(max.and_then(|m| u32::try_from(m).ok()).unwrap_or(0))
    }

    async fn store_signed_prekey(&self, id: u32, record: &[u8]) -> Result<()> {
        let key = id.to_string();
        self.put_one(Entry {
            n2: Some(i64::from(id)),
            ..Entry::new(Space::SignedPreKey, Key::one(&key), record)
        })
        .await
    }

    async fn load_signed_prekey(&self, id: u32) -> Result<Option<Vec<u8>>> {
        let id = id.to_string();
        self.value(Space::SignedPreKey, Key::one(&id)).await
    }

    async fn load_all_signed_prekeys(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        let rows = self
            .state
            .select(Space::SignedPreKey, Select::All)
            .await
            .map_err(|e| self.wa(e))?;
        rows.into_iter()
            .map(|row| Ok((id_of(&row)?, row.value)))
            .collect()
    }

    async fn remove_signed_prekey(&self, id: u32) -> Result<()> {
        let id = id.to_string();
        let keys = [Key::one(&id)];
        self.delete(Space::SignedPreKey, Select::Keys(&keys))
            .await
            .map(drop)
    }

    async fn put_sender_key(&self, address: &str, record: &[u8]) -> Result<()> {
        self.put_one(Entry::new(Space::SenderKey, Key::one(address), record))
            .await
    }

    async fn put_sender_keys_batch(&self, sender_keys: &[(Arc<str>, Bytes)]) -> Result<()> {
        let rows: Vec<Entry<'_>> = sender_keys
            .iter()
            .map(|(address, record)| Entry::new(Space::SenderKey, Key::one(address), record))
            .collect();
        self.state
            .put(&rows, Merge::Replace)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn get_sender_key(&self, address: &str) -> Result<Option<Vec<u8>>> {
        self.value(Space::SenderKey, Key::one(address)).await
    }

    async fn delete_sender_key(&self, address: &str) -> Result<()> {
        let keys = [Key::one(address)];
        self.delete(Space::SenderKey, Select::Keys(&keys))
            .await
            .map(drop)
    }
}

#[async_trait]
impl AppSyncStore for WaBackend {
    async fn get_sync_key(&self, key_id: &[u8]) -> Result<Option<AppStateSyncKey>> {
        let id = hex::encode(key_id);
        self.value(Space::SyncKey, Key::one(&id))
            .await?
            .map(|v| from_json(&v))
            .transpose()
    }

    async fn set_sync_key(&self, key_id: &[u8], key: AppStateSyncKey) -> Result<()> {
        let id = hex::encode(key_id);
        let json = to_json(&key)?;
        let rows = [
            Entry::new(Space::SyncKey, Key::one(&id), &json),
            Entry::new(Space::SyncKeyLatest, Key::one(""), key_id),
        ];
        self.state
            .put(&rows, Merge::Replace)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn get_version(&self, name: &str) -> Result<HashState> {
        match self.value(Space::AppVersion, Key::one(name)).await? {
            Some(v) => from_json(&v),
            None => Ok(HashState::default()),
        }
    }

    async fn set_version(&self, name: &str, state: HashState) -> Result<()> {
        let json = to_json(&state)?;
        self.put_one(Entry {
            n1: i64::try_from(state.version).unwrap_or(i64::MAX),
            ..Entry::new(Space::AppVersion, Key::one(name), &json)
        })
        .await
    }

    async fn put_mutation_macs(
        &self,
        name: &str,
        version: u64,
        mutations: &[AppStateMutationMAC],
    ) -> Result<()> {
        let macs: Vec<String> = mutations
            .iter()
            .map(|m| hex::encode(&m.index_mac))
            .collect();
        let version = i64::try_from(version).unwrap_or(i64::MAX);
        let rows: Vec<Entry<'_>> = mutations
            .iter()
            .zip(&macs)
            .map(|(m, index)| Entry {
                n1: version,
                ..Entry::new(Space::MutationMac, Key::two(name, index), &m.value_mac)
            })
            .collect();
        self.state
            .put(&rows, Merge::Replace)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn get_mutation_mac(&self, name: &str, index_mac: &[u8]) -> Result<Option<Vec<u8>>> {
        let index = hex::encode(index_mac);
        self.value(Space::MutationMac, Key::two(name, &index)).await
    }

    async fn get_mutation_macs(
        &self,
        name: &str,
        index_macs: &[[u8; 32]],
    ) -> Result<HashMap<[u8; 32], Vec<u8>>> {
        let hexes: Vec<String> = index_macs.iter().map(hex::encode).collect();
        let keys: Vec<Key<'_>> = hexes.iter().map(|h| Key::two(name, h)).collect();
        let rows = self
            .state
            .select(Space::MutationMac, Select::Keys(&keys))
            .await
            .map_err(|e| self.wa(e))?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in rows {
            let index =
                hex::decode(&row.key[1]).map_err(|e| WaStoreError::Serialization(Box::new(e)))?;
            out.insert(key32(&index, "index MAC")?, row.value);
        }
        Ok(out)
    }

    async fn delete_mutation_macs(&self, name: &str, index_macs: &[Vec<u8>]) -> Result<()> {
        let hexes: Vec<String> = index_macs.iter().map(hex::encode).collect();
        let keys: Vec<Key<'_>> = hexes.iter().map(|h| Key::two(name, h)).collect();
        self.delete(Space::MutationMac, Select::Keys(&keys))
            .await
            .map(drop)
    }

    async fn clear_mutation_macs(&self, name: &str) -> Result<()> {
        self.delete(Space::MutationMac, Select::First(name))
            .await
            .map(drop)
    }

    async fn get_latest_sync_key_id(&self) -> Result<Option<Vec<u8>>> {
        self.value(Space::SyncKeyLatest, Key::one("")).await
    }
}

#[async_trait]
impl ProtocolStore for WaBackend {
    async fn get_sender_key_devices(&self, group_jid: &str) -> Result<Vec<(String, bool)>> {
        let rows = self
            .state
            .select(Space::SenderKeyDevice, Select::First(group_jid))
            .await
            .map_err(|e| self.wa(e))?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let [_, device, _] = row.key;
                (device, row.n1 != 0)
            })
            .collect())
    }

    async fn set_sender_key_status(&self, group_jid: &str, entries: &[(&str, bool)]) -> Result<()> {
        let rows: Vec<Entry<'_>> = entries
            .iter()
            .map(|(device, has_key)| Entry {
                n1: i64::from(*has_key),
                ..Entry::new(Space::SenderKeyDevice, Key::two(group_jid, device), b"")
            })
            .collect();
        self.state
            .put(&rows, Merge::Replace)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn clear_sender_key_devices(&self, group_jid: &str) -> Result<()> {
        self.delete(Space::SenderKeyDevice, Select::First(group_jid))
            .await
            .map(drop)
    }

    async fn delete_sender_key_device_rows(&self, device_jids: &[&str]) -> Result<()> {
        self.delete(Space::SenderKeyDevice, Select::SecondIn(device_jids))
            .await
            .map(drop)
    }

    async fn clear_all_sender_key_devices(&self) -> Result<()> {
        self.delete(Space::SenderKeyDevice, Select::All)
            .await
            .map(drop)
    }

    async fn get_lid_mapping(&self, lid: &str) -> Result<Option<LidPnMappingEntry>> {
        self.state
            .get(Space::Lid, Key::one(lid))
            .await
            .map_err(|e| self.wa(e))?
            .map(lid_entry)
            .transpose()
    }

    async fn get_pn_mapping(&self, phone: &str) -> Result<Option<LidPnMappingEntry>> {
        let rows = self
            .state
            .select(Space::Lid, Select::Alt(phone))
            .await
            .map_err(|e| self.wa(e))?;
        // The most recently updated LID of that phone.
        rows.into_iter()
            .max_by_key(|r| r.n1)
            .map(lid_entry)
            .transpose()
    }

    async fn put_lid_mapping(&self, entry: &LidPnMappingEntry) -> Result<()> {
        self.put_one(lid_row(entry)).await
    }

    async fn put_lid_mappings(&self, entries: &[LidPnMappingEntry]) -> Result<()> {
        let rows: Vec<Entry<'_>> = entries.iter().map(lid_row).collect();
        self.state
            .put(&rows, Merge::Replace)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn get_all_lid_mappings(&self) -> Result<Vec<LidPnMappingEntry>> {
        let rows = self
            .state
            .select(Space::Lid, Select::All)
            .await
            .map_err(|e| self.wa(e))?;
        rows.into_iter().map(lid_entry).collect()
    }

    async fn save_base_key(&self, address: &str, message_id: &str, base_key: &[u8]) -> Result<()> {
        self.put_one(Entry::new(
            Space::BaseKey,
            Key::two(address, message_id),
            base_key,
        ))
        .await
    }

    async fn has_same_base_key(
        &self,
        address: &str,
        message_id: &str,
        current_base_key: &[u8],
    ) -> Result<bool> {
        let stored = self
            .value(Space::BaseKey, Key::two(address, message_id))
            .await?;
        Ok(stored.is_some_and(|k| k == current_base_key))
    }

    async fn delete_base_key(&self, address: &str, message_id: &str) -> Result<()> {
        let keys = [Key::two(address, message_id)];
        self.delete(Space::BaseKey, Select::Keys(&keys))
            .await
            .map(drop)
    }

    async fn update_device_list(&self, record: DeviceListRecord) -> Result<()> {
        self.update_device_lists(vec![record]).await
    }

    async fn update_device_lists(&self, records: Vec<DeviceListRecord>) -> Result<()> {
        let jsons = records.iter().map(to_json).collect::<Result<Vec<_>>>()?;
        let rows: Vec<Entry<'_>> = records
            .iter()
            .zip(&jsons)
            .map(|(r, json)| Entry {
                n1: r.timestamp,
                ..Entry::new(Space::DeviceList, Key::one(&r.user), json)
            })
            .collect();
        self.state
            .put(&rows, Merge::Replace)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn get_devices(&self, user: &str) -> Result<Option<DeviceListRecord>> {
        self.value(Space::DeviceList, Key::one(user))
            .await?
            .map(|v| from_json(&v))
            .transpose()
    }

    async fn delete_devices(&self, user: &str) -> Result<()> {
        let keys = [Key::one(user)];
        self.delete(Space::DeviceList, Select::Keys(&keys))
            .await
            .map(drop)
    }

    async fn get_group_metadata(&self, group_jid: &str) -> Result<Option<Vec<u8>>> {
        self.value(Space::GroupMeta, Key::one(group_jid)).await
    }

    async fn put_group_metadata(&self, group_jid: &str, blob: &[u8]) -> Result<()> {
        self.put_one(Entry::new(Space::GroupMeta, Key::one(group_jid), blob))
            .await
    }

    async fn delete_group_metadata(&self, group_jid: &str) -> Result<()> {
        let keys = [Key::one(group_jid)];
        self.delete(Space::GroupMeta, Select::Keys(&keys))
            .await
            .map(drop)
    }

    async fn get_tc_token(&self, jid: &str) -> Result<Option<TcTokenEntry>> {
        Ok(self
            .state
            .get(Space::TcToken, Key::one(jid))
            .await
            .map_err(|e| self.wa(e))?
            .map(|row| TcTokenEntry {
                token: row.value,
                token_timestamp: row.n1,
                sender_timestamp: row.n2,
            }))
    }

    async fn put_tc_token(&self, jid: &str, entry: &TcTokenEntry) -> Result<()> {
        self.put_one(Entry {
            n1: entry.token_timestamp,
            n2: entry.sender_timestamp,
            ..Entry::new(Space::TcToken, Key::one(jid), &entry.token)
        })
        .await
    }

    async fn delete_tc_token(&self, jid: &str) -> Result<()> {
        let keys = [Key::one(jid)];
        self.delete(Space::TcToken, Select::Keys(&keys))
            .await
            .map(drop)
    }

    async fn get_all_tc_token_jids(&self) -> Result<Vec<String>> {
        let rows = self
            .state
            .select(Space::TcToken, Select::All)
            .await
            .map_err(|e| self.wa(e))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let [jid, ..] = r.key;
                jid
            })
            .collect())
    }

    async fn delete_expired_tc_tokens(&self, token_cutoff: i64, sender_cutoff: i64) -> Result<u32> {
        self.delete(
            Space::TcToken,
            Select::StaleTokens {
                token_cutoff,
                sender_cutoff,
            },
        )
        .await
    }

    async fn touch_tc_token_sender_timestamp(
        &self,
        jid: &str,
        sender_timestamp: i64,
    ) -> Result<()> {
        let row = Entry {
            n1: sender_timestamp,
            n2: Some(sender_timestamp),
            ..Entry::new(Space::TcToken, Key::one(jid), b"")
        };
        self.state
            .put(&[row], Merge::LaterSenderTime)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn store_received_tc_token(
        &self,
        jid: &str,
        token: &[u8],
        token_timestamp: i64,
    ) -> Result<()> {
        let row = Entry {
            n1: token_timestamp,
            ..Entry::new(Space::TcToken, Key::one(jid), token)
        };
        self.state
            .put(&[row], Merge::NewerToken)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn store_sent_message(
        &self,
        chat_jid: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<()> {
        self.put_one(Entry {
            n1: now_secs(),
            ..Entry::new(Space::Sent, Key::two(chat_jid, message_id), payload)
        })
        .await
    }

    async fn take_sent_message(&self, chat_jid: &str, message_id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .state
            .take(Space::Sent, Key::two(chat_jid, message_id))
            .await
            .map_err(|e| self.wa(e))?
            .map(|r| r.value))
    }

    async fn delete_expired_sent_messages(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.delete(Space::Sent, Select::Before(cutoff_timestamp))
            .await
    }

    async fn store_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
        message: &[u8],
    ) -> Result<()> {
        self.store_pending_inbound_batch(&[PendingInboundRow {
            chat,
            sender,
            id,
            message,
        }])
        .await
    }

    async fn get_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
    ) -> Result<Option<Vec<u8>>> {
        self.value(Space::PendingInbound, Key::three(chat, sender, id))
            .await
    }

    async fn delete_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> Result<()> {
        self.delete_pending_inbound_batch(&[PendingInboundKey { chat, sender, id }])
            .await
    }

    async fn delete_expired_pending_inbound(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.delete(Space::PendingInbound, Select::Before(cutoff_timestamp))
            .await
    }

    async fn store_pending_inbound_batch(&self, rows: &[PendingInboundRow<'_>]) -> Result<()> {
        let now = now_secs();
        let entries: Vec<Entry<'_>> = rows
            .iter()
            .map(|r| Entry {
                n1: now,
                ..Entry::new(
                    Space::PendingInbound,
                    Key::three(r.chat, r.sender, r.id),
                    r.message,
                )
            })
            .collect();
        self.state
            .put(&entries, Merge::Replace)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn delete_pending_inbound_batch(&self, keys: &[PendingInboundKey<'_>]) -> Result<()> {
        let keys: Vec<Key<'_>> = keys
            .iter()
            .map(|k| Key::three(k.chat, k.sender, k.id))
            .collect();
        self.delete(Space::PendingInbound, Select::Keys(&keys))
            .await
            .map(drop)
    }
}

#[async_trait]
impl MsgSecretStore for WaBackend {
    async fn put_msg_secrets(&self, entries: Vec<MsgSecretEntry>) -> Result<usize> {
        let rows: Vec<Entry<'_>> = entries
            .iter()
            .map(|e| Entry {
                n1: e.expires_at,
                n2: Some(e.message_ts),
                ..Entry::new(
                    Space::MsgSecret,
                    Key::three(&e.chat, &e.sender, &e.msg_id),
                    &e.secret,
                )
            })
            .collect();
        self.state
            .put(&rows, Merge::Deadline)
            .await
            .map_err(|e| self.wa(e))?;
        Ok(entries.len())
    }

    async fn get_msg_secret(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<Vec<u8>>> {
        self.value(Space::MsgSecret, Key::three(chat, sender, msg_id))
            .await
    }

    async fn get_msg_secret_with_ts(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<(Vec<u8>, i64)>> {
        Ok(self
            .state
            .get(Space::MsgSecret, Key::three(chat, sender, msg_id))
            .await
            .map_err(|e| self.wa(e))?
            .map(|r| (r.value, r.n2.unwrap_or(0))))
    }

    async fn delete_expired_msg_secrets(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.delete(Space::MsgSecret, Select::DueBy(cutoff_timestamp))
            .await
    }
}

/// The one device row of a number is `device/''`; its id, for the crate, is always 1.
const DEVICE_ID: i32 = 1;

#[async_trait]
impl DeviceStore for WaBackend {
    async fn save(&self, device: &Device) -> Result<()> {
        let json = to_json(device)?;
        self.put_one(Entry::new(Space::Device, Key::one(""), &json))
            .await
    }

    async fn load(&self) -> Result<Option<Device>> {
        self.value(Space::Device, Key::one(""))
            .await?
            .map(|v| from_json(&v))
            .transpose()
    }

    async fn exists(&self) -> Result<bool> {
        self.state
            .exists(&[Space::Device], Select::All)
            .await
            .map_err(|e| self.wa(e))
    }

    async fn create(&self) -> Result<i32> {
        if !self.exists().await? {
            self.save(&Device::new()).await?;
        }
        Ok(DEVICE_ID)
    }

    async fn resource_report(&self) -> StorageResourceReport {
        // The state lives in the database, not in this process.
        StorageResourceReport {
            memory_bytes: Some(0),
            ..StorageResourceReport::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_of_an_address_ends_at_its_device_or_server() {
        assert_eq!(user_of("15550001@s.whatsapp.net"), "15550001");
        assert_eq!(user_of("15550001:3@s.whatsapp.net"), "15550001");
        assert_eq!(user_of("100000012345678@lid"), "100000012345678");
        assert_eq!(user_of("plain"), "plain");
    }
}
