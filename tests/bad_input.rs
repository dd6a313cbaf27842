//! Bad input on PostgreSQL, against the real processes: among ordinary traffic on other numbers,
//! one number gets a message with a NUL character (which PostgreSQL `text` cannot hold), one of
//! 64 KiB and one in mixed scripts with emoji. Each is answered with its text intact, its chat
//! goes on, and no conversation anywhere restarts.
#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/db.rs"]
mod db;
#[path = "support/fleet.rs"]
mod fleet;

use std::time::{Duration, Instant};

use db::TestDb;
use fleet::Rig;
use serde_json::json;
use switchboard::store::Dialect;

fn number(i: usize) -> String {
    format!("+1555400{i:04}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_huge_and_mixed_script_messages_are_answered_and_harm_no_other_number() {
    let db = TestDb::new(Dialect::Postgres).await;
    let numbers: Vec<String> = (0..6).map(number).collect();
    let rig = Rig::new(&db.url, numbers.clone(), &[]).await;
    let _serve = rig.serve().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rig.metric("switchboard_numbers{state=\"online\"}").await < 6.0 {
        assert!(Instant::now() < deadline, "numbers not online");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let others: Vec<&String> = numbers[1..].iter().collect();
    rig.post(
        "/traffic",
        json!({"numbers": others, "contacts_per_number": 5, "rate_per_s": 4,
               "duration_s": 20, "seed": 5}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let bad = &numbers[0];
    let huge = "long message ".repeat(65_536 / 13);
    let texts = [
        "x\u{0}y".to_owned(),
        huge.clone(),
        "Hola مرحبا שלום 你好 👩‍👩‍👧‍👦 \u{202E}olleh\u{202C}".to_owned(),
    ];
    let mut asked = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let from = format!("+49160000{i:04}");
        let r = rig
            .post(
                &format!("/accounts/{bad}/inbound"),
                json!({"from": from, "text": text}),
            )
            .await;
        asked.push((from, r["id"].as_str().unwrap().to_owned()));
    }
    // Each chat goes on afterwards.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (from, _) in &asked {
        rig.post(
            &format!("/accounts/{bad}/inbound"),
            json!({"from": from, "text": "hours?"}),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    let s = rig.drained(Duration::from_secs(120)).await;
    println!("ledger: {s}");

    let events = rig.ledger(bad).await;
    for ((_, id), text) in asked.iter().zip(&texts) {
        let reply = events
            .iter()
            .find(|e| e["event"] == "outbound_received" && e["reply_to"] == id.as_str())
            .unwrap_or_else(|| panic!("no reply to {id}"));
        let said = reply["text"].as_str().unwrap();
        // The bot answers "… You said: <the text, trimmed>".
        assert!(said.ends_with(text.trim()), "the text came back intact");
    }
    let hours = events
        .iter()
        .filter(|e| {
            e["event"] == "outbound_received"
                && e["text"].as_str().is_some_and(|t| t.contains("9:00"))
        })
        .count();
    assert_eq!(hours, 3, "every chat went on");
    assert_eq!(rig.metric("switchboard_actor_restarts_total").await, 0.0);
    assert_eq!(rig.metric("switchboard_dead_letters_total").await, 0.0);
    assert_eq!(s["duplicate_replies"], 0);
    assert_eq!(s["inbound_unanswered"], 0);
}
