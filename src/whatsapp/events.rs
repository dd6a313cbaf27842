//! whatsapp-rust's `Event` as Switchboard's [`WaEvent`]: one pure function, [`map_event`],
//! called inline on the client's receive path (it never blocks and never allocates more than
//! the events it returns).
//!
//! What maps to what:
//!
//! | whatsapp-rust | Switchboard |
//! |---|---|
//! | `PairingQrCode`, `PairingQrCodesExhausted` | `QrCode`, `QrCodesExhausted` |
//! | `PairingCode`, `PairingCodeRefresh`, `PairingCodeError` | `PairCode`, `PairCodeRefresh`, `PairCodeFailed` |
//! | `PairSuccess`, `PairError` | `PairSuccess` (the device's JIDs as credentials), `PairFailed` |
//! | `Connected`, `Disconnected` | `Connected`, `Disconnected` (a close frame is `ServerClosed`) |
//! | `LoggedOut`, `StreamReplaced`, `TemporaryBan`, `ClientOutdated` | the same (terminal) |
//! | `ConnectFailure`, `StreamError` | the same (`will_retry` for 500 and 503) |
//! | `Messages` | `Message`, or `FromPhone` when `is_from_me` (text, caption, media metadata); one with neither text nor media (a reaction, an edit, a protocol message) maps to nothing |
//! | `UndecryptableMessage` | `Undecryptable` |
//! | `Receipt` (delivered; read, played) | `Receipt` (`Delivered`; `Read`) |
//! | `ServerAck` of a message | `ServerAck` (a nack code is the error) |
//! | `ChatPresence`, `OfflineSyncPreview`, `OfflineSyncCompleted` | the same |
//!
//! Everything else (app-state, contacts, calls, groups' notifications, history…) maps to
//! nothing. So does anything whose addresses Switchboard does not serve (newsletters, status,
//! broadcast lists) or whose id it cannot carry: such input is counted and dropped, never a
//! panic.

use std::time::Duration;

use switchboard_actors::ids::Jid;
use switchboard_actors::transport::{
    AckError, Credentials, DisconnectReason, InboundMessage, Media, MediaKind, MessageId, Receipt,
    ReceiptKind, ServerAck, WaEvent,
};
use whatsapp_rust::wacore::net::DisconnectReason as WaDisconnectReason;
use whatsapp_rust::wacore::proto_helpers::MessageExt;
use whatsapp_rust::wacore::types::events::{self as wa_events, Event};
use whatsapp_rust::wacore::types::message::{MessageInfo, MessageSource};
use whatsapp_rust::wacore::types::presence::{ChatPresence, ReceiptType};
use whatsapp_rust::waproto::whatsapp as wa;

/// The metric counting events dropped because Switchboard cannot carry them.
pub const DROPPED: &str = "switchboard_whatsapp_events_dropped_total";

/// The events `event` means to Switchboard, in order (a message batch is one per message).
pub fn map_event(event: &Event) -> Vec<WaEvent> {
    let one = match event {
        Event::PairingQrCode(e) => WaEvent::QrCode {
            code: e.code.clone(),
            valid_for: e.timeout,
        },
        Event::PairingQrCodesExhausted(e) => WaEvent::QrCodesExhausted {
            disconnected: e.disconnected,
        },
        Event::PairingCode(e) => WaEvent::PairCode {
            code: e.code.clone(),
            valid_for: e.timeout,
        },
        Event::PairingCodeRefresh(_) => WaEvent::PairCodeRefresh,
        Event::PairingCodeError(e) => WaEvent::PairCodeFailed {
            reason: e.error.clone(),
            retry_after: e.backoff,
        },
        Event::PairSuccess(e) => WaEvent::PairSuccess {
            credentials: credentials(&e.id, &e.lid, &e.platform),
        },
        Event::PairError(e) => WaEvent::PairFailed {
            reason: e.error.clone(),
        },
        Event::Connected(_) => WaEvent::Connected,
        Event::Disconnected(e) => WaEvent::Disconnected {
            reason: disconnect_reason(&e.reason),
        },
        Event::LoggedOut(_) => WaEvent::LoggedOut,
        Event::StreamReplaced(_) => WaEvent::StreamReplaced,
        Event::TemporaryBan(e) => WaEvent::TemporaryBan {
            code: u16::try_from(e.code.code()).unwrap_or(0),
            duration: e.expire.to_std().unwrap_or(Duration::ZERO),
        },
        Event::ClientOutdated(_) => WaEvent::ClientOutdated,
        Event::ConnectFailure(e) => WaEvent::ConnectFailure {
            code: u16::try_from(e.reason.code()).unwrap_or(0),
            message: e.message.clone(),
            will_retry: e.reason.should_reconnect(),
        },
        Event::StreamError(e) => WaEvent::StreamError {
            code: e.code.clone(),
        },
        Event::OfflineSyncPreview(e) => WaEvent::OfflineSyncPreview {
            total: count(e.total),
            messages: count(e.messages),
        },
        Event::OfflineSyncCompleted(e) => WaEvent::OfflineSyncCompleted {
            count: count(e.count),
        },
        Event::Messages(batch) => {
            return batch
                .iter()
                .filter_map(|m| inbound(&m.info, &m.message))
                .collect();
        }
        Event::UndecryptableMessage(e) => {
            let Some(event) = or_dropped(undecryptable(&e.info), "undecryptable") else {
                return Vec::new();
            };
            event
        }
        Event::Receipt(r) => match receipt(r) {
            Some(event) => event,
            None => return Vec::new(),
        },
        Event::ServerAck(a) => match server_ack(a) {
            Some(event) => event,
            None => return Vec::new(),
        },
        Event::ChatPresence(p) => {
            let Some(event) = or_dropped(chat_presence(p), "chat_presence") else {
                return Vec::new();
            };
            event
        }
        _ => return Vec::new(),
    };
    vec![one]
}

/// A message of a batch (from the durability hook or the `Messages` event) as Switchboard's.
/// `None` (counted as dropped) when its addresses or id are not ones Switchboard serves, or when
/// it carries neither text nor media: reactions, edits, revokes, poll votes and the protocol
/// messages of the account's own devices are not messages to answer.
pub fn inbound(info: &MessageInfo, message: &wa::Message) -> Option<WaEvent> {
    let event = readable(info, message);
    if event.is_none() {
        metrics::counter!(DROPPED, "event" => "message").increment(1);
    }
    event
}

fn readable(info: &MessageInfo, message: &wa::Message) -> Option<WaEvent> {
    let (chat, sender, sender_alt) = addresses(&info.source)?;
    let base = message.get_base_message();
    let media = media(base);
    let text = base
        .text_content()
        .or_else(|| base.get_caption())
        .unwrap_or_default()
        .to_owned();
    if text.is_empty() && media.is_none() {
        return None;
    }
    let msg = InboundMessage {
        id: MessageId::parse(&info.id)?,
        chat,
        sender,
        sender_alt,
        is_from_me: info.source.is_from_me,
        text,
        media,
        timestamp_ms: u64::try_from(info.timestamp.timestamp_millis()).unwrap_or(0),
        offline: info.is_offline,
    };
    Some(if msg.is_from_me {
        WaEvent::FromPhone(msg)
    } else {
        WaEvent::Message(msg)
    })
}

fn undecryptable(info: &MessageInfo) -> Option<WaEvent> {
    let (chat, sender, _) = addresses(&info.source)?;
    Some(WaEvent::Undecryptable {
        chat,
        sender,
        id: MessageId::parse(&info.id)?,
        offline: info.is_offline,
    })
}

fn receipt(r: &wa_events::Receipt) -> Option<WaEvent> {
    let kind = match r.r#type {
        ReceiptType::Delivered => ReceiptKind::Delivered,
        // A voice note played has been read.
        ReceiptType::Read | ReceiptType::Played => ReceiptKind::Read,
        // Our other devices' reads, retries, server errors, peers' own…: not about our sends
        // reaching a contact.
        _ => return None,
    };
    let chat = or_dropped(jid(&r.source.chat), "receipt")?;
    let sender = r.source.is_group.then(|| jid(&r.source.sender)).flatten();
    let ids: Vec<MessageId> = r
        .message_ids
        .iter()
        .filter_map(|id| MessageId::parse(id))
        .collect();
    if ids.is_empty() {
        return None;
    }
    Some(WaEvent::Receipt(Receipt {
        chat,
        sender,
        ids,
        kind,
        offline: r.offline,
    }))
}

/// Only acks of messages settle sends; the server acks receipts, notifications and calls too.
fn server_ack(a: &wa_events::ServerAck) -> Option<WaEvent> {
    if a.class.as_deref().is_some_and(|c| c != "message") {
        return None;
    }
    let id = or_dropped(MessageId::parse(&a.id), "server_ack")?;
    let error = a.error.as_ref().map(|code| AckError {
        code: code.parse().unwrap_or(0),
        text: code.clone(),
    });
    Some(WaEvent::ServerAck(ServerAck { id, error }))
}

fn chat_presence(p: &wa_events::ChatPresenceUpdate) -> Option<WaEvent> {
    let (chat, sender, _) = addresses(&p.source)?;
    Some(WaEvent::ChatPresence {
        chat,
        sender,
        composing: matches!(p.state, ChatPresence::Composing),
    })
}

/// Chat, sender (without its device) and the sender's other address.
fn addresses(source: &MessageSource) -> Option<(Jid, Jid, Option<Jid>)> {
    let chat = jid(&source.chat)?;
    let sender = jid(&source.sender)?;
    let alt = source.sender_alt.as_ref().and_then(jid);
    Some((chat, sender, alt))
}

/// A whatsapp-rust address as Switchboard's: users, LIDs and groups, without the device.
fn jid(j: &whatsapp_rust::Jid) -> Option<Jid> {
    Jid::parse(&j.to_non_ad_string()).ok()
}

fn media(m: &wa::Message) -> Option<Media> {
    let meta = |kind, mime: &Option<String>, size: Option<u64>| Media {
        kind,
        mime: mime.clone(),
        size,
    };
    if let Some(i) = m.image_message.as_option() {
        Some(meta(MediaKind::Image, &i.mimetype, i.file_length))
    } else if let Some(v) = m.video_message.as_option() {
        Some(meta(MediaKind::Video, &v.mimetype, v.file_length))
    } else if let Some(a) = m.audio_message.as_option() {
        Some(meta(MediaKind::Audio, &a.mimetype, a.file_length))
    } else if let Some(d) = m.document_message.as_option() {
        Some(meta(MediaKind::Document, &d.mimetype, d.file_length))
    } else {
        m.sticker_message
            .as_option()
            .map(|s| meta(MediaKind::Sticker, &s.mimetype, s.file_length))
    }
}

/// What Switchboard keeps of a pairing: the device's addresses. The keys themselves live in the
/// client's storage (`wa_state`), sealed.
fn credentials(id: &whatsapp_rust::Jid, lid: &whatsapp_rust::Jid, platform: &str) -> Credentials {
    Credentials(
        serde_json::json!({
            "kind": "whatsapp",
            "jid": id.to_string(),
            "lid": lid.to_string(),
            "platform": platform,
        })
        .to_string(),
    )
}

fn disconnect_reason(r: &WaDisconnectReason) -> DisconnectReason {
    match r {
        WaDisconnectReason::ServerClose { .. } => DisconnectReason::ServerClosed(r.to_string()),
        _ => DisconnectReason::ConnectionLost,
    }
}

fn count(n: i32) -> usize {
    usize::try_from(n).unwrap_or(0)
}

fn or_dropped<T>(v: Option<T>, what: &'static str) -> Option<T> {
    if v.is_none() {
        metrics::counter!(DROPPED, "event" => what).increment(1);
    }
    v
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use whatsapp_rust::chrono::{self, TimeZone, Utc};
    use whatsapp_rust::wacore::types::events::{
        BatchOrigin, ClientOutdated, ConnectFailure, ConnectFailureReason, Connected, Disconnected,
        InboundMessage as WaInbound, LoggedOut, MessageBatch, OfflineSyncCompleted,
        OfflineSyncPreview, PairError, PairSuccess, PairingCode, PairingCodeError,
        PairingCodeRefresh, PairingQrCode, PairingQrCodesExhausted, StreamError, StreamReplaced,
        TempBanReason, TemporaryBan, UndecryptableMessage,
    };
    use whatsapp_rust::wacore::types::presence::ChatPresenceMedia;

    fn wa_jid(s: &str) -> whatsapp_rust::Jid {
        s.parse().expect("a JID")
    }

    fn jid(s: &str) -> Jid {
        Jid::parse(s).expect("a JID")
    }

    fn one(event: Event) -> WaEvent {
        let mut mapped = map_event(&event);
        assert_eq!(mapped.len(), 1, "{event:?} -> {mapped:?}");
        mapped.remove(0)
    }

    fn source(chat: &str, sender: &str) -> MessageSource {
        MessageSource {
            chat: wa_jid(chat),
            sender: wa_jid(sender),
            ..MessageSource::default()
        }
    }

    fn info(source: MessageSource, id: &str) -> MessageInfo {
        MessageInfo {
            source,
            id: id.into(),
            timestamp: Utc
                .timestamp_opt(1_767_225_600, 0)
                .single()
                .expect("a time"),
            ..MessageInfo::default()
        }
    }

    fn batch(messages: Vec<(MessageInfo, wa::Message)>) -> Event {
        let messages: Vec<WaInbound> = messages
            .into_iter()
            .map(|(info, message)| {
                WaInbound::builder()
                    .info(Arc::new(info))
                    .message(Arc::new(message))
                    .build()
            })
            .collect();
        Event::Messages(
            MessageBatch::builder()
                .messages(messages.into())
                .origin(BatchOrigin::Live)
                .build(),
        )
    }

    #[test]
    fn pairing_events() {
        let qr = PairingQrCode::builder()
            .code("2@abc,def".into())
            .timeout(Duration::from_secs(60))
            .build();
        assert_eq!(
            one(Event::PairingQrCode(qr)),
            WaEvent::QrCode {
                code: "2@abc,def".into(),
                valid_for: Duration::from_secs(60)
            }
        );
        for disconnected in [true, false] {
            let e = PairingQrCodesExhausted::builder()
                .disconnected(disconnected)
                .build();
            let mapped = one(Event::PairingQrCodesExhausted(e));
            assert_eq!(mapped, WaEvent::QrCodesExhausted { disconnected });
            assert_eq!(mapped.is_terminal(), disconnected);
        }
        let code = PairingCode::builder()
            .code("ABCD1EFG".into())
            .timeout(Duration::from_secs(170))
            .build();
        assert_eq!(
            one(Event::PairingCode(code)),
            WaEvent::PairCode {
                code: "ABCD1EFG".into(),
                valid_for: Duration::from_secs(170)
            }
        );
        let refresh = PairingCodeRefresh::builder().force_manual(true).build();
        assert_eq!(
            one(Event::PairingCodeRefresh(refresh)),
            WaEvent::PairCodeRefresh
        );
        let failed = PairingCodeError::builder()
            .error("rate-overlimit".into())
            .backoff(Duration::from_secs(30))
            .build();
        assert_eq!(
            one(Event::PairingCodeError(failed)),
            WaEvent::PairCodeFailed {
                reason: "rate-overlimit".into(),
                retry_after: Some(Duration::from_secs(30))
            }
        );
        let success = PairSuccess::builder()
            .id(wa_jid("15550001:12@s.whatsapp.net"))
            .lid(wa_jid("100000012345678:12@lid"))
            .business_name(String::new())
            .platform("android".into())
            .build();
        let WaEvent::PairSuccess { credentials } = one(Event::PairSuccess(success)) else {
            panic!("pair success");
        };
        let creds: serde_json::Value = serde_json::from_str(&credentials.0).expect("JSON");
        assert_eq!(creds["jid"], "15550001:12@s.whatsapp.net");
        assert_eq!(creds["lid"], "100000012345678:12@lid");
        let error = PairError::builder()
            .id(wa_jid("15550001@s.whatsapp.net"))
            .lid(wa_jid("1@lid"))
            .business_name(String::new())
            .platform(String::new())
            .error("bad signature".into())
            .build();
        assert_eq!(
            one(Event::PairError(error)),
            WaEvent::PairFailed {
                reason: "bad signature".into()
            }
        );
    }

    #[test]
    fn connection_lifecycle_and_terminal_events() {
        assert_eq!(
            one(Event::Connected(Connected::builder().build())),
            WaEvent::Connected
        );
        let closed = Disconnected::builder()
            .reason(WaDisconnectReason::ServerClose {
                code: Some(1000),
                reason: "bye".into(),
            })
            .build();
        assert!(matches!(
            one(Event::Disconnected(closed)),
            WaEvent::Disconnected { reason: DisconnectReason::ServerClosed(r) } if r.contains("1000")
        ));
        let lost = Disconnected::builder()
            .reason(WaDisconnectReason::ReadError("reset".into()))
            .build();
        assert_eq!(
            one(Event::Disconnected(lost)),
            WaEvent::Disconnected {
                reason: DisconnectReason::ConnectionLost
            }
        );
        let logged_out = LoggedOut::builder()
            .on_connect(true)
            .reason(ConnectFailureReason::LoggedOut)
            .build();
        assert_eq!(one(Event::LoggedOut(logged_out)), WaEvent::LoggedOut);
        assert_eq!(
            one(Event::StreamReplaced(StreamReplaced::builder().build())),
            WaEvent::StreamReplaced
        );
        let ban = TemporaryBan::builder()
            .code(TempBanReason::SentTooManySameMessage)
            .expire(chrono::Duration::seconds(3600))
            .build();
        assert_eq!(
            one(Event::TemporaryBan(ban)),
            WaEvent::TemporaryBan {
                code: 104,
                duration: Duration::from_secs(3600)
            }
        );
        let outdated = one(Event::ClientOutdated(ClientOutdated::builder().build()));
        assert_eq!(outdated, WaEvent::ClientOutdated);
        for event in [
            WaEvent::LoggedOut,
            WaEvent::StreamReplaced,
            WaEvent::ClientOutdated,
        ] {
            assert!(event.is_terminal(), "{event:?}");
        }

        let refused = ConnectFailure::builder()
            .reason(ConnectFailureReason::BadUserAgent)
            .message("bad ua".into())
            .build();
        let refused = one(Event::ConnectFailure(refused));
        assert_eq!(
            refused,
            WaEvent::ConnectFailure {
                code: 409,
                message: Some("bad ua".into()),
                will_retry: false
            }
        );
        assert!(refused.is_terminal());
        let busy = ConnectFailure::builder()
            .reason(ConnectFailureReason::ServiceUnavailable)
            .build();
        let busy = one(Event::ConnectFailure(busy));
        assert!(matches!(
            busy,
            WaEvent::ConnectFailure {
                code: 503,
                will_retry: true,
                ..
            }
        ));
        assert!(!busy.is_terminal());
        let stream = StreamError::builder().code("515".into()).build();
        assert_eq!(
            one(Event::StreamError(stream)),
            WaEvent::StreamError { code: "515".into() }
        );
        let preview = OfflineSyncPreview::builder()
            .total(12)
            .app_data_changes(0)
            .messages(7)
            .notifications(5)
            .receipts(0)
            .calls(0)
            .statuses(0)
            .build();
        assert_eq!(
            one(Event::OfflineSyncPreview(preview)),
            WaEvent::OfflineSyncPreview {
                total: 12,
                messages: 7
            }
        );
        let done = OfflineSyncCompleted::builder().count(12).build();
        assert_eq!(
            one(Event::OfflineSyncCompleted(done)),
            WaEvent::OfflineSyncCompleted { count: 12 }
        );
    }

    #[test]
    fn messages_text_media_phone_sent_and_lid_senders() {
        let text = wa::Message {
            conversation: Some("hello".into()),
            ..Default::default()
        };
        let mut lid_dm = info(
            source("100000012345678@lid", "100000012345678:3@lid"),
            "3EB0AAAA",
        );
        lid_dm.source.sender_alt = Some(wa_jid("15551110000@s.whatsapp.net"));
        lid_dm.is_offline = true;
        let image = wa::Message {
            image_message: wa::message::ImageMessage {
                mimetype: Some("image/jpeg".into()),
                file_length: Some(48_213),
                caption: Some("our menu".into()),
                ..Default::default()
            }
            .into(),
            ..Default::default()
        };
        let mut from_phone = info(
            source("15552220000@s.whatsapp.net", "15550001:0@s.whatsapp.net"),
            "PHONE1",
        );
        from_phone.source.is_from_me = true;
        let mapped = map_event(&batch(vec![
            (lid_dm, text.clone()),
            (
                info(
                    source("15552220000@s.whatsapp.net", "15552220000@s.whatsapp.net"),
                    "IMG1",
                ),
                image,
            ),
            (from_phone, text.clone()),
        ]));
        assert_eq!(mapped.len(), 3, "one event per message, in order");
        let WaEvent::Message(m) = &mapped[0] else {
            panic!("{:?}", mapped[0]);
        };
        assert_eq!(m.chat, jid("100000012345678@lid"));
        assert_eq!(
            m.sender,
            jid("100000012345678@lid"),
            "the device is dropped"
        );
        assert_eq!(m.sender_alt, Some(jid("15551110000@s.whatsapp.net")));
        assert_eq!(
            m.sender_phone().map(|p| p.to_string()).as_deref(),
            Some("+15551110000")
        );
        assert_eq!(
            (m.text.as_str(), m.offline, m.media.is_none()),
            ("hello", true, true)
        );
        assert_eq!(m.timestamp_ms, 1_767_225_600_000);
        let WaEvent::Message(img) = &mapped[1] else {
            panic!("{:?}", mapped[1]);
        };
        assert_eq!(img.text, "our menu", "a caption is the text");
        assert_eq!(
            img.media,
            Some(Media {
                kind: MediaKind::Image,
                mime: Some("image/jpeg".into()),
                size: Some(48_213)
            })
        );
        assert!(
            matches!(&mapped[2], WaEvent::FromPhone(m) if m.is_from_me && m.id.as_str() == "PHONE1")
        );
    }

    #[test]
    fn input_switchboard_cannot_carry_is_dropped_not_a_panic() {
        let text = wa::Message {
            conversation: Some("news".into()),
            ..Default::default()
        };
        let newsletter = info(
            source(
                "120363000000000000@newsletter",
                "120363000000000000@newsletter",
            ),
            "N1",
        );
        let bad_id = info(
            source("15552220000@s.whatsapp.net", "15552220000@s.whatsapp.net"),
            "has space",
        );
        let good = info(
            source("15552220000@s.whatsapp.net", "15552220000@s.whatsapp.net"),
            "OK1",
        );
        let mapped = map_event(&batch(vec![
            (newsletter, text.clone()),
            (bad_id, text.clone()),
            (good, text),
        ]));
        assert_eq!(
            mapped.len(),
            1,
            "the one it can carry still goes: {mapped:?}"
        );
        assert!(matches!(&mapped[0], WaEvent::Message(m) if m.id.as_str() == "OK1"));
    }

    #[test]
    fn undecryptable_receipts_acks_and_presence() {
        let undecryptable = UndecryptableMessage::builder()
            .info(Arc::new(MessageInfo {
                is_offline: true,
                ..info(
                    source("15552220000@s.whatsapp.net", "15552220000:2@s.whatsapp.net"),
                    "U1",
                )
            }))
            .is_unavailable(false)
            .unavailable_type(Default::default())
            .decrypt_fail_mode(Default::default())
            .build();
        assert_eq!(
            one(Event::UndecryptableMessage(undecryptable)),
            WaEvent::Undecryptable {
                chat: jid("15552220000@s.whatsapp.net"),
                sender: jid("15552220000@s.whatsapp.net"),
                id: MessageId::parse("U1").expect("id"),
                offline: true
            }
        );

        let receipt = |kind: ReceiptType, offline: bool| {
            Event::Receipt(
                wa_events::Receipt::builder()
                    .source(source(
                        "15552220000@s.whatsapp.net",
                        "15552220000@s.whatsapp.net",
                    ))
                    .message_ids(vec!["3EB0A".into(), "3EB0B".into()])
                    .timestamp(Utc::now())
                    .r#type(kind)
                    .offline(offline)
                    .build(),
            )
        };
        let delivered = one(receipt(ReceiptType::Delivered, true));
        let WaEvent::Receipt(r) = delivered else {
            panic!("{delivered:?}");
        };
        assert_eq!(r.kind, ReceiptKind::Delivered);
        assert_eq!(r.ids.len(), 2);
        assert!(r.offline);
        assert_eq!(r.sender, None, "a DM's receipt names no group sender");
        for read in [ReceiptType::Read, ReceiptType::Played] {
            assert!(
                matches!(one(receipt(read, false)), WaEvent::Receipt(r) if r.kind == ReceiptKind::Read)
            );
        }
        for other in [
            ReceiptType::ReadSelf,
            ReceiptType::Retry,
            ReceiptType::Sender,
        ] {
            assert!(map_event(&receipt(other, false)).is_empty());
        }

        let ack = |class: Option<&str>, error: Option<&str>| {
            Event::ServerAck(
                wa_events::ServerAck::builder()
                    .id("3EB0A".into())
                    .maybe_class(class.map(Into::into))
                    .maybe_error(error.map(Into::into))
                    .build(),
            )
        };
        assert_eq!(
            one(ack(Some("message"), None)),
            WaEvent::ServerAck(ServerAck {
                id: MessageId::parse("3EB0A").expect("id"),
                error: None
            })
        );
        let WaEvent::ServerAck(nack) = one(ack(None, Some("479"))) else {
            panic!("a nack");
        };
        assert_eq!(nack.error.map(|e| e.code), Some(479));
        assert!(
            map_event(&ack(Some("receipt"), None)).is_empty(),
            "not a send's ack"
        );

        let typing = wa_events::ChatPresenceUpdate::builder()
            .source(source(
                "15552220000@s.whatsapp.net",
                "15552220000:1@s.whatsapp.net",
            ))
            .state(ChatPresence::Composing)
            .media(ChatPresenceMedia::Text)
            .build();
        assert_eq!(
            one(Event::ChatPresence(typing)),
            WaEvent::ChatPresence {
                chat: jid("15552220000@s.whatsapp.net"),
                sender: jid("15552220000@s.whatsapp.net"),
                composing: true
            }
        );
    }

    #[test]
    fn messages_with_nothing_to_answer_map_to_nothing() {
        let reaction = wa::Message {
            reaction_message: wa::message::ReactionMessage {
                text: Some("👍".into()),
                ..Default::default()
            }
            .into(),
            ..Default::default()
        };
        let dm = info(
            source("15552220000@s.whatsapp.net", "15552220000@s.whatsapp.net"),
            "R1",
        );
        assert!(inbound(&dm, &reaction).is_none());
        assert!(inbound(&dm, &wa::Message::default()).is_none());
    }

    #[test]
    fn events_switchboard_does_not_use_map_to_nothing() {
        let presence = wa_events::PresenceUpdate::builder()
            .from(wa_jid("15552220000@s.whatsapp.net"))
            .unavailable(false)
            .build();
        assert!(map_event(&Event::Presence(presence)).is_empty());
    }
}
