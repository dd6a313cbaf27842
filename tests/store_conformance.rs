//! The store conformance suite: every behaviour of the store, run against SQLite and PostgreSQL,
//! each test on a fresh database.
#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/db.rs"]
#[macro_use]
mod db;

use std::collections::HashSet;
use std::time::Duration;

use db::TestDb;
use sqlx::Row;
use switchboard::store::{
    AiJobRecord, AiJobStatus, AuditEntry, Change, Dialect, FlowStatus, HotWrite, NumberRecord,
    OptIn, PREVIEW_CHARS, Role, SessionCipher, SqlStore, TenantRecord, TokenRecord,
};
use switchboard_actors::coordinator::TokenSource;
use switchboard_actors::dead_letter::DeadLetterReason;
use switchboard_actors::responder::ChatContext;
use switchboard_actors::store::{
    Completion, Fence, FencingToken, Queued, Recorded, Store, StoreError,
};
use switchboard_actors::transport::{Credentials, InboundMessage, MessageId, OutboundText};
use switchboard_actors::{Jid, PhoneNumber};

// ---- fixtures ---------------------------------------------------------------------------

fn phone(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s).unwrap()
}

const N1: &str = "+15550001";
const N2: &str = "+15550002";

/// A store with tenant `t1` (previews only) and numbers N1 and N2.
async fn seeded(db: &TestDb) -> SqlStore {
    let store = db.store().await;
    tenant(&store, "t1", false).await;
    for n in [N1, N2] {
        add(&store, n, "t1").await;
    }
    store
}

async fn tenant(store: &SqlStore, id: &str, full_transcripts: bool) {
    store
        .create_tenant(&TenantRecord {
            id: id.into(),
            name: format!("Tenant {id}"),
            full_transcripts,
        })
        .await
        .unwrap();
}

async fn add(store: &SqlStore, n: &str, tenant: &str) {
    store
        .add_number(&NumberRecord {
            number: phone(n),
            tenant: tenant.into(),
            pinned_node: None,
            settings: serde_json::json!({"greeting": "hi"}),
        })
        .await
        .unwrap();
}

async fn own(store: &SqlStore, n: &str) -> Fence {
    Fence {
        number: phone(n),
        token: store.next_token(&phone(n)).await.unwrap(),
    }
}

fn msg(from: &str, id: &str, text: &str) -> InboundMessage {
    InboundMessage {
        id: MessageId::parse(id).unwrap(),
        chat: phone(from).jid(),
        sender: phone(from).jid(),
        sender_alt: Some(Jid::lid("123456789").unwrap()),
        is_from_me: false,
        text: text.into(),
        media: None,
        timestamp_ms: 1_767_225_600_000,
        offline: false,
    }
}

fn completion(fence: &Fence, m: &InboundMessage, reply: Option<&str>, turns: u64) -> Completion {
    Completion {
        chat: m.chat.clone(),
        sender: m.sender.clone(),
        inbound: m.id.clone(),
        replies: reply
            .map(|text| OutboundText {
                id: MessageId::derived(&fence.number, &m.chat, &m.sender, &m.id, 0),
                to: m.chat.clone(),
                text: text.into(),
                reply_to: Some(m.id.clone()),
                reply_to_sender: None,
            })
            .into_iter()
            .collect(),
        checkpoint: ChatContext {
            turns,
            from_phone: 0,
        },
    }
}

async fn raw_inbound(store: &SqlStore, id: &str) -> (Option<String>, String, String) {
    let row = sqlx::query("SELECT body, preview, status FROM inbound WHERE message_id = $1")
        .bind(id)
        .fetch_one(store.pool())
        .await
        .unwrap();
    (
        row.try_get("body").unwrap(),
        row.try_get("preview").unwrap(),
        row.try_get("status").unwrap(),
    )
}

on_both_stores!(
    migrations_apply_once,
    operators_changes_commit_with_their_audit_row_or_not_at_all_and_pages_follow_keys,
    business_sends_are_queued_once_per_id_and_a_reused_key_is_told_apart,
    tenants_and_numbers,
    inbound_is_deduplicated_and_resumable,
    replies_are_queued_once_and_marked_sent_once,
    texts_are_previews_after_processing_unless_the_tenant_keeps_transcripts,
    lower_fencing_tokens_are_refused_in_the_same_transaction,
    sessions_are_encrypted_at_rest,
    dead_letters_keep_the_reason_and_are_not_resumed,
    failed_sends_count_attempts_and_give_up,
    checkpoints_takeover_and_contacts,
    flows_are_versioned_and_published,
    ai_jobs_commit_their_result_once,
    events_are_claimed_leased_and_settled,
    audit_log_is_newest_first,
    concurrent_writers_lose_nothing_and_duplicate_nothing,
    direct_batches_write_like_the_batcher_and_a_closed_store_refuses,
    large_batches_write_the_same_rows_as_small_ones,
    writes_for_a_removed_number_fail_alone,
    unlogged_messages_are_recorded_with_their_completion_once,
    any_text_round_trips_inside_batches_of_ordinary_rows,
    a_row_the_database_refuses_fails_alone_and_the_rest_of_its_batch_commits,
    expired_replies_leave_the_outbox_with_their_reason,
    retention_prunes_old_processed_and_sent_rows_in_batches_and_keeps_the_rest,
);

// ---- the suite --------------------------------------------------------------------------

async fn migrations_apply_once(db: &TestDb) {
    let (_, first) = switchboard::store::migrate(&db.url).await.unwrap();
    assert!(first >= 1);
    let (_, again) = switchboard::store::migrate(&db.url).await.unwrap();
    assert_eq!(again, 0);
    // Connecting to a migrated database applies nothing and works.
    let store = db.store().await;
    assert!(store.numbers().await.unwrap().is_empty());
}

async fn tenants_and_numbers(db: &TestDb) {
    let store = seeded(db).await;
    let dup = store
        .create_tenant(&TenantRecord {
            id: "t1".into(),
            name: "again".into(),
            full_transcripts: false,
        })
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    assert!(!store.tenant("t1").await.unwrap().unwrap().full_transcripts);
    store.set_full_transcripts("t1", true).await.unwrap();
    assert!(store.tenant("t1").await.unwrap().unwrap().full_transcripts);
    assert!(store.tenant("nope").await.unwrap().is_none());
    assert!(matches!(
        store.set_full_transcripts("nope", true).await,
        Err(StoreError::NotFound(_))
    ));

    let all = store.numbers().await.unwrap();
    assert_eq!(
        all.iter().map(|n| n.number.as_str()).collect::<Vec<_>>(),
        [N1, N2]
    );
    assert_eq!(all[0].settings["greeting"], "hi");
    let again = store
        .add_number(&NumberRecord {
            number: phone(N1),
            tenant: "t1".into(),
            pinned_node: None,
            settings: serde_json::json!({}),
        })
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    let orphan = store
        .add_number(&NumberRecord {
            number: phone("+15550009"),
            tenant: "nope".into(),
            pinned_node: None,
            settings: serde_json::json!({}),
        })
        .await;
    assert!(matches!(orphan, Err(StoreError::NotFound(_))), "{orphan:?}");

    store.pin_number(&phone(N1), Some("node-b")).await.unwrap();
    let n1 = store.number(&phone(N1)).await.unwrap().unwrap();
    assert_eq!(n1.pinned_node.as_deref(), Some("node-b"));

    let fence = own(&store, N2).await;
    let m = msg("+4915100001", "R1", "hello");
    store.record_inbound(&fence, &m).await.unwrap();
    store.remove_number(&phone(N2)).await.unwrap();
    assert!(store.number(&phone(N2)).await.unwrap().is_none());
    assert!(store.unprocessed(&phone(N2)).await.unwrap().is_empty());
    assert!(matches!(
        store.remove_number(&phone(N2)).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn inbound_is_deduplicated_and_resumable(db: &TestDb) {
    let store = seeded(db).await;
    let fence = own(&store, N1).await;
    let m = msg("+4915100001", "A1", "hello");
    assert_eq!(store.record_inbound(&fence, &m).await, Ok(Recorded::New));
    assert_eq!(
        store.record_inbound(&fence, &m).await,
        Ok(Recorded::Duplicate { processed: false })
    );
    // The same id from another sender, or for another number, is another message.
    let other = msg("+4915100002", "A1", "hi");
    assert_eq!(
        store.record_inbound(&fence, &other).await,
        Ok(Recorded::New)
    );
    let fence2 = own(&store, N2).await;
    assert_eq!(store.record_inbound(&fence2, &m).await, Ok(Recorded::New));

    let left = store.unprocessed(&phone(N1)).await.unwrap();
    assert_eq!(
        left,
        vec![m.clone(), other.clone()],
        "in arrival order, whole"
    );

    store
        .complete(&fence, completion(&fence, &m, None, 1))
        .await
        .unwrap();
    assert_eq!(
        store.record_inbound(&fence, &m).await,
        Ok(Recorded::Duplicate { processed: true })
    );
    assert_eq!(store.unprocessed(&phone(N1)).await.unwrap(), vec![other]);

    // The same message twice in one batch (queued together): one write is the new one.
    let twice = msg("+4915100003", "A2", "again");
    let both = futures_util::future::join(
        store.record_inbound(&fence, &twice),
        store.record_inbound(&fence, &twice),
    )
    .await;
    let mut answers = vec![both.0.unwrap(), both.1.unwrap()];
    answers.sort_by_key(|r| matches!(r, Recorded::Duplicate { .. }));
    assert_eq!(
        answers,
        vec![Recorded::New, Recorded::Duplicate { processed: false }]
    );
}

async fn replies_are_queued_once_and_marked_sent_once(db: &TestDb) {
    let store = seeded(db).await;
    let fence = own(&store, N1).await;
    let m = msg("+4915100001", "B1", "hello");
    store.record_inbound(&fence, &m).await.unwrap();
    let done = completion(&fence, &m, Some("hi there"), 1);
    let reply = done.replies[0].clone();
    let queued = store.complete(&fence, done.clone()).await.unwrap();
    assert_eq!(queued, vec![reply.id.clone()]);
    // Processing the same message again (after a crash) queues nothing new.
    assert!(store.complete(&fence, done).await.unwrap().is_empty());
    let unsent = store.unsent(&phone(N1)).await.unwrap();
    assert_eq!(
        unsent.iter().map(|u| &u.reply).collect::<Vec<_>>(),
        vec![&reply]
    );
    let age = switchboard_actors::store::unix_ms().saturating_sub(unsent[0].queued_at_ms);
    assert!(age < 60_000, "queued just now: {age} ms ago");

    assert!(store.mark_sent(&fence, &reply.id).await.unwrap());
    assert!(
        !store.mark_sent(&fence, &reply.id).await.unwrap(),
        "already sent"
    );
    let foreign = MessageId::parse("3EB0FROMPHONE").unwrap();
    assert!(
        !store.mark_sent(&fence, &foreign).await.unwrap(),
        "not ours"
    );
    assert!(store.unsent(&phone(N1)).await.unwrap().is_empty());
}

async fn texts_are_previews_after_processing_unless_the_tenant_keeps_transcripts(db: &TestDb) {
    let store = seeded(db).await;
    tenant(&store, "t2", true).await;
    add(&store, "+15550003", "t2").await;
    let long: String = "abcdefghij".repeat(30);

    let fence = own(&store, N1).await;
    let m = msg("+4915100001", "C1", &long);
    store.record_inbound(&fence, &m).await.unwrap();
    let (body, preview, _) = raw_inbound(&store, "C1").await;
    assert_eq!(
        body.as_deref(),
        Some(long.as_str()),
        "whole until processed"
    );
    assert_eq!(preview.chars().count(), PREVIEW_CHARS);
    store
        .complete(&fence, completion(&fence, &m, None, 1))
        .await
        .unwrap();
    let (body, preview, status) = raw_inbound(&store, "C1").await;
    assert_eq!(body, None, "only the preview is kept");
    assert_eq!(preview, long[..PREVIEW_CHARS]);
    assert_eq!(status, "processed");

    let fence3 = own(&store, "+15550003").await;
    let m = msg("+4915100001", "C2", &long);
    store.record_inbound(&fence3, &m).await.unwrap();
    store
        .complete(&fence3, completion(&fence3, &m, None, 1))
        .await
        .unwrap();
    let (body, _, _) = raw_inbound(&store, "C2").await;
    assert_eq!(
        body.as_deref(),
        Some(long.as_str()),
        "tenant keeps transcripts"
    );
}

async fn lower_fencing_tokens_are_refused_in_the_same_transaction(db: &TestDb) {
    let store = seeded(db).await;
    let old = own(&store, N1).await;
    let new = own(&store, N1).await;
    assert!(new.token > old.token);
    assert_eq!(
        store.highest_token(&phone(N1)).await.unwrap(),
        Some(new.token.get())
    );

    // A stale write in a batch fails alone: the other number's write in the same batch commits.
    let other = own(&store, N2).await;
    let m = msg("+4915100001", "D1", "from the old owner");
    let stale = store.record_inbound(&old, &m);
    let fine = store.record_inbound(&other, &m);
    let stale = stale.await;
    assert!(
        matches!(&stale, Err(StoreError::Fenced { token, highest, .. }) if *token == old.token.get() && *highest == new.token.get()),
        "{stale:?}"
    );
    assert_eq!(fine.await, Ok(Recorded::New));
    assert!(
        store.unprocessed(&phone(N1)).await.unwrap().is_empty(),
        "nothing written"
    );

    let creds = Credentials("device".into());
    assert!(matches!(
        store.save_session(&old, &creds).await,
        Err(StoreError::Fenced { .. })
    ));
    assert_eq!(store.load_session(&phone(N1)).await.unwrap(), None);
    assert!(matches!(
        store
            .mark_sent(&old, &MessageId::parse("X1").unwrap())
            .await,
        Err(StoreError::Fenced { .. })
    ));
    // The current owner writes; a token handed out later by another coordinator (higher) too.
    store.save_session(&new, &creds).await.unwrap();
    assert_eq!(store.load_session(&phone(N1)).await.unwrap(), Some(creds));

    // A batch raises the fence for a higher token (a new owner's first write) and commits the
    // writes of other numbers beside it; the former owner is refused afterwards.
    let higher = Fence {
        number: phone(N1),
        token: FencingToken::new(new.token.get() + 10).unwrap(),
    };
    store
        .commit_batch(vec![
            HotWrite::Inbound(other.clone(), msg("+4915100001", "D2", "beside it")),
            HotWrite::Inbound(higher.clone(), msg("+4915100001", "D3", "the new owner")),
        ])
        .await
        .unwrap();
    assert_eq!(
        store.highest_token(&phone(N1)).await.unwrap(),
        Some(higher.token.get())
    );
    assert_eq!(store.unprocessed(&phone(N1)).await.unwrap().len(), 1);
    assert_eq!(store.unprocessed(&phone(N2)).await.unwrap().len(), 2);
    let refused = store
        .record_inbound(&new, &msg("+4915100001", "D4", "too late"))
        .await;
    assert!(
        matches!(refused, Err(StoreError::Fenced { .. })),
        "{refused:?}"
    );
}

async fn sessions_are_encrypted_at_rest(db: &TestDb) {
    let keys = SessionCipher::generate("k1");
    let store = db.store_with_keys(&keys).await;
    tenant(&store, "t1", false).await;
    add(&store, N1, "t1").await;
    let fence = own(&store, N1).await;
    let secret = "noise-key:0123456789abcdef-identity";
    store
        .save_session(&fence, &Credentials(secret.into()))
        .await
        .unwrap();
    let row = sqlx::query("SELECT key_id, ciphertext FROM sessions WHERE number = $1")
        .bind(N1)
        .fetch_one(store.pool())
        .await
        .unwrap();
    let key_id: String = row.try_get("key_id").unwrap();
    let raw: Vec<u8> = row.try_get("ciphertext").unwrap();
    assert_eq!(key_id, "k1");
    assert!(
        !raw.windows(8)
            .any(|w| secret.as_bytes().windows(8).any(|s| s == w)),
        "no plaintext in the stored column"
    );
    assert_eq!(
        store.load_session(&phone(N1)).await.unwrap(),
        Some(Credentials(secret.into()))
    );

    // Rotation: a new key first, the old one kept, reads the old blob and writes with the new.
    let rotated = db
        .store_with_keys(&format!("{},{keys}", SessionCipher::generate("k2")))
        .await;
    assert_eq!(
        rotated.load_session(&phone(N1)).await.unwrap(),
        Some(Credentials(secret.into()))
    );
    // Without the old key the blob is unreadable, and says so.
    let stranger = db.store_with_keys(&SessionCipher::generate("k3")).await;
    assert!(matches!(
        stranger.load_session(&phone(N1)).await,
        Err(StoreError::Corrupt(_))
    ));

    store.clear_session(&fence).await.unwrap();
    assert_eq!(store.load_session(&phone(N1)).await.unwrap(), None);
}

async fn dead_letters_keep_the_reason_and_are_not_resumed(db: &TestDb) {
    let store = seeded(db).await;
    let fence = own(&store, N1).await;
    let committed = msg("+4915100001", "E1", "poison");
    store.record_inbound(&fence, &committed).await.unwrap();
    let reason = DeadLetterReason::RestartBudgetSpent {
        last_error: "panicked".into(),
    };
    store
        .dead_letter(&fence, &committed, &reason)
        .await
        .unwrap();
    // A message never committed can be dead-lettered too (the store refused its record).
    let fresh = msg("+4915100001", "E2", "refused");
    let refused = DeadLetterReason::StoreRefused {
        error: "value too long".into(),
    };
    store.dead_letter(&fence, &fresh, &refused).await.unwrap();

    assert!(store.unprocessed(&phone(N1)).await.unwrap().is_empty());
    let letters = store.dead_letters(&phone(N1)).await.unwrap();
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0].0, committed);
    assert!(
        letters[0].1.contains("restart budget spent"),
        "{}",
        letters[0].1
    );
    assert!(letters[1].1.contains("refused by the store"));
    assert_eq!(
        store.record_inbound(&fence, &fresh).await,
        Ok(Recorded::Duplicate { processed: true })
    );
}

async fn failed_sends_count_attempts_and_give_up(db: &TestDb) {
    let store = seeded(db).await;
    let fence = own(&store, N1).await;
    let m = msg("+4915100001", "F1", "hello");
    store.record_inbound(&fence, &m).await.unwrap();
    let done = completion(&fence, &m, Some("reply"), 1);
    let id = done.replies[0].id.clone();
    store.complete(&fence, done).await.unwrap();
    store
        .send_failed(&fence, &id, "rate-overlimit", false)
        .await
        .unwrap();
    assert_eq!(store.unsent(&phone(N1)).await.unwrap().len(), 1, "retried");
    store
        .send_failed(&fence, &id, "refused", true)
        .await
        .unwrap();
    assert!(
        store.unsent(&phone(N1)).await.unwrap().is_empty(),
        "given up"
    );
    let row = sqlx::query("SELECT attempts, status, last_error FROM outbox WHERE message_id = $1")
        .bind(id.as_str())
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(row.try_get::<i64, _>("attempts").unwrap(), 2);
    assert_eq!(row.try_get::<String, _>("status").unwrap(), "failed");
    assert_eq!(row.try_get::<String, _>("last_error").unwrap(), "refused");
}

async fn checkpoints_takeover_and_contacts(db: &TestDb) {
    let store = seeded(db).await;
    let fence = own(&store, N1).await;
    let m = msg("+4915100001", "G1", "hello");
    let chat = m.chat.clone();
    assert_eq!(store.checkpoint(&phone(N1), &chat).await.unwrap(), None);
    store.record_inbound(&fence, &m).await.unwrap();
    store
        .complete(&fence, completion(&fence, &m, None, 7))
        .await
        .unwrap();
    assert_eq!(
        store.checkpoint(&phone(N1), &chat).await.unwrap(),
        Some(ChatContext {
            turns: 7,
            from_phone: 0
        })
    );
    store.set_human_takeover(&fence, &chat, true).await.unwrap();
    let conv = store
        .conversation(&phone(N1), &chat)
        .await
        .unwrap()
        .unwrap();
    assert!(conv.human_takeover);
    assert!(
        conv.checkpoint.contains("\"turns\":7"),
        "takeover keeps the checkpoint"
    );

    assert_eq!(
        store.opt_in(&phone(N1), &chat).await.unwrap(),
        OptIn::Unknown
    );
    store
        .set_opt_in(&fence, &chat, OptIn::OptedIn)
        .await
        .unwrap();
    assert_eq!(
        store.opt_in(&phone(N1), &chat).await.unwrap(),
        OptIn::OptedIn
    );
    store
        .set_opt_in(&fence, &chat, OptIn::OptedOut)
        .await
        .unwrap();
    assert_eq!(
        store.opt_in(&phone(N1), &chat).await.unwrap(),
        OptIn::OptedOut
    );
    assert_eq!(
        store.opt_in(&phone(N2), &chat).await.unwrap(),
        OptIn::Unknown,
        "per number"
    );
}

async fn flows_are_versioned_and_published(db: &TestDb) {
    let store = seeded(db).await;
    let v1 = store
        .save_flow_draft("t1", "welcome", &serde_json::json!({"start": "a"}))
        .await
        .unwrap();
    assert_eq!(v1, 1);
    assert!(
        store
            .published_flow("t1", "welcome")
            .await
            .unwrap()
            .is_none()
    );
    store.publish_flow("t1", "welcome", v1).await.unwrap();
    let v2 = store
        .save_flow_draft("t1", "welcome", &serde_json::json!({"start": "b"}))
        .await
        .unwrap();
    assert_eq!(v2, 2);
    store.publish_flow("t1", "welcome", v2).await.unwrap();
    let live = store
        .published_flow("t1", "welcome")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (live.version, live.definition["start"].as_str()),
        (2, Some("b"))
    );
    let versions = store.flow_versions("t1", "welcome").await.unwrap();
    assert_eq!(
        versions.iter().map(|f| f.status).collect::<Vec<_>>(),
        [FlowStatus::Retired, FlowStatus::Published]
    );
    assert!(matches!(
        store.publish_flow("t1", "welcome", 9).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn ai_jobs_commit_their_result_once(db: &TestDb) {
    let store = seeded(db).await;
    let fence = own(&store, N1).await;
    let job = AiJobRecord {
        id: "job-1".into(),
        chat: phone("+4915100001").jid(),
        inbound_id: "H1".into(),
        prompt: "what are your hours?".into(),
        status: AiJobStatus::Running,
    };
    store.start_ai_job(&fence, &job).await.unwrap();
    store.start_ai_job(&fence, &job).await.unwrap();
    assert_eq!(store.ai_job("job-1").await.unwrap(), Some(job.clone()));
    store
        .finish_ai_job(&fence, "job-1", Ok("9 to 5"))
        .await
        .unwrap();
    store
        .finish_ai_job(&fence, "job-1", Err("late duplicate"))
        .await
        .unwrap();
    assert_eq!(
        store.ai_job("job-1").await.unwrap().unwrap().status,
        AiJobStatus::Done("9 to 5".into())
    );
    assert_eq!(store.ai_job("nope").await.unwrap(), None);
}

async fn events_are_claimed_leased_and_settled(db: &TestDb) {
    let store = seeded(db).await;
    let mut seqs = Vec::new();
    for i in 0..3 {
        let payload = serde_json::json!({ "i": i });
        seqs.push(
            store
                .enqueue_event("t1", "message.received", &payload)
                .await
                .unwrap(),
        );
    }
    let lease = Duration::from_secs(60);
    let first = store.claim_events(2, lease).await.unwrap();
    assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs[..2]);
    assert_eq!(first[0].payload["i"], 0);
    let second = store.claim_events(10, lease).await.unwrap();
    assert_eq!(second.len(), 1, "leased events are not handed out twice");
    assert_eq!(second[0].seq, seqs[2]);
    assert!(store.claim_events(10, lease).await.unwrap().is_empty());

    store.event_delivered(seqs[0]).await.unwrap();
    store
        .event_failed(seqs[1], "HTTP 500", Some(Duration::ZERO))
        .await
        .unwrap();
    store.event_failed(seqs[2], "HTTP 410", None).await.unwrap();
    let retried = store.claim_events(10, lease).await.unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!((retried[0].seq, retried[0].attempts), (seqs[1], 1));
}

async fn audit_log_is_newest_first(db: &TestDb) {
    let store = seeded(db).await;
    for action in ["number.add", "flow.publish"] {
        store
            .audit(&AuditEntry {
                tenant: Some("t1".into()),
                actor: "token:admin".into(),
                action: action.into(),
                target: N1.into(),
                detail: serde_json::json!({ "via": "api" }),
            })
            .await
            .unwrap();
    }
    let log = store.audit_log("t1", 10).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["flow.publish", "number.add"]
    );
    assert_eq!(log[0].detail["via"], "api");
    assert!(store.audit_log("t2", 10).await.unwrap().is_empty());
}

async fn concurrent_writers_lose_nothing_and_duplicate_nothing(db: &TestDb) {
    let store = seeded(db).await;
    // Many owners handed out at once get distinct, rising tokens.
    let n1 = phone(N1);
    let tokens = futures_util::future::join_all((0..16).map(|_| store.next_token(&n1))).await;
    let tokens: HashSet<u64> = tokens.into_iter().map(|t| t.unwrap().get()).collect();
    assert_eq!(tokens.len(), 16);

    let fences = [own(&store, N1).await, own(&store, N2).await];
    let mut tasks = Vec::new();
    for writer in 0..8_u32 {
        let store = store.clone();
        let fences = fences.clone();
        tasks.push(tokio::spawn(async move {
            let mut new = 0;
            for i in 0..100_u32 {
                // Writers overlap: each message is offered by two writers.
                let id = format!("W{}", (writer / 2) * 100 + i);
                let fence = &fences[(i % 2) as usize];
                let m = msg("+4915100001", &id, "concurrent");
                if store.record_inbound(fence, &m).await.unwrap() == Recorded::New {
                    new += 1;
                }
                let done = completion(fence, &m, Some("ok"), 1);
                store.complete(fence, done).await.unwrap();
            }
            new
        }));
    }
    let mut new = 0;
    for t in tasks {
        new += t.await.unwrap();
    }
    assert_eq!(
        new, 400,
        "each distinct message recorded as new exactly once"
    );
    for n in [N1, N2] {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbound WHERE number = $1")
            .bind(n)
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(count, 200);
        assert_eq!(
            store.unsent(&phone(n)).await.unwrap().len(),
            200,
            "one reply each"
        );
    }
}

async fn direct_batches_write_like_the_batcher_and_a_closed_store_refuses(db: &TestDb) {
    let store = seeded(db).await;
    let fence = own(&store, N1).await;
    let stale = Fence {
        number: phone(N2),
        token: own(&store, N2).await.token,
    };
    own(&store, N2).await;
    let m = msg("+4915100001", "K1", "hello");
    let done = completion(&fence, &m, Some("hi"), 1);
    let reply = done.replies[0].id.clone();
    store
        .commit_batch(vec![HotWrite::Inbound(fence.clone(), m.clone())])
        .await
        .unwrap();
    store
        .commit_batch(vec![HotWrite::Complete(fence.clone(), done)])
        .await
        .unwrap();
    assert_eq!(store.unsent(&phone(N1)).await.unwrap().len(), 1);
    store
        .commit_batch(vec![HotWrite::Sent(fence.clone(), reply)])
        .await
        .unwrap();
    assert!(store.unsent(&phone(N1)).await.unwrap().is_empty());
    let fenced = store
        .commit_batch(vec![HotWrite::Inbound(
            stale,
            msg("+4915100001", "K2", "x"),
        )])
        .await;
    assert!(
        matches!(fenced, Err(StoreError::Fenced { .. })),
        "{fenced:?}"
    );

    store.close().await;
    let after = store
        .record_inbound(&fence, &msg("+4915100001", "K3", "late"))
        .await;
    assert!(matches!(after, Err(StoreError::Closed)), "{after:?}");
}

/// A batch of thousands of writes: the same rows and answers as one write at a time.
async fn large_batches_write_the_same_rows_as_small_ones(db: &TestDb) {
    let store = seeded(db).await;
    let fence = own(&store, N1).await;
    let msgs: Vec<InboundMessage> = (0..600)
        .map(|i| msg(&format!("+49151{:05}", i % 40), &format!("L{i}"), "bulk"))
        .collect();
    // Concurrent callers: the batcher gathers them into large batches.
    let recorded =
        futures_util::future::join_all(msgs.iter().map(|m| store.record_inbound(&fence, m))).await;
    assert!(recorded.iter().all(|r| *r == Ok(Recorded::New)));
    let again =
        futures_util::future::join_all(msgs.iter().map(|m| store.record_inbound(&fence, m))).await;
    assert!(
        again
            .iter()
            .all(|r| *r == Ok(Recorded::Duplicate { processed: false }))
    );
    let dones: Vec<Completion> = msgs
        .iter()
        .map(|m| completion(&fence, m, Some("ok"), 2))
        .collect();
    let queued =
        futures_util::future::join_all(dones.iter().map(|d| store.complete(&fence, d.clone())))
            .await;
    assert!(
        queued
            .iter()
            .all(|q| q.as_ref().is_ok_and(|ids| ids.len() == 1))
    );
    assert!(store.unprocessed(&phone(N1)).await.unwrap().is_empty());
    let unsent = store.unsent(&phone(N1)).await.unwrap();
    assert_eq!(unsent.len(), 600);
    let marked =
        futures_util::future::join_all(unsent.iter().map(|r| store.mark_sent(&fence, &r.reply.id)))
            .await;
    assert!(marked.iter().all(|m| *m == Ok(true)));
    assert!(store.unsent(&phone(N1)).await.unwrap().is_empty());
    let (body, preview, status) = raw_inbound(&store, "L7").await;
    assert_eq!(
        (body, preview.as_str(), status.as_str()),
        (None, "bulk", "processed")
    );
    assert_eq!(
        store.checkpoint(&phone(N1), &msgs[7].chat).await.unwrap(),
        Some(ChatContext {
            turns: 2,
            from_phone: 0
        })
    );
    let stale = Fence {
        number: phone(N1),
        token: switchboard_actors::store::FencingToken::new(1).unwrap(),
    };
    own(&store, N1).await;
    let fenced =
        futures_util::future::join_all((0..300).map(|i| store.record_inbound(&stale, &msgs[i])))
            .await;
    assert!(
        fenced
            .iter()
            .all(|r| matches!(r, Err(StoreError::Fenced { .. })))
    );
}

/// A removed number's writes fail with `NotFound` and store nothing; the other writes of the same
/// batch commit. Its fence outlives it: added again, it gets a higher token.
async fn writes_for_a_removed_number_fail_alone(db: &TestDb) {
    let store = seeded(db).await;
    let kept = own(&store, N1).await;
    let gone = own(&store, N2).await;
    store.remove_number(&phone(N2)).await.unwrap();
    let batch = store
        .commit_batch(vec![
            HotWrite::Inbound(
                gone.clone(),
                msg("+4915100001", "G1", "to a removed number"),
            ),
            HotWrite::Inbound(kept.clone(), msg("+4915100001", "G2", "to a kept number")),
        ])
        .await;
    assert!(matches!(batch, Err(StoreError::NotFound(_))), "{batch:?}");
    assert_eq!(store.unprocessed(&phone(N1)).await.unwrap().len(), 1);
    let single = store
        .record_inbound(&gone, &msg("+4915100001", "G3", "again"))
        .await;
    assert!(matches!(single, Err(StoreError::NotFound(_))), "{single:?}");
    let dead = store
        .dead_letter(
            &gone,
            &msg("+4915100001", "G4", "dead"),
            &DeadLetterReason::RestartBudgetSpent {
                last_error: "panicked".into(),
            },
        )
        .await;
    assert!(matches!(dead, Err(StoreError::NotFound(_))), "{dead:?}");
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbound WHERE number = $1")
        .bind(N2)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(rows, 0);

    add(&store, N2, "t1").await;
    let back = own(&store, N2).await;
    assert!(back.token > gone.token);
    store
        .record_inbound(&back, &msg("+4915100001", "G5", "welcome back"))
        .await
        .unwrap();
    let stale = store
        .record_inbound(&gone, &msg("+4915100001", "G6", "stale"))
        .await;
    assert!(matches!(stale, Err(StoreError::Fenced { .. })), "{stale:?}");
}

async fn unlogged_messages_are_recorded_with_their_completion_once(db: &TestDb) {
    let store = seeded(db).await;
    tenant(&store, "t2", true).await;
    add(&store, "+15550003", "t2").await;
    let fence = own(&store, N1).await;
    let long: String = "abcdefghij".repeat(30);
    let chat = |m: &InboundMessage| m.chat.clone();

    // New: recorded processed (preview only), reply queued and checkpoint saved, in one write;
    // several in one batch.
    let fresh: Vec<InboundMessage> = (0..3)
        .map(|i| msg(&format!("+491510002{i}"), &format!("U{i}"), &long))
        .collect();
    let writes = fresh.iter().enumerate().map(|(i, m)| {
        let turns = u64::try_from(i).unwrap() + 1;
        store.record_completed(&fence, m, completion(&fence, m, Some("hi"), turns))
    });
    let answers = futures_util::future::join_all(writes).await;
    for (m, answer) in fresh.iter().zip(answers) {
        let reply = MessageId::derived(&fence.number, &m.chat, &m.sender, &m.id, 0);
        assert_eq!(answer, Ok(Some(vec![reply])));
        let (body, preview, status) = raw_inbound(&store, m.id.as_str()).await;
        assert_eq!((body, status.as_str()), (None, "processed"));
        assert_eq!(preview, long[..PREVIEW_CHARS]);
    }
    assert!(store.unprocessed(&phone(N1)).await.unwrap().is_empty());
    assert_eq!(store.unsent(&phone(N1)).await.unwrap().len(), 3);
    let saved = store.checkpoint(&phone(N1), &chat(&fresh[2])).await;
    assert_eq!(
        saved,
        Ok(Some(ChatContext {
            turns: 3,
            from_phone: 0
        }))
    );

    // Processed already (a redelivery): nothing is written, the answer says so.
    let again = completion(&fence, &fresh[2], Some("hi"), 9);
    assert_eq!(
        store.record_completed(&fence, &fresh[2], again).await,
        Ok(None)
    );
    let saved = store.checkpoint(&phone(N1), &chat(&fresh[2])).await;
    assert_eq!(
        saved,
        Ok(Some(ChatContext {
            turns: 3,
            from_phone: 0
        })),
        "not overwritten"
    );
    assert_eq!(
        store.record_inbound(&fence, &fresh[2]).await,
        Ok(Recorded::Duplicate { processed: true })
    );

    // Pending in the log (recorded by an earlier owner): completed like `complete`.
    let pending = msg("+4915100030", "U9", "hello");
    store.record_inbound(&fence, &pending).await.unwrap();
    let fence = own(&store, N1).await;
    let done = completion(&fence, &pending, Some("hi"), 1);
    let reply = done.replies[0].id.clone();
    assert_eq!(
        store.record_completed(&fence, &pending, done).await,
        Ok(Some(vec![reply]))
    );
    assert!(store.unprocessed(&phone(N1)).await.unwrap().is_empty());
    let saved = store.checkpoint(&phone(N1), &chat(&pending)).await;
    assert_eq!(
        saved,
        Ok(Some(ChatContext {
            turns: 1,
            from_phone: 0
        }))
    );

    // Dead-lettered: left as it is.
    let dead = msg("+4915100031", "U10", "hello");
    let reason = DeadLetterReason::RestartBudgetSpent {
        last_error: "boom".into(),
    };
    store.dead_letter(&fence, &dead, &reason).await.unwrap();
    let done = completion(&fence, &dead, Some("hi"), 1);
    assert_eq!(store.record_completed(&fence, &dead, done).await, Ok(None));
    assert_eq!(raw_inbound(&store, "U10").await.2, "dead");

    // A tenant that keeps transcripts keeps the whole text.
    let fence3 = own(&store, "+15550003").await;
    let m = msg("+4915100001", "U11", &long);
    let done = completion(&fence3, &m, None, 1);
    assert_eq!(
        store.record_completed(&fence3, &m, done).await,
        Ok(Some(vec![]))
    );
    assert_eq!(raw_inbound(&store, "U11").await.0, Some(long.clone()));

    // An older owner is refused and writes nothing.
    let newer = own(&store, N1).await;
    store
        .save_session(&newer, &Credentials("c".into()))
        .await
        .unwrap();
    let m = msg("+4915100032", "U12", "hello");
    let done = completion(&fence, &m, Some("hi"), 1);
    let refused = store.record_completed(&fence, &m, done).await;
    assert!(
        matches!(refused, Err(StoreError::Fenced { .. })),
        "{refused:?}"
    );
    assert_eq!(store.record_inbound(&newer, &m).await, Ok(Recorded::New));
}

/// Texts people really send that databases find hard: NUL, 64 KiB, right-to-left scripts and
/// their controls, emoji joined by ZWJ, and anything at all.
fn hard_text() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let samples = prop::sample::select(vec![
        "x\u{0}y",
        "\u{0}",
        "שלום עולם, مرحبا بالعالم",
        "\u{202E}reversed\u{202C} and \u{200F}marks",
        "👩‍👩‍👧‍👦 🏳️‍🌈 🧑🏽‍💻",
        "\u{FFFF} starts like an encoded one",
        "\u{FFFF}0\u{FFFF}",
        "",
    ]);
    prop_oneof![
        any::<String>(),
        samples.prop_map(str::to_owned),
        (any::<char>(), 1..4usize).prop_map(|(c, k)| c.to_string().repeat(65_536 / k)),
        (any::<String>(), any::<String>()).prop_map(|(a, b)| format!("{a}\u{0}{b}")),
    ]
}

async fn any_text_round_trips_inside_batches_of_ordinary_rows(db: &TestDb) {
    use proptest::strategy::{Strategy, ValueTree};
    let store = seeded(db).await;
    let fence = own(&store, N1).await;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for case in 0..24 {
        let texts: Vec<String> = (0..6)
            .map(|_| hard_text().new_tree(&mut runner).unwrap().current())
            .collect();
        // Queued together, so they share batches with ordinary rows.
        let mut msgs = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            msgs.push(msg("+4915100001", &format!("H{case}x{i}"), text));
            msgs.push(msg(
                "+4915100002",
                &format!("N{case}x{i}"),
                "an ordinary message",
            ));
        }
        let recorded: Vec<_> = msgs
            .iter()
            .map(|m| store.record_inbound(&fence, m))
            .collect();
        for r in futures_util::future::join_all(recorded).await {
            assert_eq!(r, Ok(Recorded::New));
        }
        let pending = store.unprocessed(&phone(N1)).await.unwrap();
        for m in &msgs {
            let stored = pending.iter().find(|p| p.id == m.id).expect("recorded");
            assert_eq!(stored.text, m.text, "inbound text of {}", m.id);
        }
        // Their replies carry the same texts, completed together.
        let done: Vec<_> = msgs
            .iter()
            .map(|m| store.complete(&fence, completion(&fence, m, Some(&m.text), 1)))
            .collect();
        for d in futures_util::future::join_all(done).await {
            assert_eq!(d.unwrap().len(), 1);
        }
        let unsent = store.unsent(&phone(N1)).await.unwrap();
        for m in &msgs {
            let reply = unsent
                .iter()
                .find(|r| r.reply.reply_to.as_ref() == Some(&m.id))
                .expect("queued");
            assert_eq!(reply.reply.text, m.text, "reply text to {}", m.id);
        }
        let sent: Vec<_> = unsent
            .iter()
            .map(|r| store.mark_sent(&fence, &r.reply.id))
            .collect();
        for s in futures_util::future::join_all(sent).await {
            assert_eq!(s, Ok(true));
        }
    }
}

async fn a_row_the_database_refuses_fails_alone_and_the_rest_of_its_batch_commits(db: &TestDb) {
    let store = seeded(db).await;
    let fence = own(&store, N1).await;
    // A rule of the database's that refuses one row for what it holds.
    let refuse: &[&str] = match store.dialect() {
        Dialect::Postgres => &[
            "CREATE FUNCTION refuse_marked() RETURNS trigger AS $$ BEGIN \
             IF NEW.preview LIKE '%REFUSE-ME%' THEN RAISE EXCEPTION 'refused for the test'; \
             END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_marked BEFORE INSERT ON inbound FOR EACH ROW \
             EXECUTE FUNCTION refuse_marked()",
        ],
        Dialect::Sqlite => &["CREATE TRIGGER refuse_marked BEFORE INSERT ON inbound \
             WHEN NEW.preview LIKE '%REFUSE-ME%' BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"],
    };
    for sql in refuse {
        sqlx::query(sql).execute(store.pool()).await.unwrap();
    }
    let msgs: Vec<InboundMessage> = (0..40)
        .map(|i| {
            let text = if i == 17 { "please REFUSE-ME" } else { "fine" };
            msg("+4915100001", &format!("R{i}"), text)
        })
        .collect();
    let recorded: Vec<_> = msgs
        .iter()
        .map(|m| store.record_inbound(&fence, m))
        .collect();
    let results = futures_util::future::join_all(recorded).await;
    for (i, r) in results.iter().enumerate() {
        if i == 17 {
            assert!(matches!(r, Err(StoreError::Refused(_))), "{r:?}");
            assert!(!r.as_ref().unwrap_err().is_retryable());
        } else {
            assert_eq!(*r, Ok(Recorded::New), "R{i}");
        }
    }
    assert_eq!(store.unprocessed(&phone(N1)).await.unwrap().len(), 39);
    assert!(store.health().is_up(), "a refusal is not an outage");
}

async fn expired_replies_leave_the_outbox_with_their_reason(db: &TestDb) {
    let store = seeded(db).await;
    let fence = own(&store, N1).await;
    let m = msg("+4915100001", "X1", "hello");
    store.record_inbound(&fence, &m).await.unwrap();
    let done = completion(&fence, &m, Some("too late"), 1);
    let reply = done.replies[0].id.clone();
    store.complete(&fence, done).await.unwrap();
    store
        .expire(&fence, &reply, "expired: past the backlog's age")
        .await
        .unwrap();
    assert!(store.unsent(&phone(N1)).await.unwrap().is_empty());
    let row = sqlx::query("SELECT status, last_error FROM outbox WHERE message_id = $1")
        .bind(reply.as_str())
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>(0), "expired");
    assert!(row.get::<String, _>(1).contains("age"));
    // A late sent mark does not resurrect it as queued, and an old owner cannot expire.
    let stale = Fence {
        token: FencingToken::new(fence.token.get() - 1).unwrap_or(fence.token),
        ..fence.clone()
    };
    own(&store, N1).await;
    assert!(matches!(
        store.expire(&stale, &reply, "x").await,
        Err(StoreError::Fenced { .. })
    ));
}

async fn operators_changes_commit_with_their_audit_row_or_not_at_all_and_pages_follow_keys(
    db: &TestDb,
) {
    let store = db.store().await;
    let entry = |action: &str, target: &str| AuditEntry {
        tenant: Some("t1".into()),
        actor: "tok_a".into(),
        action: action.into(),
        target: target.into(),
        detail: serde_json::json!({ "after": { "x": 1 } }),
    };
    let t1 = TenantRecord {
        id: "t1".into(),
        name: "One".into(),
        full_transcripts: false,
    };
    store
        .apply(
            &Change::CreateTenant(t1.clone()),
            &entry("tenant.create", "t1"),
        )
        .await
        .unwrap();
    assert_eq!(store.tenant("t1").await.unwrap(), Some(t1.clone()));
    // A change that fails leaves no audit row: the two commit together or not at all.
    let orphan = NumberRecord {
        number: phone("+15550777"),
        tenant: "missing".into(),
        pinned_node: None,
        settings: serde_json::json!({}),
    };
    assert!(matches!(
        store
            .apply(
                &Change::AddNumber(orphan),
                &entry("number.create", "+15550777")
            )
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .apply(&Change::CreateTenant(t1), &entry("tenant.create", "t1"))
            .await,
        Err(StoreError::Conflict(_))
    ));
    let log = store.audit_page(Some("t1"), None, 10).await.unwrap();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].entry.action, "tenant.create");

    // Tokens: found by hash while live; revoked once.
    let token = TokenRecord {
        id: "tok_1".into(),
        tenant: "t1".into(),
        role: Role::Editor,
        name: "ops".into(),
        created_at_ms: 0,
        revoked: false,
    };
    let create = Change::CreateToken {
        token: token.clone(),
        hash: "ab".repeat(32),
    };
    store
        .apply(&create, &entry("token.create", "tok_1"))
        .await
        .unwrap();
    let found = store
        .token_by_hash(&"ab".repeat(32))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (found.id.as_str(), found.role, found.revoked),
        ("tok_1", Role::Editor, false)
    );
    assert!(
        store
            .token_by_hash(&"cd".repeat(32))
            .await
            .unwrap()
            .is_none()
    );
    let revoke = Change::RevokeToken {
        tenant: "t1".into(),
        id: "tok_1".into(),
    };
    store
        .apply(&revoke, &entry("token.revoke", "tok_1"))
        .await
        .unwrap();
    assert!(
        store
            .token_by_hash(&"ab".repeat(32))
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.token("t1", "tok_1").await.unwrap().unwrap().revoked);
    assert!(matches!(
        store.apply(&revoke, &entry("token.revoke", "tok_1")).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.tokens("t1", None, 10).await.unwrap().len(), 1);

    // Numbers page by number, per tenant or all; the audit log pages newest first.
    tenant(&store, "t2", false).await;
    for n in ["+15550003", "+15550001", "+15550002"] {
        add(&store, n, "t1").await;
    }
    add(&store, "+15550009", "t2").await;
    let first = store.numbers_page(Some("t1"), None, 2).await.unwrap();
    let got: Vec<String> = first.iter().map(|n| n.number.to_string()).collect();
    assert_eq!(got, ["+15550001", "+15550002"]);
    let rest = store
        .numbers_page(Some("t1"), Some(&phone("+15550002")), 2)
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(store.numbers_page(None, None, 10).await.unwrap().len(), 4);
    let newest = store.audit_page(Some("t1"), None, 2).await.unwrap();
    assert_eq!(newest[0].entry.action, "token.revoke");
    assert!(newest[0].seq > newest[1].seq);
    let older = store
        .audit_page(Some("t1"), Some(newest[1].seq), 10)
        .await
        .unwrap();
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].entry.action, "tenant.create");
    assert!(
        store
            .audit_page(Some("t2"), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn business_sends_are_queued_once_per_id_and_a_reused_key_is_told_apart(db: &TestDb) {
    let store = seeded(db).await;
    let fence = own(&store, N1).await;
    let send = |id: &str, text: &str| OutboundText {
        id: MessageId::parse(id).unwrap(),
        to: phone("+4915100001").jid(),
        text: text.to_owned(),
        reply_to: None,
        reply_to_sender: None,
    };
    let first = send("3EB0AAAA", "your order shipped \u{0}\u{FFFF}");
    assert_eq!(store.queue_send(&fence, &first).await, Ok(Queued::New));
    assert_eq!(
        store.queue_send(&fence, &first).await,
        Ok(Queued::Repeat { unsent: true })
    );
    let unsent = store.unsent(&phone(N1)).await.unwrap();
    assert_eq!(
        unsent.iter().map(|u| &u.reply).collect::<Vec<_>>(),
        vec![&first],
        "queued once, text intact"
    );
    assert_eq!(
        store
            .queue_send(&fence, &send("3EB0AAAA", "another text"))
            .await,
        Ok(Queued::KeyReused)
    );
    let elsewhere = OutboundText {
        to: phone("+4915100002").jid(),
        ..first.clone()
    };
    assert_eq!(
        store.queue_send(&fence, &elsewhere).await,
        Ok(Queued::KeyReused)
    );
    // Sent, it is still a repeat, no longer unsent.
    assert!(store.mark_sent(&fence, &first.id).await.unwrap());
    assert_eq!(
        store.queue_send(&fence, &first).await,
        Ok(Queued::Repeat { unsent: false })
    );
    // The same id on another number is another message; an old owner cannot queue.
    let other = own(&store, N2).await;
    assert_eq!(store.queue_send(&other, &first).await, Ok(Queued::New));
    let stale = fence.clone();
    own(&store, N1).await;
    assert!(matches!(
        store.queue_send(&stale, &send("3EB0BBBB", "late")).await,
        Err(StoreError::Fenced { .. })
    ));
    assert_eq!(store.unsent(&phone(N1)).await.unwrap().len(), 0);
}

async fn retention_prunes_old_processed_and_sent_rows_in_batches_and_keeps_the_rest(db: &TestDb) {
    let store = seeded(db).await;
    let fence = own(&store, N1).await;
    // 1,200 messages processed and answered; the first 1,100 of them long ago.
    let total = 1_200;
    let msgs: Vec<InboundMessage> = (0..total)
        .map(|i| msg("+4915100001", &format!("P{i:05}"), "hello"))
        .collect();
    let inbound = msgs
        .iter()
        .map(|m| HotWrite::Inbound(fence.clone(), m.clone()));
    store.commit_batch(inbound.collect()).await.unwrap();
    let done: Vec<_> = msgs
        .iter()
        .map(|m| HotWrite::Complete(fence.clone(), completion(&fence, m, Some("hi"), 1)))
        .collect();
    store.commit_batch(done).await.unwrap();
    let sent = store
        .unsent(&phone(N1))
        .await
        .unwrap()
        .into_iter()
        .map(|u| HotWrite::Sent(fence.clone(), u.reply.id))
        .collect();
    store.commit_batch(sent).await.unwrap();
    // Old, but not to be pruned: a pending message and a dead letter.
    let pending = msg("+4915100002", "OLD-PENDING", "still waiting");
    store.record_inbound(&fence, &pending).await.unwrap();
    let dead = msg("+4915100002", "OLD-DEAD", "poison");
    let reason = DeadLetterReason::RestartBudgetSpent {
        last_error: "x".into(),
    };
    store.dead_letter(&fence, &dead, &reason).await.unwrap();
    let old = 1_000_i64;
    for sql in [
        "UPDATE inbound SET received_at = $1 WHERE message_id < 'P01100' OR message_id LIKE 'OLD%'",
        "UPDATE outbox SET created_at = $1 WHERE reply_to < 'P01100'",
    ] {
        sqlx::query(sql)
            .bind(old)
            .execute(store.pool())
            .await
            .unwrap();
    }

    let pruned = store.prune(old + 1).await.unwrap();
    assert_eq!(
        (pruned.inbound, pruned.outbox),
        (1_100, 1_100),
        "in batches of 1,000"
    );
    let left = |sql: &'static str| {
        let store = store.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(store.pool())
                .await
                .unwrap()
        }
    };
    assert_eq!(
        left("SELECT COUNT(*) FROM inbound WHERE status = 'processed'").await,
        100
    );
    assert_eq!(left("SELECT COUNT(*) FROM outbox").await, 100);
    assert_eq!(
        left("SELECT COUNT(*) FROM inbound WHERE message_id LIKE 'OLD%'").await,
        2,
        "pending and dead rows stay"
    );
    assert_eq!(store.unprocessed(&phone(N1)).await.unwrap(), vec![pending]);
    assert_eq!(store.prune(old + 1).await.unwrap(), Default::default());
}
