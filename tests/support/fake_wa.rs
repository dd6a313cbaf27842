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
//! Scope so far: the handshake (XX on first contact, IK once a login succeeded and the client
//! cached the server's key), then the login's answer, scripted per connection: a `<failure>`
//! with its code (401 logged out, 402 banned with a reason code and expiry, 405 outdated, 503
//! unavailable…), a `<stream:error>` (a code, or a conflict such as `replaced`), a connection
//! that closes before the handshake (a failed connect), or `<success>` with an empty offline
//! queue, after which every IQ (pings included) gets an empty result and the test may push a
//! stanza (a `515`, a conflict). Pairing, messages, receipts and acks are the next steps.

#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use whatsapp_rust::wacore::handshake::NoiseHandshake;
use whatsapp_rust::wacore::libsignal::protocol::KeyPair;
use whatsapp_rust::wacore::noise::NoiseCipher;
use whatsapp_rust::wacore::noise::framing::{FrameDecoder, encode_frame};
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
}

impl Shared {
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
        let Some((pattern, mut cipher)) = outcome else {
            self.seen.lock().unwrap().push(seen);
            return;
        };
        seen.handshake = Some(pattern);
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
            Answer::Success => {
                let pushes = self.pushes.subscribe();
                conn.logged_in(&mut cipher, pushes).await;
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

    /// A logged-in connection: the offline queue (empty), then IQs answered until the client
    /// leaves or a pushed stanza ends the stream.
    async fn logged_in(
        &mut self,
        c: &mut Ciphers,
        mut pushes: tokio::sync::broadcast::Receiver<Node>,
    ) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let success = NodeBuilder::new("success")
            .attr("t", now.to_string())
            .attr("lid", "100000012345678@lid")
            .build();
        self.send_node(c, &success).await;
        let queue = NodeBuilder::new("ib")
            .children([NodeBuilder::new("offline_preview")
                .attr("count", "0")
                .attr("message", "0")
                .build()])
            .build();
        self.send_node(c, &queue).await;
        let end = NodeBuilder::new("ib")
            .children([NodeBuilder::new("offline").attr("count", "0").build()])
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
                read = self.read_node(c) => {
                    let Some(plain) = read else { return };
                    if let Some(answer) = iq_result(&plain) {
                        self.send_node(c, &answer).await;
                    }
                }
            }
        }
    }

    /// Reads the client's next node, if it sends one.
    async fn read_node(&mut self, c: &mut Ciphers) -> Option<Vec<u8>> {
        let mut frame = self.frame().await?;
        c.read
            .decrypt_in_place_with_counter(c.read_count, &mut frame)
            .ok()?;
        c.read_count += 1;
        Some(frame)
    }

    /// The responder's side of Noise XX, or of IK when the client already knows our key.
    async fn handshake(&mut self, server: &Shared) -> Option<(&'static str, Ciphers)> {
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
            let _login = noise.decrypt(&enc_payload).ok()?;
            noise.authenticate(&eph_pub);
            noise.mix_shared_secret(eph_priv, &client_eph).ok()?;
            noise.mix_shared_secret(eph_priv, &client_static).ok()?;
            let cert = noise.encrypt(&server.cert_chain).ok()?;
            self.send_server_hello(eph_pub, None, cert).await;
            return Some(("IK", split(noise)?));
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
        let _login = noise.decrypt(&client_finish.payload.clone()?).ok()?;
        Some(("XX", split(noise)?))
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

/// An empty result for an `<iq>` request (`get`, `set`); `None` for anything else.
fn iq_result(plain: &[u8]) -> Option<Node> {
    use whatsapp_rust::wacore_binary::marshal::unmarshal_ref;
    use whatsapp_rust::wacore_binary::util::unpack;
    let data = unpack(plain).ok()?;
    let node = unmarshal_ref(&data).ok()?;
    if node.tag.as_ref() != "iq" {
        return None;
    }
    let mut attrs = node.attrs();
    let kind = attrs.optional_string("type")?;
    if kind != "get" && kind != "set" {
        return None;
    }
    let id = attrs.optional_string("id")?.to_string();
    Some(
        NodeBuilder::new("iq")
            .attr("id", id)
            .attr("type", "result")
            .attr("from", "s.whatsapp.net")
            .build(),
    )
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
