//! A fake WhatsApp endpoint for tests: the server side of the WhatsApp Web protocol, as far as
//! the unmodified whatsapp-rust client needs it, over `ws://127.0.0.1`. Include with
//! `#[path = "support/fake_wa.rs"] mod fake_wa;`.
//!
//! Built from the crate family's own parts: the Noise XX and IK responders on wacore's
//! `NoiseHandshake`, its frame codec and cipher, the binary node codec of wacore-binary, and a
//! test certificate chain from wacore-noise's `test-util`. The client accepts that chain because
//! the tests build wacore-noise with `danger-skip-cert-chain-verify` (a dev-dependency only:
//! the release binary is built without it, which `.ci/run` checks).
//!
//! What it does: the handshake (XX on first contact, IK once a login succeeded and the client
//! cached the server's key), then the login's answer, scripted per connection: a `<failure>`
//! with its code (401 logged out, 402 banned with a reason code and expiry, 405 outdated, 503
//! unavailable…), a `<stream:error>` (a code, or a conflict such as `replaced`), a connection
//! that closes before the handshake (a failed connect), or success:
//! - a device that is not registered yet is asked to pair: QR refs (six, as WhatsApp sends),
//!   and when the fake phone scans one, a `pair-success` whose device identity a fresh account
//!   key signed, HMAC'd with the code's secret; the client's signature is checked, then a `515`;
//! - a registered device gets `<success>`, its offline queue (what it has not acknowledged),
//!   the end marker, then IQs answered (pings, app state: empty collections; the prekey count),
//!   its uploaded prekeys kept, messages from fake contacts delivered live (Signal-encrypted
//!   from those prekeys: `fake_signal.rs`), receipts taken, and stanzas the test pushes;
//! - sends to fake contacts: device lists (a contact has its phone, device 0; the account has
//!   no other devices), the contacts' prekey bundles, each copy decrypted by its contact, the
//!   server ack (or an error ack when told to refuse), and the contacts' receipts when the test
//!   asks, queued like messages until the device acknowledges them.
//!
//! Not (yet): the app-state key share a phone sends after pairing (the client waits its 10 s
//! grace for it), pair codes, LIDs, groups, media, retry receipts, logout.

#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

#[path = "fake_signal.rs"]
mod signal;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use whatsapp_rust::wacore::handshake::NoiseHandshake;
use whatsapp_rust::wacore::iq::prekeys::PreKeyBundleUserNode;
use whatsapp_rust::wacore::libsignal::protocol::KeyPair;
use whatsapp_rust::wacore::noise::NoiseCipher;
use whatsapp_rust::wacore::noise::framing::{FrameDecoder, encode_frame};
use whatsapp_rust::wacore::protocol::ProtocolNode as _;
use whatsapp_rust::wacore_binary::Node;
use whatsapp_rust::wacore_binary::builder::NodeBuilder;
use whatsapp_rust::wacore_binary::consts::{NOISE_PATTERN_IK, NOISE_PATTERN_XX, WA_CONN_HEADER};
use whatsapp_rust::wacore_binary::marshal::marshal;
use whatsapp_rust::waproto::buffa::Message as _;
use whatsapp_rust::waproto::whatsapp as wa;

/// How the server answers one login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `<failure reason=… code=… expire=…>`, then the connection closes.
    Failure {
        /// The failure code.
        reason: u16,
        /// A ban's reason code (101–106).
        code: Option<u16>,
        /// A ban's length in seconds.
        expire: Option<u64>,
    },
    /// `<stream:error code=…>`, then the connection closes.
    StreamError(String),
    /// `<stream:error><conflict type=…/></stream:error>` (`replaced`, `device_removed`).
    Conflict(String),
    /// The connection closes before the handshake: a failed connect.
    Refuse,
    /// `<success>`, then an empty offline queue (`<ib>` with the preview and the end marker);
    /// the connection stays, every IQ is answered with an empty result (pings included), until
    /// [`FakeWhatsApp::push`] sends something or the test ends.
    Success,
}

impl Answer {
    /// A plain `<failure reason=…>`.
    pub fn failure(reason: u16) -> Self {
        Self::Failure {
            reason,
            code: None,
            expire: None,
        }
    }
}

/// What the fake has seen of one connection.
#[derive(Debug, Clone)]
pub struct Seen {
    /// When the TCP connection was accepted.
    pub at: Instant,
    /// Which handshake the client spoke (`"XX"`, `"IK"`), if it got that far.
    pub handshake: Option<&'static str>,
    /// What the login was answered with.
    pub answer: Answer,
    /// Whether the client came to register a new device (to pair) rather than to log in.
    pub registration: bool,
}

struct Shared {
    identity: KeyPair,
    cert_chain: Vec<u8>,
    script: Mutex<VecDeque<Answer>>,
    otherwise: Mutex<Answer>,
    seen: Mutex<Vec<Seen>>,
    accepted: AtomicUsize,
    /// Stanzas for every logged-in connection (see [`FakeWhatsApp::push`]).
    pushes: tokio::sync::broadcast::Sender<Node>,
    /// How many QR refs a registration gets (WhatsApp's server sends six).
    pair_refs: AtomicUsize,
    refs_issued: AtomicUsize,
    /// The fake phone's scans, for the connections showing QR codes.
    scans: tokio::sync::broadcast::Sender<Scan>,
    /// The devices the fake phone linked: their JID and the client's verified signature.
    linked: Mutex<Vec<Linked>>,
    /// What the server holds for each device (`user:device`): keys, undelivered messages.
    devices: Mutex<HashMap<String, DeviceBox>>,
    /// The fake contacts (by their digits), with their Signal sessions.
    contacts: tokio::sync::Mutex<HashMap<String, signal::Contact>>,
    /// Bumped whenever a device's inbox grows, so its live connection delivers.
    inbox: tokio::sync::watch::Sender<u64>,
    message_ids: AtomicUsize,
    /// The error code every send is refused with, if any (`<ack error=…>`).
    refuse_sends: Mutex<Option<u16>>,
}

/// The server's side of one device.
#[derive(Default)]
struct DeviceBox {
    keys: Option<signal::Uploaded>,
    /// Messages for the device that it has not acknowledged yet, oldest first: each login
    /// gets them again (the offline queue) until a receipt names them.
    inbox: Vec<(String, Node)>,
    deliveries: Vec<Delivery>,
    receipts: Vec<Receipt>,
    sent: Vec<Sent>,
}

/// A message the device sent to a fake contact, as the contact decrypted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The contact (digits).
    pub to: String,
    /// The id the device gave it.
    pub id: String,
    /// Its text (`conversation`), if it decrypted to one.
    pub text: Option<String>,
    /// The `<enc>` type (`pkmsg`, `msg`).
    pub kind: String,
}

/// A message the fake handed to a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The message id.
    pub id: String,
    /// When.
    pub at: Instant,
    /// In a login's offline queue (rather than live).
    pub offline: bool,
}

/// A `<receipt>` (or `<ack>`) the device sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The message id it names.
    pub id: String,
    /// Its `type` (`None` for a delivery receipt; `retry`, `read`, …), or `ack` for an `<ack>`.
    pub kind: Option<String>,
    /// When it arrived.
    pub at: Instant,
}

/// A QR code the fake phone scanned.
#[derive(Debug, Clone)]
struct Scan {
    pairing_ref: String,
    identity: [u8; 32],
    adv_secret: Vec<u8>,
    phone: String,
}

/// A device the fake phone linked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Linked {
    /// Its JID (`phone:device@s.whatsapp.net`).
    pub jid: String,
    /// Whether the client's device signature over the account's identity verified.
    pub signature_ok: bool,
}

/// A running fake endpoint. Stops when dropped.
pub struct FakeWhatsApp {
    /// The `ws://127.0.0.1:port/ws/chat` URL to give the client.
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeWhatsApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeWhatsApp {
    /// Listens on a free local port; every login is answered with `otherwise` unless scripted.
    pub async fn start(otherwise: Answer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws/chat", listener.local_addr().unwrap());
        let identity = KeyPair::generate(&mut rand010::rng());
        let public: [u8; 32] = identity.public_key.public_key_bytes().try_into().unwrap();
        let shared = Arc::new(Shared {
            cert_chain: wacore_noise::test_util::build_cert_chain_bytes(&public),
            identity,
            script: Mutex::default(),
            otherwise: Mutex::new(otherwise),
            seen: Mutex::default(),
            accepted: AtomicUsize::new(0),
            pushes: tokio::sync::broadcast::channel(16).0,
            pair_refs: AtomicUsize::new(6),
            refs_issued: AtomicUsize::new(0),
            scans: tokio::sync::broadcast::channel(16).0,
            linked: Mutex::default(),
            devices: Mutex::default(),
            contacts: tokio::sync::Mutex::default(),
            inbox: tokio::sync::watch::channel(0).0,
            message_ids: AtomicUsize::new(0),
            refuse_sends: Mutex::default(),
        });
        let serving = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let shared = serving.clone();
                tokio::spawn(async move { shared.serve(tcp).await });
            }
        });
        Self { url, shared, task }
    }

    /// Answers the next logins with `answers`, in order, before falling back.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.shared.script.lock().unwrap().extend(answers);
    }

    /// Answers every unscripted login with `answer` from now on.
    pub fn otherwise(&self, answer: Answer) {
        *self.shared.otherwise.lock().unwrap() = answer;
    }

    /// Sends `node` on every logged-in connection; a `<stream:error>` or `<failure>` closes it.
    pub fn push(&self, node: Node) {
        let _ = self.shared.pushes.send(node);
    }

    /// Every connection so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// How many QR refs the next registrations get (WhatsApp sends six: 60 s + 5 × 20 s).
    pub fn pair_refs(&self, refs: usize) {
        self.shared.pair_refs.store(refs, Ordering::Relaxed);
    }

    /// The fake phone of `phone` (digits) scans `qr`: the connection showing its ref gets a
    /// `pair-success` whose device identity the phone's account key signed, HMAC'd with the
    /// secret the code carries. With `forge`, the HMAC is made with another secret, as a code
    /// copied off someone else's screen would give.
    pub fn scan(&self, qr: &str, phone: &str, forge: bool) {
        use base64::Engine as _;
        let parts: Vec<&str> = qr.split(',').collect();
        let b64 = base64::engine::general_purpose::STANDARD;
        let identity: [u8; 32] = b64.decode(parts[2]).unwrap().try_into().unwrap();
        let mut adv_secret = b64.decode(parts[3]).unwrap();
        if forge {
            adv_secret.iter_mut().for_each(|b| *b ^= 0xff);
        }
        let _ = self.shared.scans.send(Scan {
            pairing_ref: parts[0].to_owned(),
            identity,
            adv_secret,
            phone: phone.to_owned(),
        });
    }

    /// The devices the fake phone linked so far.
    pub fn linked(&self) -> Vec<Linked> {
        self.shared.linked.lock().unwrap().clone()
    }

    /// How many one-time prekeys `device` (`user:device`) has on the server; `None` before
    /// it uploaded any keys.
    pub fn prekeys(&self, device: &str) -> Option<usize> {
        let devices = self.shared.devices.lock().unwrap();
        devices
            .get(device)?
            .keys
            .as_ref()
            .map(signal::Uploaded::remaining)
    }

    /// The fake contact `from` (digits, with an account of its own) writes `text` to
    /// `device` (`user:device`), encrypted with the Signal session it starts from the keys the
    /// device uploaded. The message waits on the server until the device acknowledges it: live
    /// if the device is connected, else in its next login's offline queue. Its id.
    pub async fn send_text(&self, from: &str, device: &str, text: &str) -> String {
        let message = wa::Message {
            conversation: Some(text.to_owned()),
            ..Default::default()
        };
        let mut contacts = self.shared.contacts.lock().await;
        let contact = contacts
            .entry(from.to_owned())
            .or_insert_with(signal::Contact::new);
        // A first message starts the session from a bundle the server hands out (using up one
        // of the device's one-time prekeys).
        let bundle = if contact.has_session(device) {
            None
        } else {
            let mut devices = self.shared.devices.lock().unwrap();
            devices
                .get_mut(device)
                .and_then(|d| d.keys.as_mut())
                .and_then(signal::Uploaded::take_bundle)
        };
        let (kind, ciphertext) = contact
            .encrypt(device, bundle, &message)
            .await
            .unwrap_or_else(|| panic!("{device} has no keys on the server"));
        let n = self.shared.message_ids.fetch_add(1, Ordering::Relaxed);
        let id = format!("3EB0{:016X}", 0x5A17_0000_0000_0000_u64 + n as u64);
        let now = unix_now();
        let node = NodeBuilder::new("message")
            .attr("from", format!("{from}@s.whatsapp.net"))
            .attr("id", id.clone())
            .attr("t", now.to_string())
            .attr("type", "text")
            .attr("notify", format!("Contact {from}"))
            .children([NodeBuilder::new("enc")
                .attr("v", "2")
                .attr("type", kind)
                .bytes(ciphertext)
                .build()])
            .build();
        self.shared.enqueue(device, id.clone(), node);
        id
    }

    /// Every time the fake handed a message to `device` (a redelivery shows twice).
    pub fn deliveries(&self, device: &str) -> Vec<Delivery> {
        let devices = self.shared.devices.lock().unwrap();
        devices
            .get(device)
            .map(|d| d.deliveries.clone())
            .unwrap_or_default()
    }

    /// The receipts and acks `device` sent.
    pub fn receipts(&self, device: &str) -> Vec<Receipt> {
        let devices = self.shared.devices.lock().unwrap();
        devices
            .get(device)
            .map(|d| d.receipts.clone())
            .unwrap_or_default()
    }

    /// From now on every send is refused: acked with `error` = `code` and not delivered
    /// (`None`: taken again).
    pub fn refuse_sends(&self, code: Option<u16>) {
        *self.shared.refuse_sends.lock().unwrap() = code;
    }

    /// What `device` sent to fake contacts, decrypted by them, in order.
    pub fn sent(&self, device: &str) -> Vec<Sent> {
        let devices = self.shared.devices.lock().unwrap();
        devices
            .get(device)
            .map(|d| d.sent.clone())
            .unwrap_or_default()
    }

    /// The fake contact `from` tells `device` it got message `id` (`kind` `None`) or read it
    /// (`Some("read")`). The receipt waits on the server like a message until the device
    /// acknowledges it.
    pub fn contact_receipt(&self, from: &str, device: &str, id: &str, kind: Option<&str>) {
        let now = unix_now();
        let mut receipt = NodeBuilder::new("receipt")
            .attr("from", format!("{from}@s.whatsapp.net"))
            .attr("id", id)
            .attr("t", now.to_string());
        if let Some(kind) = kind {
            receipt = receipt.attr("type", kind);
        }
        self.shared
            .enqueue(device, receipt_key(id, kind), receipt.build());
    }

    /// The messages still waiting on the server for `device`'s acknowledgement.
    pub fn undelivered(&self, device: &str) -> Vec<String> {
        let devices = self.shared.devices.lock().unwrap();
        devices
            .get(device)
            .map(|d| d.inbox.iter().map(|(id, _)| id.clone()).collect())
            .unwrap_or_default()
    }
}

impl Shared {
    /// Queues `node` for `device` under `key` (what its acknowledgement will name) and wakes
    /// the device's live connection.
    fn enqueue(&self, device: &str, key: String, node: Node) {
        let mut devices = self.devices.lock().unwrap();
        devices
            .entry(device.to_owned())
            .or_default()
            .inbox
            .push((key, node));
        drop(devices);
        self.inbox.send_modify(|v| *v += 1);
    }

    /// The messages waiting for `device` that this connection has not had yet (`sent`), marked
    /// `offline` when they make up the login's queue; each delivery is logged.
    fn take_inbox(
        &self,
        device: Option<&str>,
        sent: &mut HashSet<String>,
        offline: bool,
    ) -> Vec<Node> {
        let Some(device) = device else {
            return Vec::new();
        };
        let mut devices = self.devices.lock().unwrap();
        let Some(entry) = devices.get_mut(device) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (id, node) in &entry.inbox {
            if !sent.insert(id.clone()) {
                continue;
            }
            let mut node = node.clone();
            if offline {
                node.attrs.insert("offline", "1");
            }
            out.push(node);
        }
        let at = Instant::now();
        entry.deliveries.extend(out.iter().filter_map(|n| {
            Some(Delivery {
                id: n.attrs().optional_string("id")?.to_string(),
                at,
                offline,
            })
        }));
        out
    }

    /// What the device's node tells the server: the keys it uploads, the receipts and acks
    /// that take messages off its inbox.
    fn take_from_device(&self, device: &str, node: &Node) {
        let mut devices = self.devices.lock().unwrap();
        let entry = devices.entry(device.to_owned()).or_default();
        match node.tag.as_ref() {
            "iq" => {
                let mut attrs = node.attrs();
                let upload = attrs.optional_string("xmlns").as_deref() == Some("encrypt")
                    && attrs.optional_string("type").as_deref() == Some("set");
                if let Some(keys) = upload.then(|| signal::Uploaded::parse(node)).flatten() {
                    match &mut entry.keys {
                        Some(held) => held.merge(keys),
                        None => entry.keys = Some(keys),
                    }
                }
            }
            "receipt" | "ack" => {
                let mut attrs = node.attrs();
                let Some(id) = attrs.optional_string("id").map(|v| v.to_string()) else {
                    return;
                };
                let class = attrs.optional_string("class").map(|v| v.to_string());
                let of_type = attrs.optional_string("type").map(|v| v.to_string());
                let kind = if node.tag.as_ref() == "ack" {
                    Some("ack".to_owned())
                } else {
                    of_type.clone()
                };
                // A delivery receipt (or an ack) settles the message; a retry asks for it
                // again. An `<ack class="receipt">` settles the contact's receipt it names.
                let settles = if class.as_deref() == Some("receipt") {
                    Some(receipt_key(&id, of_type.as_deref()))
                } else {
                    (kind.as_deref() != Some("retry")).then(|| id.clone())
                };
                if let Some(settled) = settles {
                    entry.inbox.retain(|(queued, _)| *queued != settled);
                }
                entry.receipts.push(Receipt {
                    id,
                    kind,
                    at: Instant::now(),
                });
            }
            _ => {}
        }
    }

    /// The server's answer to `node` from `device`, if it asks for one: IQs get their result
    /// (the prekey count, fake contacts' device lists and prekey bundles, app state), a
    /// message to fake contacts its server ack; anything else none.
    async fn answer(&self, device: Option<&str>, node: &Node) -> Option<Node> {
        if node.tag.as_ref() == "message" {
            return self.take_message(device?, node).await;
        }
        let mut result = iq_result(node)?;
        let own_user = device.and_then(|d| d.split(':').next()).unwrap_or_default();
        let xmlns = node.attrs().optional_string("xmlns").map(|v| v.to_string());
        let children = match xmlns.as_deref() {
            Some("encrypt") if node.get_optional_child("count").is_some() => {
                let held = device
                    .and_then(|d| {
                        let devices = self.devices.lock().unwrap();
                        devices
                            .get(d)?
                            .keys
                            .as_ref()
                            .map(signal::Uploaded::remaining)
                    })
                    .unwrap_or(0);
                vec![
                    NodeBuilder::new("count")
                        .attr("value", held.to_string())
                        .build(),
                ]
            }
            // A prekey fetch: each fake contact's bundle (one of its one-time prekeys used).
            Some("encrypt") if node.get_optional_child("key").is_some() => {
                let mut users = Vec::new();
                let mut contacts = self.contacts.lock().await;
                for jid in asked_users(node.get_optional_child("key")) {
                    let Some(user) = contact_user(&jid, own_user) else {
                        continue;
                    };
                    let contact = contacts
                        .entry(user.to_owned())
                        .or_insert_with(signal::Contact::new);
                    let bundle = contact.bundle()?;
                    let node = PreKeyBundleUserNode::from_bundle(jid.parse().ok()?, &bundle, None)
                        .ok()?
                        .into_node();
                    users.push(node);
                }
                vec![NodeBuilder::new("list").children(users).build()]
            }
            // Device lists: a fake contact has its phone (device 0); the account's own other
            // devices are none.
            Some("usync") => {
                let usync = node.get_optional_child("usync");
                let wants_devices = usync
                    .and_then(|u| u.get_optional_child("query"))
                    .and_then(|q| q.get_optional_child("devices"))
                    .is_some();
                let users = asked_users(usync.and_then(|u| u.get_optional_child("list")))
                    .into_iter()
                    .map(|jid| {
                        let user = NodeBuilder::new("user").attr("jid", jid.clone());
                        if wants_devices && contact_user(&jid, own_user).is_some() {
                            user.children([NodeBuilder::new("devices")
                                .children([NodeBuilder::new("device-list")
                                    .children([NodeBuilder::new("device").attr("id", "0").build()])
                                    .build()])
                                .build()])
                                .build()
                        } else {
                            user.build()
                        }
                    });
                vec![
                    NodeBuilder::new("usync")
                        .children([NodeBuilder::new("list").children(users).build()])
                        .build(),
                ]
            }
            _ => return Some(result),
        };
        result.content = Some(whatsapp_rust::wacore_binary::NodeContent::Nodes(children));
        Some(result)
    }

    /// A message from `device`: each fake contact it is addressed to decrypts its copy; the
    /// server acks it.
    async fn take_message(&self, device: &str, node: &Node) -> Option<Node> {
        let mut attrs = node.attrs();
        let id = attrs.optional_string("id")?.to_string();
        let to = attrs.optional_string("to")?.to_string();
        let now = unix_now();
        let ack = NodeBuilder::new("ack")
            .attr("class", "message")
            .attr("id", id.clone())
            .attr("from", to.clone())
            .attr("t", now.to_string());
        let refused = *self.refuse_sends.lock().unwrap();
        if let Some(code) = refused {
            return Some(ack.attr("error", code.to_string()).build());
        }
        let own_user = device.split(':').next().unwrap_or_default();
        let mut copies: Vec<(String, &Node)> = Vec::new();
        if let Some(participants) = node.get_optional_child("participants") {
            for to in participants.children().unwrap_or_default() {
                if let (Some(jid), Some(enc)) = (
                    to.attrs().optional_string("jid").map(|v| v.to_string()),
                    to.get_optional_child("enc"),
                ) {
                    copies.push((jid, enc));
                }
            }
        }
        if let Some(enc) = node.get_optional_child("enc") {
            copies.push((to.clone(), enc));
        }
        let mut contacts = self.contacts.lock().await;
        for (jid, enc) in copies {
            let Some(user) = contact_user(&jid, own_user) else {
                continue;
            };
            let kind = enc.attrs().optional_string("type")?.to_string();
            let Some(whatsapp_rust::wacore_binary::NodeContent::Bytes(ciphertext)) = &enc.content
            else {
                continue;
            };
            let contact = contacts
                .entry(user.to_owned())
                .or_insert_with(signal::Contact::new);
            let text = contact
                .decrypt(device, &kind, ciphertext)
                .await
                .and_then(|m| m.conversation);
            let mut devices = self.devices.lock().unwrap();
            devices
                .entry(device.to_owned())
                .or_default()
                .sent
                .push(Sent {
                    to: user.to_owned(),
                    id: id.clone(),
                    text,
                    kind,
                });
        }
        Some(ack.build())
    }

    fn next_answer(&self) -> Answer {
        self.script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.otherwise.lock().unwrap().clone())
    }

    async fn serve(self: Arc<Self>, tcp: TcpStream) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        let at = Instant::now();
        let answer = self.next_answer();
        let mut seen = Seen {
            at,
            handshake: None,
            answer: answer.clone(),
            registration: false,
        };
        if answer == Answer::Refuse {
            drop(tcp);
            self.seen.lock().unwrap().push(seen);
            return;
        }
        let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
            self.seen.lock().unwrap().push(seen);
            return;
        };
        let mut conn = Conn {
            ws,
            decoder: FrameDecoder::new(),
            header_seen: false,
        };
        let outcome = conn.handshake(&self).await;
        let Some((pattern, mut cipher, login)) = outcome else {
            self.seen.lock().unwrap().push(seen);
            return;
        };
        seen.handshake = Some(pattern);
        let payload = wa::ClientPayload::decode_from_slice(&login).ok();
        let registration = payload
            .as_ref()
            .is_some_and(|p| p.device_pairing_data.is_set());
        seen.registration = registration;
        // Who logs in: `user:device`.
        let device = payload
            .as_ref()
            .and_then(|p| Some(format!("{}:{}", p.username?, p.device.unwrap_or(0))));
        self.seen.lock().unwrap().push(seen);
        let node = match answer {
            Answer::Failure {
                reason,
                code,
                expire,
            } => {
                let mut b = NodeBuilder::new("failure").attr("reason", reason.to_string());
                if let Some(code) = code {
                    b = b.attr("code", code.to_string());
                }
                if let Some(expire) = expire {
                    b = b.attr("expire", expire.to_string());
                }
                b.build()
            }
            Answer::StreamError(code) => {
                NodeBuilder::new("stream:error").attr("code", code).build()
            }
            Answer::Conflict(kind) => NodeBuilder::new("stream:error")
                .children([NodeBuilder::new("conflict").attr("type", kind).build()])
                .build(),
            Answer::Refuse => unreachable!("refused before the handshake"),
            // A device that is not registered yet is asked to pair instead.
            Answer::Success if registration => {
                conn.pairing(&mut cipher, &self).await;
                return;
            }
            Answer::Success => {
                let pushes = self.pushes.subscribe();
                conn.logged_in(&mut cipher, &self, device, pushes).await;
                return;
            }
        };
        conn.send_node(&mut cipher, &node).await;
        // The server closes after a failure or a stream error.
        let _ = conn.ws.close(None).await;
    }
}

/// The server's ciphers after the handshake, with their counters.
struct Ciphers {
    write: NoiseCipher,
    read: NoiseCipher,
    written: u32,
    read_count: u32,
}

struct Conn {
    ws: tokio_tungstenite::WebSocketStream<TcpStream>,
    decoder: FrameDecoder,
    header_seen: bool,
}

impl Conn {
    /// The next frame from the client (the connection header stripped from the first).
    async fn frame(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(frame) = self.decoder.decode_frame() {
                return Some(frame.to_vec());
            }
            let msg = self.ws.next().await?.ok()?;
            let WsMessage::Binary(data) = msg else {
                if msg.is_close() {
                    return None;
                }
                continue;
            };
            let mut data: &[u8] = &data;
            if !self.header_seen {
                self.header_seen = true;
                if let Some(rest) = data.strip_prefix(&WA_CONN_HEADER[..]) {
                    data = rest;
                }
            }
            self.decoder.feed(data);
        }
    }

    async fn send_frame(&mut self, payload: &[u8]) {
        let framed = encode_frame(payload, None).unwrap();
        let _ = self.ws.send(WsMessage::Binary(framed.into())).await;
    }

    async fn send_node(&mut self, c: &mut Ciphers, node: &Node) {
        let plain = marshal(node).unwrap();
        let sealed = c.write.encrypt_with_counter(c.written, &plain).unwrap();
        c.written += 1;
        self.send_frame(&sealed).await;
    }

    /// A logged-in connection: the offline queue (what `device` has not acknowledged yet),
    /// then IQs answered, messages delivered live and receipts taken, until the client leaves
    /// or a pushed stanza ends the stream.
    async fn logged_in(
        &mut self,
        c: &mut Ciphers,
        server: &Shared,
        device: Option<String>,
        mut pushes: tokio::sync::broadcast::Receiver<Node>,
    ) {
        let now = unix_now();
        let success = NodeBuilder::new("success")
            .attr("t", now.to_string())
            .attr("lid", "100000012345678@lid")
            .build();
        self.send_node(c, &success).await;
        let mut inbox = server.inbox.subscribe();
        inbox.mark_unchanged();
        // Everything waiting now is the offline queue; `sent` is what this connection has had.
        let mut sent = HashSet::new();
        let queued = server.take_inbox(device.as_deref(), &mut sent, true);
        let count = queued.len().to_string();
        let queue = NodeBuilder::new("ib")
            .children([NodeBuilder::new("offline_preview")
                .attr("count", count.clone())
                .attr("message", count.clone())
                .build()])
            .build();
        self.send_node(c, &queue).await;
        for node in queued {
            self.send_node(c, &node).await;
        }
        let end = NodeBuilder::new("ib")
            .children([NodeBuilder::new("offline").attr("count", count).build()])
            .build();
        self.send_node(c, &end).await;
        loop {
            tokio::select! {
                pushed = pushes.recv() => {
                    let Ok(node) = pushed else { return };
                    let ends = matches!(node.tag.as_ref(), "stream:error" | "failure");
                    self.send_node(c, &node).await;
                    if ends {
                        let _ = self.ws.close(None).await;
                        return;
                    }
                }
                changed = inbox.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    for node in server.take_inbox(device.as_deref(), &mut sent, false) {
                        self.send_node(c, &node).await;
                    }
                }
                read = self.read_node(c) => {
                    let Some(node) = read else { return };
                    if let Some(device) = &device {
                        server.take_from_device(device, &node);
                    }
                    if let Some(answer) = server.answer(device.as_deref(), &node).await {
                        self.send_node(c, &answer).await;
                    }
                }
            }
        }
    }

    /// Reads the client's next node, if it sends one (`None` once it left).
    async fn read_node(&mut self, c: &mut Ciphers) -> Option<Node> {
        loop {
            let mut frame = self.frame().await?;
            c.read
                .decrypt_in_place_with_counter(c.read_count, &mut frame)
                .ok()?;
            c.read_count += 1;
            if let Some(node) = parse(&frame) {
                return Some(node);
            }
        }
    }

    /// A registration: QR refs for the client to show, then, when the fake phone scans one,
    /// `pair-success`; once the client answers with its signature, the server asks for a new
    /// connection (`515`), on which the new device logs in.
    async fn pairing(&mut self, c: &mut Ciphers, server: &Shared) {
        let mut scans = server.scans.subscribe();
        let count = server.pair_refs.load(Ordering::Relaxed);
        let refs: Vec<String> = (0..count)
            .map(|_| {
                let n = server.refs_issued.fetch_add(1, Ordering::Relaxed);
                format!("2@fake-ref-{n}")
            })
            .collect();
        let pair_device = NodeBuilder::new("iq")
            .attr("from", "s.whatsapp.net")
            .attr("type", "set")
            .attr("id", "pair-device-1")
            .attr("xmlns", "md")
            .children([NodeBuilder::new("pair-device")
                .children(
                    refs.iter()
                        .map(|r| NodeBuilder::new("ref").bytes(r.as_bytes().to_vec()).build()),
                )
                .build()])
            .build();
        self.send_node(c, &pair_device).await;
        // The scan waiting for the client's signature.
        let mut pending: Option<(String, Scan, Vec<u8>)> = None;
        let mut successes = 0u32;
        loop {
            tokio::select! {
                scan = scans.recv() => {
                    let Ok(scan) = scan else { return };
                    if !refs.contains(&scan.pairing_ref) {
                        continue;
                    }
                    successes += 1;
                    let id = format!("pair-success-{successes}");
                    let (node, account) = pair_success(&id, &scan);
                    self.send_node(c, &node).await;
                    pending = Some((id, scan, account));
                }
                read = self.read_node(c) => {
                    let Some(node) = read else { return };
                    let id = node.attrs().optional_string("id").map(|v| v.to_string());
                    if let Some((want, scan, account)) = &pending
                        && id.as_deref() == Some(want.as_str())
                    {
                        if let Some(signed) = device_signature(&node) {
                            let signature_ok = verify_device(&signed, &scan.identity, account);
                            server.linked.lock().unwrap().push(Linked {
                                jid: format!("{}:5@s.whatsapp.net", scan.phone),
                                signature_ok,
                            });
                            let restart = NodeBuilder::new("stream:error")
                                .attr("code", "515")
                                .build();
                            self.send_node(c, &restart).await;
                            let _ = self.ws.close(None).await;
                            return;
                        }
                        // The client refused the pairing (an `<iq type="error">`): the codes
                        // go on.
                        pending = None;
                        continue;
                    }
                    if let Some(answer) = iq_result(&node) {
                        self.send_node(c, &answer).await;
                    }
                }
            }
        }
    }

    /// The responder's side of Noise XX, or of IK when the client already knows our key.
    async fn handshake(&mut self, server: &Shared) -> Option<(&'static str, Ciphers, Vec<u8>)> {
        let hello = self.frame().await?;
        let msg = wa::HandshakeMessage::decode_from_slice(&hello).ok()?;
        let client_hello = msg.client_hello.into_option()?;
        let client_eph: [u8; 32] = client_hello.ephemeral.clone()?.try_into().ok()?;
        let server_pub: [u8; 32] = server
            .identity
            .public_key
            .public_key_bytes()
            .try_into()
            .ok()?;
        let server_priv = server.identity.private_key.serialize();
        let eph = KeyPair::generate(&mut rand010::rng());
        let eph_pub: [u8; 32] = eph.public_key.public_key_bytes().try_into().ok()?;
        let eph_priv = eph.private_key.serialize();

        if let (Some(enc_static), Some(enc_payload)) =
            (client_hello.r#static.clone(), client_hello.payload.clone())
        {
            // IK: e, es, s, ss from the client; e, ee, se and our certificate back.
            let mut noise = NoiseHandshake::new(NOISE_PATTERN_IK, &WA_CONN_HEADER).ok()?;
            noise.authenticate(&server_pub);
            noise.authenticate(&client_eph);
            noise.mix_shared_secret(server_priv, &client_eph).ok()?;
            let client_static: [u8; 32] = noise.decrypt(&enc_static).ok()?.try_into().ok()?;
            noise.mix_shared_secret(server_priv, &client_static).ok()?;
            let login = noise.decrypt(&enc_payload).ok()?;
            noise.authenticate(&eph_pub);
            noise.mix_shared_secret(eph_priv, &client_eph).ok()?;
            noise.mix_shared_secret(eph_priv, &client_static).ok()?;
            let cert = noise.encrypt(&server.cert_chain).ok()?;
            self.send_server_hello(eph_pub, None, cert).await;
            return Some(("IK", split(noise)?, login));
        }

        // XX: e from the client; e, ee, s, es and our certificate back; s, se and the login
        // payload from the client.
        let mut noise = NoiseHandshake::new(NOISE_PATTERN_XX, &WA_CONN_HEADER).ok()?;
        noise.authenticate(&client_eph);
        noise.authenticate(&eph_pub);
        noise.mix_shared_secret(eph_priv, &client_eph).ok()?;
        let enc_static = noise.encrypt(&server_pub).ok()?;
        noise.mix_shared_secret(server_priv, &client_eph).ok()?;
        let cert = noise.encrypt(&server.cert_chain).ok()?;
        self.send_server_hello(eph_pub, Some(enc_static), cert)
            .await;

        let finish = self.frame().await?;
        let msg = wa::HandshakeMessage::decode_from_slice(&finish).ok()?;
        let client_finish = msg.client_finish.into_option()?;
        let client_static: [u8; 32] = noise
            .decrypt(&client_finish.r#static.clone()?)
            .ok()?
            .try_into()
            .ok()?;
        noise.mix_shared_secret(eph_priv, &client_static).ok()?;
        let login = noise.decrypt(&client_finish.payload.clone()?).ok()?;
        Some(("XX", split(noise)?, login))
    }

    async fn send_server_hello(
        &mut self,
        eph: [u8; 32],
        enc_static: Option<Vec<u8>>,
        cert: Vec<u8>,
    ) {
        let hello = wa::HandshakeMessage {
            server_hello: whatsapp_rust::waproto::buffa::MessageField::some(
                wa::handshake_message::ServerHello {
                    ephemeral: Some(eph.to_vec()),
                    r#static: enc_static,
                    payload: Some(cert),
                    ..Default::default()
                },
            ),
            ..Default::default()
        };
        self.send_frame(&hello.encode_to_vec()).await;
    }
}

/// The client's node from a decrypted frame.
fn parse(plain: &[u8]) -> Option<Node> {
    use whatsapp_rust::wacore_binary::marshal::unmarshal_ref;
    use whatsapp_rust::wacore_binary::util::unpack;
    let data = unpack(plain).ok()?;
    Some(unmarshal_ref(&data).ok()?.to_owned())
}

/// An empty result for an `<iq>` request (`get`, `set`); `None` for anything else.
fn iq_result(node: &Node) -> Option<Node> {
    if node.tag.as_ref() != "iq" {
        return None;
    }
    let mut attrs = node.attrs();
    let kind = attrs.optional_string("type")?;
    if kind != "get" && kind != "set" {
        return None;
    }
    let id = attrs.optional_string("id")?.to_string();
    let xmlns = attrs.optional_string("xmlns").map(|v| v.to_string());
    let result = NodeBuilder::new("iq")
        .attr("id", id)
        .attr("type", "result")
        .attr("from", "s.whatsapp.net");
    let result = match xmlns.as_deref() {
        // App state: the fake's accounts have empty collections, so each one asked for comes
        // back at version 0 with neither snapshot nor patches (the client reads a `<sync>`
        // that leaves one out as not synced, and an `<iq>` without `<sync>` as an error).
        Some("w:sync:app:state") => {
            let asked = node
                .get_optional_child("sync")
                .and_then(|sync| sync.children())
                .map(|children| {
                    children
                        .iter()
                        .filter(|c| c.tag.as_ref() == "collection")
                        .filter_map(|c| c.attrs().optional_string("name").map(|n| n.to_string()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            result.children([NodeBuilder::new("sync")
                .children(asked.into_iter().map(|name| {
                    NodeBuilder::new("collection")
                        .attr("name", name)
                        .attr("version", "0")
                        .build()
                }))
                .build()])
        }
        _ => result,
    };
    Some(result.build())
}

/// The transport keys: the initiator writes with the first, so the responder reads with it.
fn split(noise: NoiseHandshake) -> Option<Ciphers> {
    let (client_write, client_read) = noise.finish().ok()?;
    Some(Ciphers {
        write: client_read,
        read: client_write,
        written: 0,
        read_count: 0,
    })
}

/// The phone's `pair-success` for `scan`, and the account's public key that signed it.
fn pair_success(id: &str, scan: &Scan) -> (Node, Vec<u8>) {
    use whatsapp_rust::wacore::libsignal::crypto::hmac_sha256;
    let account = KeyPair::generate(&mut rand010::rng());
    let account_public = account.public_key.public_key_bytes().to_vec();
    let details = wa::ADVDeviceIdentity {
        raw_id: Some(rand::random::<u32>()),
        timestamp: Some(unix_now()),
        key_index: Some(1),
        account_type: Some(wa::ADVEncryptionType::E2EE),
        device_type: Some(wa::ADVEncryptionType::E2EE),
    }
    .encode_to_vec();
    // The account signs [6, 0] ‖ details ‖ the new device's identity key.
    let signed_over = [&[6u8, 0][..], &details, &scan.identity].concat();
    let signature = account
        .private_key
        .calculate_signature(&signed_over, &mut rand010::rng())
        .unwrap();
    let signed = wa::ADVSignedDeviceIdentity {
        details: Some(details),
        account_signature_key: Some(account_public.clone()),
        account_signature: Some(signature.to_vec()),
        device_signature: None,
    }
    .encode_to_vec();
    let container = wa::ADVSignedDeviceIdentityHMAC {
        hmac: Some(hmac_sha256(&scan.adv_secret, &signed).to_vec()),
        details: Some(signed),
        account_type: Some(wa::ADVEncryptionType::E2EE),
    }
    .encode_to_vec();
    let node = NodeBuilder::new("iq")
        .attr("from", "s.whatsapp.net")
        .attr("type", "set")
        .attr("id", id)
        .children([NodeBuilder::new("pair-success")
            .children([
                NodeBuilder::new("device-identity").bytes(container).build(),
                NodeBuilder::new("device")
                    .attr("jid", format!("{}:5@s.whatsapp.net", scan.phone))
                    .attr("lid", "100000012345678:5@lid")
                    .build(),
                NodeBuilder::new("platform").attr("name", "android").build(),
            ])
            .build()])
        .build();
    (node, account_public)
}

/// The signed identity in the client's `<pair-device-sign>` answer.
fn device_signature(node: &Node) -> Option<wa::ADVSignedDeviceIdentity> {
    let sign = node.get_optional_child("pair-device-sign")?;
    let identity = sign.get_optional_child("device-identity")?;
    let bytes = match identity.content.as_ref()? {
        whatsapp_rust::wacore_binary::NodeContent::Bytes(b) => b.clone(),
        _ => return None,
    };
    wa::ADVSignedDeviceIdentity::decode_from_slice(&bytes).ok()
}

/// Whether the device signed [6, 1] ‖ details ‖ its identity key ‖ the account key with the
/// identity key the QR code showed.
fn verify_device(
    signed: &wa::ADVSignedDeviceIdentity,
    identity: &[u8; 32],
    account: &[u8],
) -> bool {
    use whatsapp_rust::wacore::libsignal::protocol::PublicKey;
    let (Some(details), Some(signature)) = (&signed.details, &signed.device_signature) else {
        return false;
    };
    let Ok(key) = PublicKey::from_djb_public_key_bytes(identity) else {
        return false;
    };
    let message = [&[6u8, 1][..], details, identity, account].concat();
    key.verify_signature(&message, signature)
}

/// What identifies a contact's receipt on the server's queue: the message and the kind.
fn receipt_key(id: &str, kind: Option<&str>) -> String {
    format!("{id}/{}", kind.unwrap_or("delivery"))
}

/// The `jid`s of the `<user>` children of `list`.
fn asked_users(list: Option<&Node>) -> Vec<String> {
    list.and_then(Node::children)
        .unwrap_or_default()
        .iter()
        .filter(|u| u.tag.as_ref() == "user")
        .filter_map(|u| u.attrs().optional_string("jid").map(|v| v.to_string()))
        .collect()
}

/// The fake contact a phone JID names (its digits); `None` for the account's own user, LIDs
/// and groups. Every other phone number is a contact of the fake's.
fn contact_user<'a>(jid: &'a str, own_user: &str) -> Option<&'a str> {
    let user = jid.strip_suffix("@s.whatsapp.net")?;
    let user = user.split(':').next()?;
    (user != own_user && !user.is_empty()).then_some(user)
}

/// Seconds since the epoch, as the protocol's `t` attributes carry them.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
