//! The fake WhatsApp's contacts and their side of the Signal protocol: what a device uploaded
//! (its identity, signed prekey and one-time prekeys, as the server keeps them), and contacts
//! that start a session from that bundle and encrypt to the device with wacore-libsignal's
//! own `process_prekey_bundle` and `message_encrypt`, as a phone on the other side would.

use std::collections::{HashMap, VecDeque};

use async_trait::async_trait;
use whatsapp_rust::wacore::libsignal::protocol::error::Result as SignalResult;
use whatsapp_rust::wacore::libsignal::protocol::{
    CiphertextMessageType, DeviceId, Direction, IdentityChange, IdentityKey, IdentityKeyPair,
    IdentityKeyStore, PreKeyBundle, PreKeyId, ProtocolAddress, PublicKey, SessionRecord,
    SessionStore, SignedPreKeyId, UsePQRatchet, message_encrypt, process_prekey_bundle,
};
use whatsapp_rust::wacore::messages::MessageUtils;
use whatsapp_rust::wacore_binary::Node;
use whatsapp_rust::wacore_binary::NodeContent;
use whatsapp_rust::waproto::whatsapp as wa;

/// The keys a device uploaded (`<iq xmlns="encrypt" type="set">`), as the server holds them:
/// each one-time prekey is handed out once.
#[derive(Debug, Clone)]
pub(super) struct Uploaded {
    registration: u32,
    identity: [u8; 32],
    prekeys: VecDeque<(u32, [u8; 32])>,
    signed: (u32, [u8; 32], Vec<u8>),
}

impl Uploaded {
    /// The upload in `iq`, if it is one: `<registration>` (4 bytes), `<identity>` (32),
    /// `<list>` of `<key><id>` (3 bytes) `<value>` (32), `<skey>` with its `<signature>`.
    pub(super) fn parse(iq: &Node) -> Option<Self> {
        let bytes = |node: &Node, child: &str| -> Option<Vec<u8>> {
            match &node.get_optional_child(child)?.content {
                Some(NodeContent::Bytes(raw)) => Some(raw.clone()),
                Some(NodeContent::String(text)) => Some(text.as_bytes().to_vec()),
                _ => None,
            }
        };
        let id = |raw: Vec<u8>| -> Option<u32> {
            (raw.len() == 3).then(|| u32::from_be_bytes([0, raw[0], raw[1], raw[2]]))
        };
        let key32 = |raw: Vec<u8>| -> Option<[u8; 32]> { raw.try_into().ok() };
        let registration = u32::from_be_bytes(bytes(iq, "registration")?.try_into().ok()?);
        let identity = key32(bytes(iq, "identity")?)?;
        let prekeys = iq
            .get_optional_child("list")?
            .children()?
            .iter()
            .filter(|k| k.tag.as_ref() == "key")
            .map(|k| Some((id(bytes(k, "id")?)?, key32(bytes(k, "value")?)?)))
            .collect::<Option<VecDeque<_>>>()?;
        let skey = iq.get_optional_child("skey")?;
        let signed = (
            id(bytes(skey, "id")?)?,
            key32(bytes(skey, "value")?)?,
            bytes(skey, "signature")?,
        );
        Some(Self {
            registration,
            identity,
            prekeys,
            signed,
        })
    }

    /// Adds a later upload's one-time prekeys (the identity and signed prekey are replaced).
    pub(super) fn merge(&mut self, later: Self) {
        let Self {
            registration,
            identity,
            prekeys,
            signed,
        } = later;
        self.registration = registration;
        self.identity = identity;
        self.signed = signed;
        self.prekeys.extend(prekeys);
    }

    /// How many one-time prekeys the server still holds.
    pub(super) fn remaining(&self) -> usize {
        self.prekeys.len()
    }

    /// A bundle for a contact starting a session, with one of the one-time prekeys (consumed)
    /// while any is left.
    pub(super) fn take_bundle(&mut self) -> Option<PreKeyBundle> {
        let key = |raw: &[u8; 32]| PublicKey::from_djb_public_key_bytes(raw).ok();
        let one_time = match self.prekeys.pop_front() {
            Some((id, raw)) => Some((PreKeyId::from(id), key(&raw)?)),
            None => None,
        };
        let (signed_id, signed_raw, signature) = &self.signed;
        PreKeyBundle::new(
            self.registration,
            DeviceId::from(0),
            one_time,
            SignedPreKeyId::from(*signed_id),
            key(signed_raw)?,
            signature.clone(),
            IdentityKey::new(key(&self.identity)?),
        )
        .ok()
    }
}

/// A contact: an account of its own with a Signal identity and its sessions with the
/// devices it wrote to.
pub(super) struct Contact {
    identities: Identities,
    sessions: Sessions,
}

impl Contact {
    pub(super) fn new() -> Self {
        Self {
            identities: Identities {
                own: IdentityKeyPair::generate(&mut rand010::rng()),
                registration: rand010::random::<u32>() & 0x3fff,
                known: HashMap::new(),
            },
            sessions: Sessions::default(),
        }
    }

    /// Whether the contact has a session with `device` (`user:device`).
    pub(super) fn has_session(&self, device: &str) -> bool {
        self.sessions.0.contains_key(&address(device))
    }

    /// `message` padded and encrypted to `device` (`user:device`), starting a session from
    /// `bundle` (the device's keys, from the server) if there is none yet. The `<enc>` type
    /// (`pkmsg` until the device has answered, as the contact never learns it was received)
    /// and the ciphertext; `None` without a session or a bundle to start one.
    pub(super) async fn encrypt(
        &mut self,
        device: &str,
        bundle: Option<PreKeyBundle>,
        message: &wa::Message,
    ) -> Option<(&'static str, Vec<u8>)> {
        let address = address(device);
        if !self.sessions.0.contains_key(&address) {
            let bundle = bundle?;
            process_prekey_bundle(
                &address,
                &mut self.sessions,
                &mut self.identities,
                &bundle,
                &mut rand010::rng(),
                UsePQRatchet::No,
            )
            .await
            .ok()?;
        }
        let plain = MessageUtils::encode_and_pad(message);
        let sealed = message_encrypt(&plain, &address, &mut self.sessions, &mut self.identities)
            .await
            .ok()?;
        let kind = match sealed.message_type() {
            CiphertextMessageType::PreKey => "pkmsg",
            _ => "msg",
        };
        Some((kind, sealed.serialize().to_vec()))
    }
}

/// The contact's name for a device's session (any name works: it is the contact's own).
fn address(device: &str) -> ProtocolAddress {
    ProtocolAddress::new(&format!("{device}@c.us"), DeviceId::from(0))
}

struct Identities {
    own: IdentityKeyPair,
    registration: u32,
    known: HashMap<ProtocolAddress, IdentityKey>,
}

#[async_trait]
impl IdentityKeyStore for Identities {
    async fn get_identity_key_pair(&self) -> SignalResult<IdentityKeyPair> {
        Ok(self.own.clone())
    }

    async fn get_local_registration_id(&self) -> SignalResult<u32> {
        Ok(self.registration)
    }

    async fn save_identity(
        &mut self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
    ) -> SignalResult<IdentityChange> {
        let before = self.known.insert(address.clone(), *identity);
        Ok(IdentityChange::from_changed(
            before.is_some_and(|b| b != *identity),
        ))
    }

    async fn is_trusted_identity(
        &self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
        _direction: Direction,
    ) -> SignalResult<bool> {
        // Trust on first use, as the phone does; a changed key is not trusted.
        Ok(self.known.get(address).is_none_or(|k| k == identity))
    }

    async fn get_identity(&self, address: &ProtocolAddress) -> SignalResult<Option<IdentityKey>> {
        Ok(self.known.get(address).copied())
    }
}

#[derive(Default)]
struct Sessions(HashMap<ProtocolAddress, SessionRecord>);

#[async_trait]
impl SessionStore for Sessions {
    async fn load_session(&self, address: &ProtocolAddress) -> SignalResult<Option<SessionRecord>> {
        Ok(self.0.get(address).cloned())
    }

    async fn has_session(&self, address: &ProtocolAddress) -> SignalResult<bool> {
        Ok(self.0.contains_key(address))
    }

    async fn store_session(
        &mut self,
        address: &ProtocolAddress,
        record: SessionRecord,
    ) -> SignalResult<()> {
        self.0.insert(address.clone(), record);
        Ok(())
    }
}
