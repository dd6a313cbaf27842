//! The fake WhatsApp's contacts and their side of the Signal protocol: what a device uploaded
//! (its identity, signed prekey and one-time prekeys, as the server keeps them), and contacts
//! that start a session from that bundle and encrypt to the device with wacore-libsignal's
//! own `process_prekey_bundle` and `message_encrypt`, as a phone on the other side would; and
//! the other way, the keys each contact serves (a signed prekey and one-time prekeys) and
//! `message_decrypt` of what a device sends it.

use std::collections::{HashMap, VecDeque};

use async_trait::async_trait;
use whatsapp_rust::wacore::libsignal::protocol::error::Result as SignalResult;
use whatsapp_rust::wacore::libsignal::protocol::{
    CiphertextMessage, CiphertextMessageType, DeviceId, Direction, GenericSignedPreKey,
    IdentityChange, IdentityKey, IdentityKeyPair, IdentityKeyStore, KeyPair, PreKeyBundle,
    PreKeyId, PreKeyRecord, PreKeySignalMessage, PreKeyStore, ProtocolAddress, PublicKey,
    SessionRecord, SessionStore, SignalMessage, SignalProtocolError, SignedPreKeyId,
    SignedPreKeyRecord, SignedPreKeyStore, Timestamp, UsePQRatchet, message_decrypt,
    message_encrypt, process_prekey_bundle,
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

/// How many one-time prekeys a contact puts on the server.
const CONTACT_PREKEYS: u32 = 20;

/// A contact: an account of its own (one device, 0) with a Signal identity, the keys it
/// serves, and its sessions with the devices it talks to.
pub(super) struct Contact {
    identities: Identities,
    sessions: Sessions,
    prekeys: PreKeys,
    signed: SignedPreKeys,
    signed_public: (u32, PublicKey, Vec<u8>),
    /// One-time prekeys the server has not handed out yet.
    serving: VecDeque<(u32, PublicKey)>,
}

impl Contact {
    pub(super) fn new() -> Self {
        let rng = &mut rand010::rng();
        let own = IdentityKeyPair::generate(rng);
        let signed_pair = KeyPair::generate(rng);
        let signature = own
            .private_key()
            .calculate_signature(&signed_pair.public_key.serialize(), rng)
            .unwrap();
        let mut signed = SignedPreKeys::default();
        signed.0.insert(
            SignedPreKeyId::from(1),
            SignedPreKeyRecord::new(
                SignedPreKeyId::from(1),
                Timestamp::from_epoch_millis(0),
                &signed_pair,
                &signature,
            ),
        );
        let mut prekeys = PreKeys::default();
        let mut serving = VecDeque::new();
        for id in 1..=CONTACT_PREKEYS {
            let pair = KeyPair::generate(rng);
            prekeys.0.insert(
                PreKeyId::from(id),
                PreKeyRecord::new(PreKeyId::from(id), &pair),
            );
            serving.push_back((id, pair.public_key));
        }
        Self {
            identities: Identities {
                own,
                registration: rand010::random::<u32>() & 0x3fff,
                known: HashMap::new(),
            },
            sessions: Sessions::default(),
            prekeys,
            signed,
            signed_public: (1, signed_pair.public_key, signature.to_vec()),
            serving,
        }
    }

    /// The bundle the server hands a device that asks for this contact's keys (one one-time
    /// prekey used up, while any is left).
    pub(super) fn bundle(&mut self) -> Option<PreKeyBundle> {
        let (signed_id, signed_public, signature) = &self.signed_public;
        PreKeyBundle::new(
            self.identities.registration,
            DeviceId::from(0),
            self.serving
                .pop_front()
                .map(|(id, key)| (PreKeyId::from(id), key)),
            SignedPreKeyId::from(*signed_id),
            *signed_public,
            signature.clone(),
            *self.identities.own.identity_key(),
        )
        .ok()
    }

    /// What `device` (`user:device`) sent this contact: `<enc>` of `kind` (`pkmsg`, `msg`)
    /// decrypted, unpadded and decoded; `None` if it does not decrypt.
    pub(super) async fn decrypt(
        &mut self,
        device: &str,
        kind: &str,
        ciphertext: &[u8],
    ) -> Option<wa::Message> {
        let sealed = match kind {
            "pkmsg" => CiphertextMessage::PreKeySignalMessage(
                PreKeySignalMessage::try_from(ciphertext).ok()?,
            ),
            "msg" => CiphertextMessage::SignalMessage(SignalMessage::try_from(ciphertext).ok()?),
            _ => return None,
        };
        let opened = message_decrypt(
            &sealed,
            &address(device),
            &mut self.sessions,
            &mut self.identities,
            &mut self.prekeys,
            &self.signed,
            &mut send_rng(),
            UsePQRatchet::No,
        )
        .await
        .ok()?;
        if let Some(used) = opened.consumed_prekey_id {
            self.prekeys.0.remove(&used);
        }
        whatsapp_rust::wacore::messages::decode_plaintext(&opened.plaintext, 2).ok()
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
                &mut send_rng(),
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

/// A generator that may be held across an await in a spawned task (the thread's may not).
fn send_rng() -> rand010::rngs::StdRng {
    rand010::make_rng()
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

#[derive(Default)]
struct PreKeys(HashMap<PreKeyId, PreKeyRecord>);

#[async_trait]
impl PreKeyStore for PreKeys {
    async fn get_pre_key(&self, id: PreKeyId) -> SignalResult<PreKeyRecord> {
        self.0
            .get(&id)
            .cloned()
            .ok_or(SignalProtocolError::InvalidPreKeyId)
    }

    async fn save_pre_key(&mut self, id: PreKeyId, record: &PreKeyRecord) -> SignalResult<()> {
        self.0.insert(id, record.clone());
        Ok(())
    }

    async fn remove_pre_key(&mut self, id: PreKeyId) -> SignalResult<()> {
        self.0.remove(&id);
        Ok(())
    }
}

#[derive(Default)]
struct SignedPreKeys(HashMap<SignedPreKeyId, SignedPreKeyRecord>);

#[async_trait]
impl SignedPreKeyStore for SignedPreKeys {
    async fn get_signed_pre_key(&self, id: SignedPreKeyId) -> SignalResult<SignedPreKeyRecord> {
        self.0
            .get(&id)
            .cloned()
            .ok_or(SignalProtocolError::InvalidSignedPreKeyId)
    }

    async fn save_signed_pre_key(
        &mut self,
        id: SignedPreKeyId,
        record: &SignedPreKeyRecord,
    ) -> SignalResult<()> {
        self.0.insert(id, record.clone());
        Ok(())
    }
}
