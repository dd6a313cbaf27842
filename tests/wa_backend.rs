//! The storage contract of the whatsapp-rust backend: every method of the crate's five store
//! traits and of the pending-inbound buffer round-trips on SQLite and PostgreSQL (writes,
//! reads, batches, deletes, expiry), numbers stay apart, secrets are sealed at rest, and a
//! stale fencing token is refused.
#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/db.rs"]
#[macro_use]
mod db;

use std::sync::Arc;

use db::TestDb;
use sqlx::Row;
use switchboard::store::{NumberRecord, SqlStore, TenantRecord};
use switchboard::whatsapp::WaBackend;
use switchboard_actors::PhoneNumber;
use switchboard_actors::coordinator::{Lease, TokenSource};
use switchboard_actors::store::{Fence, StoreError};
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::error::StoreError as WaStoreError;
use whatsapp_rust::wacore::store::traits::{
    AppStateSyncKey, AppSyncStore, DeviceInfo, DeviceListRecord, DeviceStore, LidPnMappingEntry,
    MsgSecretEntry, MsgSecretStore, PendingInboundKey, PendingInboundRow, ProtocolStore,
    SignalStore, TcTokenEntry,
};

const N1: &str = "+15550001";
const N2: &str = "+15550002";

fn phone(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s).unwrap()
}

/// A store with numbers N1 and N2, and N1's backend under its first ownership.
async fn seeded(db: &TestDb) -> (SqlStore, WaBackend) {
    let store = db.store().await;
    store
        .create_tenant(&TenantRecord {
            id: "t1".into(),
            name: "Tenant".into(),
            full_transcripts: false,
        })
        .await
        .unwrap();
    for n in [N1, N2] {
        store
            .add_number(&NumberRecord {
                number: phone(n),
                tenant: "t1".into(),
                pinned_node: None,
                settings: serde_json::json!({}),
            })
            .await
            .unwrap();
    }
    let backend = backend(&store, N1).await;
    (store, backend)
}

async fn backend(store: &SqlStore, n: &str) -> WaBackend {
    let fence = Fence {
        number: phone(n),
        token: store.next_token(&phone(n)).await.unwrap(),
    };
    WaBackend::new(store.protocol_state(fence.clone()), Lease::new(fence))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

on_both_stores!(
    identities_and_sessions,
    prekeys_and_signed_prekeys,
    sender_keys,
    app_state_sync,
    sender_key_devices,
    lid_mappings,
    base_keys_device_lists_and_group_metadata,
    trusted_contact_tokens,
    sent_messages,
    pending_inbound,
    message_secrets,
    the_device,
    numbers_keep_their_own_state,
    secrets_are_sealed_at_rest,
    a_stale_fencing_token_is_refused,
    unused_lid_mappings_are_pruned,
    removing_a_number_removes_its_state,
    repeated_keys_in_one_batch_are_written_in_order,
    logging_out_forgets_the_device,
);

async fn identities_and_sessions(db: &TestDb) {
    let (_, b) = seeded(db).await;
    let a1 = "15551110000@s.whatsapp.net";
    let a2 = "15551110000:3@s.whatsapp.net";
    let a3 = "100000012345678@lid";

    assert_eq!(b.load_identity(a1).await.unwrap(), None);
    b.put_identity(a1, [1; 32]).await.unwrap();
    b.put_identity(a1, [2; 32]).await.unwrap();
    assert_eq!(
        b.load_identity(a1).await.unwrap(),
        Some([2; 32]),
        "replaced"
    );
    b.put_identities_batch(&[(Arc::from(a2), [3; 32]), (Arc::from(a3), [4; 32])])
        .await
        .unwrap();
    assert_eq!(b.load_identity(a2).await.unwrap(), Some([3; 32]));
    assert_eq!(b.load_identity(a3).await.unwrap(), Some([4; 32]));
    b.delete_identity(a1).await.unwrap();
    assert_eq!(b.load_identity(a1).await.unwrap(), None);
    assert_eq!(
        b.load_identity(a2).await.unwrap(),
        Some([3; 32]),
        "others stay"
    );

    assert!(!b.has_session(a1).await.unwrap());
    assert_eq!(b.get_session(a1).await.unwrap(), None);
    b.put_session(a1, b"session one").await.unwrap();
    assert!(b.has_session(a1).await.unwrap());
    assert_eq!(
        b.get_session(a1).await.unwrap().as_deref(),
        Some(&b"session one"[..])
    );
    b.put_sessions_batch(&[
        (Arc::from(a1), Bytes::from_static(b"session two")),
        (Arc::from(a2), Bytes::from_static(b"companion")),
    ])
    .await
    .unwrap();
    assert_eq!(
        b.get_session(a1).await.unwrap().as_deref(),
        Some(&b"session two"[..])
    );
    assert_eq!(
        b.get_session(a2).await.unwrap().as_deref(),
        Some(&b"companion"[..])
    );
    b.delete_session(a1).await.unwrap();
    assert!(!b.has_session(a1).await.unwrap());

    // A session (a2) or an identity (a3) counts as state for its user; a prefix does not.
    assert!(b.has_signal_state_for_user("15551110000").await.unwrap());
    assert!(
        b.has_signal_state_for_user("100000012345678")
            .await
            .unwrap()
    );
    assert!(!b.has_signal_state_for_user("1555111").await.unwrap());
    b.delete_session(a2).await.unwrap();
    b.delete_identity(a2).await.unwrap();
    assert!(!b.has_signal_state_for_user("15551110000").await.unwrap());
}

async fn prekeys_and_signed_prekeys(db: &TestDb) {
    let (store, b) = seeded(db).await;
    assert_eq!(b.get_max_prekey_id().await.unwrap(), 0, "none yet");
    assert_eq!(b.load_prekey(1).await.unwrap(), None);
    b.store_prekey(1, b"pk1", false).await.unwrap();
    let batch: Vec<(u32, Bytes)> = (2..=600)
        .map(|i| (i, Bytes::from(format!("pk{i}"))))
        .collect();
    b.store_prekeys_batch(&batch, false).await.unwrap();
    assert_eq!(b.get_max_prekey_id().await.unwrap(), 600);
    assert_eq!(
        b.load_prekey(7).await.unwrap().as_deref(),
        Some(&b"pk7"[..])
    );
    // Only the ones that exist, in the order asked for, across statement chunks.
    let asked: Vec<u32> = vec![599, 3, 9999, 1, 300];
    let loaded = b.load_prekeys_batch(&asked).await.unwrap();
    let ids: Vec<u32> = loaded.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, vec![599, 3, 1, 300]);
    assert_eq!(loaded[0].1.as_ref(), b"pk599");
    let all: Vec<u32> = (1..=600).collect();
    assert_eq!(b.load_prekeys_batch(&all).await.unwrap().len(), 600);

    // Marking uploaded updates what exists and never brings a consumed key back.
    b.remove_prekey(3).await.unwrap();
    assert_eq!(b.load_prekey(3).await.unwrap(), None);
    b.mark_prekeys_uploaded(&[1, 2, 3]).await.unwrap();
    assert_eq!(b.load_prekey(3).await.unwrap(), None, "not resurrected");
    let uploaded: Vec<i64> = sqlx::query_scalar(
        "SELECT n1 FROM wa_state WHERE number = $1 AND space = 'prekey' AND k1 IN ('1', '2', '4') \
         ORDER BY k1",
    )
    .bind(N1)
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(uploaded, vec![1, 1, 0]);
    b.store_prekey(601, b"up", true).await.unwrap();
    assert_eq!(b.get_max_prekey_id().await.unwrap(), 601);

    assert_eq!(b.load_signed_prekey(1).await.unwrap(), None);
    b.store_signed_prekey(1, b"spk1").await.unwrap();
    b.store_signed_prekey(2, b"spk2").await.unwrap();
    b.store_signed_prekey(1, b"spk1b").await.unwrap();
    assert_eq!(
        b.load_signed_prekey(1).await.unwrap(),
        Some(b"spk1b".to_vec())
    );
    let mut all = b.load_all_signed_prekeys().await.unwrap();
    all.sort();
    assert_eq!(all, vec![(1, b"spk1b".to_vec()), (2, b"spk2".to_vec())]);
    b.remove_signed_prekey(1).await.unwrap();
    assert_eq!(
        b.load_all_signed_prekeys().await.unwrap(),
        vec![(2, b"spk2".to_vec())]
    );
}

async fn sender_keys(db: &TestDb) {
    let (_, b) = seeded(db).await;
    let g = "120363021033254949@g.us::15551110000@s.whatsapp.net";
    assert_eq!(b.get_sender_key(g).await.unwrap(), None);
    b.put_sender_key(g, b"sk1").await.unwrap();
    assert_eq!(b.get_sender_key(g).await.unwrap(), Some(b"sk1".to_vec()));
    b.put_sender_keys_batch(&[
        (Arc::from(g), Bytes::from_static(b"sk2")),
        (Arc::from("other"), Bytes::from_static(b"sk3")),
    ])
    .await
    .unwrap();
    assert_eq!(b.get_sender_key(g).await.unwrap(), Some(b"sk2".to_vec()));
    assert_eq!(
        b.get_sender_key("other").await.unwrap(),
        Some(b"sk3".to_vec())
    );
    b.delete_sender_key(g).await.unwrap();
    assert_eq!(b.get_sender_key(g).await.unwrap(), None);
}

async fn app_state_sync(db: &TestDb) {
    let (_, b) = seeded(db).await;
    assert!(b.get_sync_key(b"k1").await.unwrap().is_none());
    assert_eq!(b.get_latest_sync_key_id().await.unwrap(), None);
    let key = |n: u8| AppStateSyncKey {
        key_data: vec![n; 32],
        fingerprint: vec![n, n],
        timestamp: i64::from(n),
    };
    b.set_sync_key(b"k1", key(1)).await.unwrap();
    b.set_sync_key(b"k2", key(2)).await.unwrap();
    let got = b.get_sync_key(b"k1").await.unwrap().unwrap();
    assert_eq!(
        (got.key_data, got.fingerprint, got.timestamp),
        (vec![1; 32], vec![1, 1], 1)
    );
    assert_eq!(
        b.get_latest_sync_key_id().await.unwrap(),
        Some(b"k2".to_vec())
    );

    let fresh = b.get_version("regular").await.unwrap();
    assert_eq!(fresh.version, 0, "a collection never synced starts at 0");
    let mut state = HashState {
        version: 42,
        hash: [9; 128],
        ..HashState::default()
    };
    state.index_value_map.insert("idx".into(), vec![1, 2, 3]);
    b.set_version("regular", state).await.unwrap();
    let got = b.get_version("regular").await.unwrap();
    assert_eq!((got.version, got.hash), (42, [9; 128]));
    assert_eq!(got.index_value_map.get("idx"), Some(&vec![1, 2, 3]));

    let mac = |i: u8, v: u8| AppStateMutationMAC {
        index_mac: vec![i; 32],
        value_mac: vec![v; 32],
    };
    b.put_mutation_macs("regular", 1, &[mac(1, 10), mac(2, 20), mac(3, 30)])
        .await
        .unwrap();
    b.put_mutation_macs("critical", 1, &[mac(1, 99)])
        .await
        .unwrap();
    assert_eq!(
        b.get_mutation_mac("regular", &[1; 32]).await.unwrap(),
        Some(vec![10; 32])
    );
    assert_eq!(b.get_mutation_mac("regular", &[7; 32]).await.unwrap(), None);
    let many = b
        .get_mutation_macs("regular", &[[1; 32], [3; 32], [7; 32]])
        .await
        .unwrap();
    assert_eq!(many.len(), 2);
    assert_eq!(many.get(&[3; 32]), Some(&vec![30; 32]));
    b.delete_mutation_macs("regular", &[vec![1; 32]])
        .await
        .unwrap();
    assert_eq!(b.get_mutation_mac("regular", &[1; 32]).await.unwrap(), None);
    assert_eq!(
        b.get_mutation_mac("critical", &[1; 32]).await.unwrap(),
        Some(vec![99; 32]),
        "another collection's MAC under the same index stays"
    );
    b.clear_mutation_macs("regular").await.unwrap();
    assert!(
        b.get_mutation_macs("regular", &[[2; 32], [3; 32]])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        b.get_mutation_mac("critical", &[1; 32])
            .await
            .unwrap()
            .is_some()
    );
}

async fn sender_key_devices(db: &TestDb) {
    let (_, b) = seeded(db).await;
    let (g1, g2) = ("1@g.us", "2@g.us");
    assert!(b.get_sender_key_devices(g1).await.unwrap().is_empty());
    b.set_sender_key_status(
        g1,
        &[("a:1@s.whatsapp.net", true), ("b:2@s.whatsapp.net", false)],
    )
    .await
    .unwrap();
    b.set_sender_key_status(g2, &[("a:1@s.whatsapp.net", true)])
        .await
        .unwrap();
    b.set_sender_key_status(g1, &[("b:2@s.whatsapp.net", true)])
        .await
        .unwrap();
    let mut got = b.get_sender_key_devices(g1).await.unwrap();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("a:1@s.whatsapp.net".to_owned(), true),
            ("b:2@s.whatsapp.net".to_owned(), true)
        ]
    );
    b.delete_sender_key_device_rows(&["a:1@s.whatsapp.net"])
        .await
        .unwrap();
    assert_eq!(
        b.get_sender_key_devices(g1).await.unwrap(),
        vec![("b:2@s.whatsapp.net".to_owned(), true)]
    );
    assert!(
        b.get_sender_key_devices(g2).await.unwrap().is_empty(),
        "in every group"
    );
    b.set_sender_key_status(g2, &[("c:1@s.whatsapp.net", false)])
        .await
        .unwrap();
    b.clear_sender_key_devices(g1).await.unwrap();
    assert!(b.get_sender_key_devices(g1).await.unwrap().is_empty());
    assert_eq!(b.get_sender_key_devices(g2).await.unwrap().len(), 1);
    b.clear_all_sender_key_devices().await.unwrap();
    assert!(b.get_sender_key_devices(g2).await.unwrap().is_empty());
}

fn lid(lid: &str, pn: &str, at: i64) -> LidPnMappingEntry {
    LidPnMappingEntry {
        lid: lid.into(),
        phone_number: pn.into(),
        created_at: at,
        updated_at: at,
        learning_source: "usync".into(),
    }
}

async fn lid_mappings(db: &TestDb) {
    let (_, b) = seeded(db).await;
    assert!(b.get_lid_mapping("100").await.unwrap().is_none());
    b.put_lid_mapping(&lid("100", "15551110000", 10))
        .await
        .unwrap();
    b.put_lid_mappings(&[lid("200", "15552220000", 20), lid("300", "15553330000", 30)])
        .await
        .unwrap();
    let got = b.get_lid_mapping("200").await.unwrap().unwrap();
    assert_eq!(
        (
            got.lid.as_str(),
            got.phone_number.as_str(),
            got.created_at,
            got.updated_at
        ),
        ("200", "15552220000", 20, 20)
    );
    assert_eq!(got.learning_source, "usync");
    assert_eq!(
        b.get_pn_mapping("15553330000").await.unwrap().unwrap().lid,
        "300"
    );
    // A phone that moved to a newer LID answers with the newest.
    b.put_lid_mapping(&lid("301", "15553330000", 40))
        .await
        .unwrap();
    assert_eq!(
        b.get_pn_mapping("15553330000").await.unwrap().unwrap().lid,
        "301"
    );
    // A LID remapped to another phone no longer answers for the old phone.
    b.put_lid_mapping(&lid("100", "15559990000", 50))
        .await
        .unwrap();
    assert!(b.get_pn_mapping("15551110000").await.unwrap().is_none());
    assert_eq!(
        b.get_pn_mapping("15559990000").await.unwrap().unwrap().lid,
        "100"
    );
    let mut all: Vec<String> = b
        .get_all_lid_mappings()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.lid)
        .collect();
    all.sort();
    assert_eq!(all, vec!["100", "200", "300", "301"]);
}

async fn base_keys_device_lists_and_group_metadata(db: &TestDb) {
    let (_, b) = seeded(db).await;
    let addr = "15551110000@s.whatsapp.net";
    assert!(!b.has_same_base_key(addr, "M1", b"bk").await.unwrap());
    b.save_base_key(addr, "M1", b"bk").await.unwrap();
    assert!(b.has_same_base_key(addr, "M1", b"bk").await.unwrap());
    assert!(!b.has_same_base_key(addr, "M1", b"other").await.unwrap());
    assert!(!b.has_same_base_key(addr, "M2", b"bk").await.unwrap());
    b.delete_base_key(addr, "M1").await.unwrap();
    assert!(!b.has_same_base_key(addr, "M1", b"bk").await.unwrap());

    let record = |user: &str, devices: &[u32], ts: i64| DeviceListRecord {
        user: user.into(),
        devices: devices
            .iter()
            .map(|d| DeviceInfo::new(*d, Some(1)))
            .collect(),
        timestamp: ts,
        phash: Some("2:abc".into()),
        raw_id: Some(7),
    };
    assert!(b.get_devices("15551110000").await.unwrap().is_none());
    b.update_device_list(record("15551110000", &[0, 3], 1))
        .await
        .unwrap();
    b.update_device_lists(vec![
        record("15551110000", &[0, 3, 5], 2),
        record("15552220000", &[0], 2),
    ])
    .await
    .unwrap();
    let got = b.get_devices("15551110000").await.unwrap().unwrap();
    let ids: Vec<u32> = got.devices.iter().map(|d| d.device_id).collect();
    assert_eq!(ids, vec![0, 3, 5]);
    assert_eq!(
        (got.timestamp, got.phash.as_deref(), got.raw_id),
        (2, Some("2:abc"), Some(7))
    );
    b.delete_devices("15551110000").await.unwrap();
    assert!(b.get_devices("15551110000").await.unwrap().is_none());
    assert!(b.get_devices("15552220000").await.unwrap().is_some());

    let g = "120363021033254949@g.us";
    assert_eq!(b.get_group_metadata(g).await.unwrap(), None);
    b.put_group_metadata(g, b"meta1").await.unwrap();
    b.put_group_metadata(g, b"meta2").await.unwrap();
    assert_eq!(
        b.get_group_metadata(g).await.unwrap(),
        Some(b"meta2".to_vec())
    );
    b.delete_group_metadata(g).await.unwrap();
    assert_eq!(b.get_group_metadata(g).await.unwrap(), None);
}

async fn trusted_contact_tokens(db: &TestDb) {
    let (_, b) = seeded(db).await;
    let (j1, j2, j3) = ("1@lid", "2@lid", "3@lid");
    assert!(b.get_tc_token(j1).await.unwrap().is_none());
    b.put_tc_token(
        j1,
        &TcTokenEntry {
            token: b"t1".to_vec(),
            token_timestamp: 100,
            sender_timestamp: None,
        },
    )
    .await
    .unwrap();
    let got = b.get_tc_token(j1).await.unwrap().unwrap();
    assert_eq!(
        (got.token, got.token_timestamp, got.sender_timestamp),
        (b"t1".to_vec(), 100, None)
    );

    // The sender time only moves forward and keeps the token.
    b.touch_tc_token_sender_timestamp(j1, 150).await.unwrap();
    b.touch_tc_token_sender_timestamp(j1, 120).await.unwrap();
    let got = b.get_tc_token(j1).await.unwrap().unwrap();
    assert_eq!(
        (got.token, got.token_timestamp, got.sender_timestamp),
        (b"t1".to_vec(), 100, Some(150))
    );
    // On a contact with no token, a touch leaves a placeholder.
    b.touch_tc_token_sender_timestamp(j2, 90).await.unwrap();
    let got = b.get_tc_token(j2).await.unwrap().unwrap();
    assert_eq!(
        (got.token, got.token_timestamp, got.sender_timestamp),
        (vec![], 90, Some(90))
    );

    // A received token: newer wins, an older one does not clobber, the sender time is kept,
    // and a placeholder never blocks the first real token.
    b.store_received_tc_token(j1, b"old", 50).await.unwrap();
    assert_eq!(b.get_tc_token(j1).await.unwrap().unwrap().token, b"t1");
    b.store_received_tc_token(j1, b"t2", 200).await.unwrap();
    let got = b.get_tc_token(j1).await.unwrap().unwrap();
    assert_eq!(
        (got.token, got.token_timestamp, got.sender_timestamp),
        (b"t2".to_vec(), 200, Some(150))
    );
    b.store_received_tc_token(j2, b"first", 10).await.unwrap();
    let got = b.get_tc_token(j2).await.unwrap().unwrap();
    assert_eq!(
        (got.token, got.token_timestamp, got.sender_timestamp),
        (b"first".to_vec(), 10, Some(90))
    );
    b.store_received_tc_token(j3, b"t3", 300).await.unwrap();

    let mut jids = b.get_all_tc_token_jids().await.unwrap();
    jids.sort();
    assert_eq!(jids, vec![j1, j2, j3]);

    // Gone only when both the token and the sender time are stale: j2 (token 10, sender 90).
    assert_eq!(b.delete_expired_tc_tokens(100, 100).await.unwrap(), 1);
    assert!(b.get_tc_token(j2).await.unwrap().is_none());
    assert!(
        b.get_tc_token(j1).await.unwrap().is_some(),
        "token 200 is live"
    );
    b.delete_tc_token(j1).await.unwrap();
    assert!(b.get_tc_token(j1).await.unwrap().is_none());
}

async fn sent_messages(db: &TestDb) {
    let (_, b) = seeded(db).await;
    let chat = "15551110000@s.whatsapp.net";
    b.store_sent_message(chat, "M1", b"payload one")
        .await
        .unwrap();
    b.store_sent_message(chat, "M2", b"payload two")
        .await
        .unwrap();
    assert_eq!(
        b.take_sent_message(chat, "M1").await.unwrap(),
        Some(b"payload one".to_vec())
    );
    assert_eq!(
        b.take_sent_message(chat, "M1").await.unwrap(),
        None,
        "taken once"
    );
    assert_eq!(
        b.take_sent_message("other@s.whatsapp.net", "M2")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        b.delete_expired_sent_messages(now() - 3600).await.unwrap(),
        0
    );
    assert_eq!(b.delete_expired_sent_messages(now() + 10).await.unwrap(), 1);
    assert_eq!(b.take_sent_message(chat, "M2").await.unwrap(), None);
}

async fn pending_inbound(db: &TestDb) {
    let (_, b) = seeded(db).await;
    let (chat, sender) = ("15551110000@s.whatsapp.net", "15551110000:2@s.whatsapp.net");
    assert_eq!(
        b.get_pending_inbound(chat, sender, "M1").await.unwrap(),
        None
    );
    b.store_pending_inbound(chat, sender, "M1", b"one")
        .await
        .unwrap();
    // Stanza ids are unique within a (chat, sender) only.
    b.store_pending_inbound(chat, "other@s.whatsapp.net", "M1", b"other sender")
        .await
        .unwrap();
    let rows: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| (format!("B{i}"), format!("batch {i}").into_bytes()))
        .collect();
    let batch: Vec<PendingInboundRow<'_>> = rows
        .iter()
        .map(|(id, message)| PendingInboundRow {
            chat,
            sender,
            id,
            message,
        })
        .collect();
    b.store_pending_inbound_batch(&batch).await.unwrap();
    // A repeat of the same rows is idempotent.
    b.store_pending_inbound_batch(&batch[..2]).await.unwrap();
    assert_eq!(
        b.get_pending_inbound(chat, sender, "M1").await.unwrap(),
        Some(b"one".to_vec())
    );
    assert_eq!(
        b.get_pending_inbound(chat, "other@s.whatsapp.net", "M1")
            .await
            .unwrap(),
        Some(b"other sender".to_vec())
    );
    assert_eq!(
        b.get_pending_inbound(chat, sender, "B299").await.unwrap(),
        Some(b"batch 299".to_vec())
    );
    b.delete_pending_inbound(chat, sender, "M1").await.unwrap();
    assert_eq!(
        b.get_pending_inbound(chat, sender, "M1").await.unwrap(),
        None
    );
    let keys: Vec<PendingInboundKey<'_>> = rows[..290]
        .iter()
        .map(|(id, _)| PendingInboundKey { chat, sender, id })
        .collect();
    b.delete_pending_inbound_batch(&keys).await.unwrap();
    assert_eq!(
        b.get_pending_inbound(chat, sender, "B0").await.unwrap(),
        None
    );
    assert!(
        b.get_pending_inbound(chat, sender, "B295")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        b.delete_expired_pending_inbound(now() - 3600)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        b.delete_expired_pending_inbound(now() + 10).await.unwrap(),
        11
    );
}

async fn message_secrets(db: &TestDb) {
    let (_, b) = seeded(db).await;
    let entry = |id: &str, secret: u8, expires_at: i64, message_ts: i64| MsgSecretEntry {
        chat: Arc::from("15551110000@s.whatsapp.net"),
        sender: Arc::from("15559990000@s.whatsapp.net"),
        msg_id: Arc::from(id),
        secret: [secret; 32],
        expires_at,
        message_ts,
    };
    let (chat, sender) = ("15551110000@s.whatsapp.net", "15559990000@s.whatsapp.net");
    assert_eq!(b.get_msg_secret(chat, sender, "M1").await.unwrap(), None);
    let stored = b
        .put_msg_secrets(vec![
            entry("M1", 1, 1000, 10),
            entry("M2", 2, 0, 0),
            entry("M3", 3, 500, 5),
        ])
        .await
        .unwrap();
    assert_eq!(stored, 3);
    assert_eq!(
        b.get_msg_secret(chat, sender, "M1").await.unwrap(),
        Some(vec![1; 32])
    );
    assert_eq!(
        b.get_msg_secret_with_ts(chat, sender, "M1").await.unwrap(),
        Some((vec![1; 32], 10))
    );
    // A re-put: the value is replaced, the later deadline and message time win, 0 = never wins.
    b.put_msg_secrets(vec![entry("M1", 9, 800, 0), entry("M3", 3, 0, 7)])
        .await
        .unwrap();
    assert_eq!(
        b.get_msg_secret_with_ts(chat, sender, "M1").await.unwrap(),
        Some((vec![9; 32], 10))
    );
    b.put_msg_secret(chat, sender, "M4", &[4; 32])
        .await
        .unwrap();
    // Due by 1000: only M1 (M2, M3 and M4 never expire).
    assert_eq!(b.delete_expired_msg_secrets(999).await.unwrap(), 0);
    assert_eq!(b.delete_expired_msg_secrets(1000).await.unwrap(), 1);
    assert_eq!(b.get_msg_secret(chat, sender, "M1").await.unwrap(), None);
    assert_eq!(
        b.get_msg_secret_with_ts(chat, sender, "M3").await.unwrap(),
        Some((vec![3; 32], 7))
    );
    assert_eq!(
        b.get_msg_secret(chat, sender, "M4").await.unwrap(),
        Some(vec![4; 32])
    );
}

async fn the_device(db: &TestDb) {
    let (_, b) = seeded(db).await;
    assert!(!b.exists().await.unwrap());
    assert!(b.load().await.unwrap().is_none());
    let id = b.create().await.unwrap();
    assert!(b.exists().await.unwrap());
    let created = b.load().await.unwrap().unwrap();
    assert_eq!(b.create().await.unwrap(), id, "one device per number");
    let again = b.load().await.unwrap().unwrap();
    assert_eq!(
        again.identity_key.public_key.public_key_bytes(),
        created.identity_key.public_key.public_key_bytes(),
        "a second create keeps the device"
    );

    let mut device = Device::new();
    device.push_name = "Acme Support".into();
    device.registration_id = 4242;
    b.save(&device).await.unwrap();
    let loaded = b.load().await.unwrap().unwrap();
    assert_eq!(
        serde_json::to_value(&loaded).unwrap(),
        serde_json::to_value(&device).unwrap()
    );
    assert_eq!(loaded.push_name, "Acme Support");
    let report = b.resource_report().await;
    assert_eq!(
        report.memory_bytes,
        Some(0),
        "the state is not in this process"
    );
}

async fn numbers_keep_their_own_state(db: &TestDb) {
    let (store, b1) = seeded(db).await;
    let b2 = backend(&store, N2).await;
    let addr = "15551110000@s.whatsapp.net";
    b1.put_session(addr, b"one's").await.unwrap();
    b2.put_session(addr, b"two's").await.unwrap();
    b1.store_pending_inbound("c", "s", "M", b"1").await.unwrap();
    assert_eq!(
        b1.get_session(addr).await.unwrap().as_deref(),
        Some(&b"one's"[..])
    );
    assert_eq!(
        b2.get_session(addr).await.unwrap().as_deref(),
        Some(&b"two's"[..])
    );
    assert_eq!(b2.get_pending_inbound("c", "s", "M").await.unwrap(), None);
    b2.delete_session(addr).await.unwrap();
    assert!(
        b1.has_session(addr).await.unwrap(),
        "a delete stays within its number"
    );
    b2.create().await.unwrap();
    assert!(!b1.exists().await.unwrap());
}

async fn secrets_are_sealed_at_rest(db: &TestDb) {
    let (store, b) = seeded(db).await;
    let secret = b"plaintext session record that must not be stored as is";
    b.put_session("15551110000@s.whatsapp.net", secret)
        .await
        .unwrap();
    b.store_pending_inbound("c", "s", "M", b"a customer's message")
        .await
        .unwrap();
    b.put_lid_mapping(&lid("100", "15551110000", 1))
        .await
        .unwrap();
    let rows = sqlx::query("SELECT space, key_id, value FROM wa_state WHERE number = $1")
        .bind(N1)
        .fetch_all(store.pool())
        .await
        .unwrap();
    for row in &rows {
        let space: String = row.get("space");
        let key_id: Option<String> = row.get("key_id");
        let value: Vec<u8> = row.get("value");
        match space.as_str() {
            "session" | "pending_inbound" => {
                assert_eq!(key_id.as_deref(), Some("test"), "{space} sealed");
                assert!(
                    !value
                        .windows(9)
                        .any(|w| w == &secret[..9] || w == b"customer'"),
                    "{space} holds no plaintext"
                );
            }
            "lid" => assert_eq!(key_id, None, "mappings are not secret"),
            other => panic!("unexpected space {other}"),
        }
    }
    // A sealed value moved to another key does not open.
    sqlx::query(
        "UPDATE wa_state SET k1 = '15552220000@s.whatsapp.net' WHERE number = $1 \
         AND space = 'session'",
    )
    .bind(N1)
    .execute(store.pool())
    .await
    .unwrap();
    let err = b
        .get_session("15552220000@s.whatsapp.net")
        .await
        .expect_err("bound to its key");
    assert!(matches!(err, WaStoreError::Serialization(_)), "{err:?}");
}

async fn a_stale_fencing_token_is_refused(db: &TestDb) {
    let (store, old) = seeded(db).await;
    old.put_session("a@s.whatsapp.net", b"old owner")
        .await
        .unwrap();
    // A newer ownership of the same number writes once: the old one is fenced from then on.
    let new = backend(&store, N1).await;
    new.put_session("a@s.whatsapp.net", b"new owner")
        .await
        .unwrap();
    let refused = [
        old.put_session("a@s.whatsapp.net", b"stale").await.err(),
        old.delete_session("a@s.whatsapp.net").await.err(),
        old.store_pending_inbound("c", "s", "M", b"x").await.err(),
        old.mark_prekeys_uploaded(&[1]).await.err(),
        old.take_sent_message("c", "M").await.err(),
        old.save(&Device::new()).await.err(),
    ];
    for err in refused {
        let err = err.expect("a stale write fails");
        let WaStoreError::Database(source) = &err else {
            panic!("a fence refusal is a database error: {err:?}");
        };
        assert!(
            matches!(
                source.downcast_ref::<StoreError>(),
                Some(StoreError::Fenced { .. })
            ),
            "{source:?}"
        );
    }
    assert_eq!(
        new.get_session("a@s.whatsapp.net")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"new owner"[..]),
        "nothing the stale owner tried took effect"
    );
    assert_eq!(new.get_pending_inbound("c", "s", "M").await.unwrap(), None);
}

async fn unused_lid_mappings_are_pruned(db: &TestDb) {
    let (store, b) = seeded(db).await;
    let fence = b.state().fence().clone();
    store
        .set_human_takeover(
            &fence,
            &"15551110000@s.whatsapp.net".parse().unwrap(),
            false,
        )
        .await
        .unwrap();
    store
        .set_human_takeover(&fence, &"300@lid".parse().unwrap(), false)
        .await
        .unwrap();
    b.put_lid_mappings(&[
        lid("100", "15551110000", 10),
        lid("200", "15552220000", 10),
        lid("300", "15553330000", 10),
        lid("400", "15554440000", 1000),
    ])
    .await
    .unwrap();
    // The retention pass, cutoff 500 s: 100 (its phone has a conversation) and 300 (its LID
    // has) stay; 400 is recent; 200 goes.
    assert_eq!(store.prune(500_000).await.unwrap().lid_mappings, 1);
    let mut left: Vec<String> = b
        .get_all_lid_mappings()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.lid)
        .collect();
    left.sort();
    assert_eq!(left, vec!["100", "300", "400"]);
}

async fn removing_a_number_removes_its_state(db: &TestDb) {
    let (store, b) = seeded(db).await;
    b.put_session("a@s.whatsapp.net", b"s").await.unwrap();
    b.create().await.unwrap();
    store.remove_number(&phone(N1)).await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM wa_state WHERE number = $1")
        .bind(N1)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
}

async fn repeated_keys_in_one_batch_are_written_in_order(db: &TestDb) {
    let (_, b) = seeded(db).await;
    // The crate can hand one batch the same key twice (a user and its LID folded together, a
    // patch that sets one index twice, a stanza redelivered within a drain).
    let record = |devices: &[u32], ts: i64| DeviceListRecord {
        user: "15551110000".into(),
        devices: devices.iter().map(|d| DeviceInfo::new(*d, None)).collect(),
        timestamp: ts,
        phash: None,
        raw_id: None,
    };
    b.update_device_lists(vec![record(&[0], 1), record(&[0, 7], 2)])
        .await
        .unwrap();
    let got = b.get_devices("15551110000").await.unwrap().unwrap();
    assert_eq!((got.devices.len(), got.timestamp), (2, 2), "the later wins");

    let mac = |v: u8| AppStateMutationMAC {
        index_mac: vec![1; 32],
        value_mac: vec![v; 32],
    };
    b.put_mutation_macs("regular", 3, &[mac(1), mac(2), mac(3)])
        .await
        .unwrap();
    assert_eq!(
        b.get_mutation_mac("regular", &[1; 32]).await.unwrap(),
        Some(vec![3; 32])
    );

    let row = |message: &'static [u8]| PendingInboundRow {
        chat: "c",
        sender: "s",
        id: "M",
        message,
    };
    b.store_pending_inbound_batch(&[row(b"first"), row(b"again")])
        .await
        .unwrap();
    assert_eq!(
        b.get_pending_inbound("c", "s", "M").await.unwrap(),
        Some(b"again".to_vec())
    );

    // A merge applies per entry: of two deadlines for one secret, the later one stays.
    let secret = |expires_at: i64| MsgSecretEntry {
        chat: Arc::from("c"),
        sender: Arc::from("s"),
        msg_id: Arc::from("M"),
        secret: [5; 32],
        expires_at,
        message_ts: 1,
    };
    b.put_msg_secrets(vec![secret(900), secret(500)])
        .await
        .unwrap();
    assert_eq!(
        b.delete_expired_msg_secrets(600).await.unwrap(),
        0,
        "900 stayed"
    );
}

async fn logging_out_forgets_the_device(db: &TestDb) {
    use switchboard_actors::store::Store;
    use switchboard_actors::transport::Credentials;
    let (store, b) = seeded(db).await;
    let fence = b.state().fence().clone();
    b.create().await.unwrap();
    b.put_session("a@s.whatsapp.net", b"s").await.unwrap();
    store
        .save_session(&fence, &Credentials("{}".into()))
        .await
        .unwrap();
    // What the number does on `LoggedOut`: the next pairing starts from a fresh device.
    store.clear_session(&fence).await.unwrap();
    assert!(!b.exists().await.unwrap());
    assert!(!b.has_session("a@s.whatsapp.net").await.unwrap());
    assert!(store.load_session(&phone(N1)).await.unwrap().is_none());
}
