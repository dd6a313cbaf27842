//! `switchboard numbers login`: the QR code (or a pair code) in the terminal until the phone
//! confirms, against the simulator over its wire; then `serve` runs the number without pairing.
#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/fleet.rs"]
mod fleet;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fleet::{Rig, wait_healthy};
use serde_json::json;

/// Runs `numbers login` with `args`; calls `answer` on the first line `prompt` marks, and
/// returns the whole output once the command exits 0.
async fn login(rig: &Rig, args: &[&str], prompt: &str, answer: impl AsyncFnOnce(&str)) -> String {
    let mut cmd = rig.node.command(&["numbers", "login"]);
    let mut child = cmd
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    let mut out = String::new();
    let mut answer = Some(answer);
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Ok(Some(line)) = tokio::time::timeout_at(deadline.into(), lines.recv()).await {
        out.push_str(&line);
        out.push('\n');
        if line.contains(prompt)
            && let Some(answer) = answer.take()
        {
            answer(&line).await;
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "login failed: {status}\n{out}");
    out
}

async fn serve_runs_it_without_pairing(rig: &Rig) {
    let _serve = rig.node.start();
    wait_healthy(&rig.http, &format!("{}/readyz", rig.node.http)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while rig.metric("switchboard_numbers{state=\"online\"}").await < 1.0 {
        assert!(Instant::now() < deadline, "{}", rig.node.log_tail(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qr_code_is_shown_until_the_phone_scans_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/login.db?mode=rwc", dir.path().display());
    let n = "+15550401";
    let rig = Rig::new(&url, vec![n.to_owned()], &[]).await;
    let out = login(&rig, &[n], "Scan with WhatsApp", async |_| {
        rig.post(&format!("/accounts/{n}/pair"), json!({})).await;
    })
    .await;
    // Drawn with half blocks, in a quiet zone of white.
    assert!(out.contains('▀') || out.contains('▄'), "{out}");
    assert!(out.contains("paired") && out.contains("logged in"), "{out}");
    serve_runs_it_without_pairing(&rig).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_code_is_shown_and_confirmed_on_the_phone() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/login.db?mode=rwc", dir.path().display());
    let n = "+15550402";
    let rig = Rig::new(&url, vec![n.to_owned()], &[]).await;
    let out = login(&rig, &[n, "--pair-code", n], "enter ", async |line| {
        let code = line
            .split("enter ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap();
        assert_eq!(code.len(), 8, "{line}");
        // The device shows the code as it sends it to the server: the phone may be quicker
        // than the server's copy, as a person never is.
        let url = format!("{}/accounts/{n}/pair", rig.sim);
        for _ in 0..50 {
            let r = rig
                .http
                .post(&url)
                .json(&json!({ "code": code }))
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the pair code {code} was never accepted");
    })
    .await;
    assert!(
        !out.contains("Scan with WhatsApp"),
        "no QR code asked for: {out}"
    );
    serve_runs_it_without_pairing(&rig).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_that_is_not_registered_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/login.db?mode=rwc", dir.path().display());
    let rig = Rig::new(&url, vec!["+15550403".to_owned()], &[]).await;
    let out = rig
        .node
        .command(&["numbers", "login", "+15550499"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not registered"), "{err}");
}
