//! `switchboard numbers login NUMBER [--pair-code PHONE]`: pairs a number from the terminal.
//!
//! It claims the store like a node (so it never runs beside `serve` on the same store: stop the
//! node first, or log in before the node runs the number), takes a fresh ownership of the number,
//! and starts its session on the configured transport. Each QR code is drawn in the terminal as
//! it arrives (they rotate: 60 s, then 20 s each), or, with `--pair-code`, the 8-character code
//! to type on the phone (WhatsApp > Linked devices > Link with phone number). When the phone
//! confirms, the session is saved and the command waits for the first login, then exits 0. It
//! fails with the reason when the codes run out or the server refuses the number.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use qrcode::QrCode;
use qrcode::render::unicode::Dense1x2;
use switchboard_actors::PhoneNumber;
use switchboard_actors::store::{Fence, Store};
use switchboard_actors::transport::{AccountSpec, EventSink, WaEvent, WaSession};
use tokio::sync::mpsc;

use crate::app::{connector, open_store};
use crate::config::Config;

/// How long the whole pairing may take.
const PAIRING_DEADLINE: Duration = Duration::from_secs(600);
/// How long the first login after pairing may take.
const LOGIN_DEADLINE: Duration = Duration::from_secs(120);

/// Pairs `number`, writing what the operator needs to `out`.
pub async fn run(
    config: &Config,
    number: PhoneNumber,
    pair_code: Option<String>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if let Some(phone) = &pair_code {
        let phone = PhoneNumber::parse(phone).with_context(|| format!("--pair-code {phone:?}"))?;
        anyhow::ensure!(
            phone == number,
            "--pair-code {phone} is not the number being logged in ({number})"
        );
    }
    let store = open_store(&config.store).await?;
    let claim = store.claim(&config.node_id).await?;
    anyhow::ensure!(
        store.number(&number).await?.is_some(),
        "{number} is not registered; add it with `switchboard numbers add {number}`"
    );
    let (store_port, coordinator) = store.ports();
    let lease = coordinator.acquire(&number).await?;
    let fence = lease.fence().clone();
    let credentials = store_port.load_session(&number).await?;
    let (tx, mut events) = mpsc::unbounded_channel();
    let sink: EventSink = std::sync::Arc::new(move |e| {
        let _ = tx.send(e);
    });
    let account = AccountSpec {
        number: number.clone(),
        client_label: config.runtime.client_label.clone(),
        credentials,
        lease,
    };
    let session = connector(&config.transport, &store)
        .start(account, sink)
        .await?;
    let outcome = pair(
        &*session,
        &*store_port,
        &fence,
        pair_code.is_some(),
        &mut events,
        out,
    )
    .await;
    session.shutdown().await;
    drop(claim);
    store.close().await;
    outcome
}

async fn pair(
    session: &dyn WaSession,
    store: &dyn Store,
    fence: &Fence,
    want_pair_code: bool,
    events: &mut mpsc::UnboundedReceiver<WaEvent>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PAIRING_DEADLINE;
    let mut asked_for_code = false;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .context("pairing took longer than 10 minutes")?
            .context("the session ended")?;
        match event {
            WaEvent::QrCode { code, valid_for } => {
                if want_pair_code {
                    // The server is there: now a pair code can be asked for.
                    if !asked_for_code {
                        asked_for_code = true;
                        session.request_pair_code().await?;
                    }
                    continue;
                }
                let qr = QrCode::new(code.as_bytes()).context("drawing the QR code")?;
                let drawn = qr.render::<Dense1x2>().quiet_zone(true).build();
                // Clear the screen, so the code on it is always the current one.
                writeln!(out, "\x1b[2J\x1b[H{drawn}")?;
                writeln!(
                    out,
                    "Scan with WhatsApp on the phone of {}: Settings > Linked devices > Link a \
                     device. This code is valid for {} s; the next one follows.",
                    fence.number,
                    valid_for.as_secs()
                )?;
            }
            WaEvent::PairCode { code, valid_for } => writeln!(
                out,
                "On the phone of {}: Settings > Linked devices > Link with phone number, and \
                 enter {code} (valid for {} s).",
                fence.number,
                valid_for.as_secs()
            )?,
            WaEvent::PairCodeFailed {
                reason,
                retry_after,
            } => {
                bail!("the pair code was refused: {reason} (retry after {retry_after:?})")
            }
            WaEvent::PairFailed { reason } => writeln!(out, "pairing failed: {reason}; go on")?,
            WaEvent::QrCodesExhausted { disconnected: true } => {
                bail!("the codes ran out unscanned; run the command again")
            }
            WaEvent::PairSuccess { credentials } => {
                store.save_session(fence, &credentials).await?;
                writeln!(out, "paired; logging in…")?;
                return logged_in(events, out).await;
            }
            WaEvent::Connected => {
                writeln!(out, "{} is paired already and logged in", fence.number)?;
                return Ok(());
            }
            e if e.is_terminal() => bail!("the server ended the session: {e:?}"),
            _ => {}
        }
        out.flush()?;
    }
}

async fn logged_in(
    events: &mut mpsc::UnboundedReceiver<WaEvent>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + LOGIN_DEADLINE;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .context("paired, but the first login took longer than 2 minutes")?
            .context("the session ended")?;
        match event {
            WaEvent::Connected => {
                writeln!(
                    out,
                    "logged in; `switchboard serve` runs the number from now on"
                )?;
                return Ok(());
            }
            e if e.is_terminal() => bail!("paired, then the server ended the session: {e:?}"),
            _ => {}
        }
    }
}
