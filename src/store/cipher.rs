//! AES-256-GCM for session blobs at rest.
//!
//! Keys come from the environment (or, embedded, a key file created on first start), each with
//! an id. The first key encrypts; every key decrypts, so keys rotate by putting a new one first
//! and keeping the old ones until the sessions are re-saved. The number is the associated data:
//! a blob copied to another number's row does not decrypt.

use std::collections::HashMap;
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use rand::RngCore;

/// Why a key set could not be built or a blob not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CipherError {
    /// The key list is empty or malformed.
    #[error("session keys: {0}")]
    Keys(String),
    /// The blob names a key that is not configured.
    #[error("unknown session key id {0:?}")]
    UnknownKey(String),
    /// The blob does not decrypt under its key (tampered, or the wrong number).
    #[error("session blob does not decrypt")]
    Decrypt,
}

/// The configured session keys.
pub struct SessionCipher {
    active: String,
    keys: HashMap<String, Aes256Gcm>,
}

impl fmt::Debug for SessionCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionCipher")
            .field("active", &self.active)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// An encrypted blob as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The key that sealed it.
    pub key_id: String,
    /// 96-bit nonce, fresh per blob.
    pub nonce: Vec<u8>,
    /// Ciphertext with the GCM tag.
    pub ciphertext: Vec<u8>,
}

impl SessionCipher {
    /// Parses `id:hex64[,id:hex64…]`; the first key encrypts.
    pub fn parse(spec: &str) -> Result<Self, CipherError> {
        let mut active = None;
        let mut keys = HashMap::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, hex_key) = part
                .split_once(':')
                .ok_or_else(|| CipherError::Keys("each key is written id:hex".into()))?;
            if id.is_empty() {
                return Err(CipherError::Keys("a key id is empty".into()));
            }
            let bytes = hex::decode(hex_key.trim())
                .map_err(|_| CipherError::Keys(format!("key {id:?} is not hex")))?;
            if bytes.len() != 32 {
                return Err(CipherError::Keys(format!(
                    "key {id:?} has {} bytes; AES-256 needs 32 (64 hex digits)",
                    bytes.len()
                )));
            }
            let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes));
            if keys.insert(id.to_owned(), cipher).is_some() {
                return Err(CipherError::Keys(format!("key id {id:?} appears twice")));
            }
            active.get_or_insert_with(|| id.to_owned());
        }
        let active = active.ok_or_else(|| CipherError::Keys("no key given".into()))?;
        Ok(Self { active, keys })
    }

    /// A fresh random key spec `id:hex`, for the embedded key file.
    pub fn generate(id: &str) -> String {
        let mut key = [0_u8; 32];
        rand::rng().fill_bytes(&mut key);
        format!("{id}:{}", hex::encode(key))
    }

    /// Encrypts `plain` for `number`.
    pub fn seal(&self, number: &str, plain: &[u8]) -> Result<Sealed, CipherError> {
        let cipher = self
            .keys
            .get(&self.active)
            .ok_or_else(|| CipherError::UnknownKey(self.active.clone()))?;
        let mut nonce = [0_u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let payload = Payload {
            msg: plain,
            aad: number.as_bytes(),
        };
        let ciphertext = cipher
            .encrypt(Nonce::from_slice(&nonce), payload)
            .map_err(|_| CipherError::Decrypt)?;
        Ok(Sealed {
            key_id: self.active.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Decrypts a blob sealed for `number`.
    pub fn open(&self, number: &str, sealed: &Sealed) -> Result<Vec<u8>, CipherError> {
        let cipher = self
            .keys
            .get(&sealed.key_id)
            .ok_or_else(|| CipherError::UnknownKey(sealed.key_id.clone()))?;
        if sealed.nonce.len() != 12 {
            return Err(CipherError::Decrypt);
        }
        let payload = Payload {
            msg: &sealed.ciphertext,
            aad: number.as_bytes(),
        };
        cipher
            .decrypt(Nonce::from_slice(&sealed.nonce), payload)
            .map_err(|_| CipherError::Decrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_and_rotates() {
        let old = SessionCipher::generate("k1");
        let new = SessionCipher::generate("k2");
        let before = SessionCipher::parse(&old).expect("one key");
        let sealed = before.seal("+15550001", b"secret").expect("seal");
        assert_ne!(sealed.ciphertext, b"secret");
        let after = SessionCipher::parse(&format!("{new},{old}")).expect("two keys");
        assert_eq!(
            after.open("+15550001", &sealed).expect("old key"),
            b"secret"
        );
        assert_eq!(after.seal("+15550001", b"x").expect("seal").key_id, "k2");
        assert_eq!(
            after.open("+15550002", &sealed),
            Err(CipherError::Decrypt),
            "bound to its number"
        );
        let only_new = SessionCipher::parse(&new).expect("one key");
        assert_eq!(
            only_new.open("+15550001", &sealed),
            Err(CipherError::UnknownKey("k1".into()))
        );
    }

    #[test]
    fn bad_key_specs_are_refused_with_the_reason() {
        for (spec, needle) in [
            ("", "no key"),
            ("k1", "id:hex"),
            ("k1:zz", "not hex"),
            ("k1:00ff", "32"),
        ] {
            let err = SessionCipher::parse(spec).expect_err(spec).to_string();
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }
}
