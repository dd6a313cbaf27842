//! Domain identifiers, parsed once at the edge (STYLE rule 6).
//!
//! A [`PhoneNumber`] is an E.164 number (`+` then 7–15 digits, no leading zero). A [`Jid`] is a
//! WhatsApp address: a user by phone (`15550001@s.whatsapp.net`), a user by LID (`1234@lid`) or a
//! group (`1203…@g.us`). Both are built only through `parse`, so the rest of the code never sees
//! an invalid one.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not an E.164 number.
    #[error("`{0}` is not an E.164 phone number (+ then 7 to 15 digits, not starting with 0)")]
    Phone(String),
    /// Not a WhatsApp address.
    #[error("`{0}` is not a WhatsApp address (user@s.whatsapp.net, id@lid or id@g.us)")]
    Jid(String),
}

/// An E.164 phone number such as `+15550001`: the identity of a WhatsApp account. Shared text:
/// a clone is a reference count, not a copy (identifiers are cloned into every message, key and
/// log entry).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PhoneNumber(Arc<str>);

impl PhoneNumber {
    /// Parses `+` followed by 7 to 15 digits, the first not `0`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let digits = s
            .strip_prefix('+')
            .ok_or_else(|| IdError::Phone(s.to_owned()))?;
        let valid = (7..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if valid {
            Ok(Self(s.into()))
        } else {
            Err(IdError::Phone(s.to_owned()))
        }
    }

    /// The number with its leading `+`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The digits without `+`, as WhatsApp puts them in a JID.
    pub fn digits(&self) -> &str {
        &self.0[1..]
    }

    /// The user JID of this number.
    pub fn jid(&self) -> Jid {
        Jid {
            full: format!("{}@{}", self.digits(), Server::User.as_str()).into(),
            server: Server::User,
        }
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for PhoneNumber {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The server part of a [`Jid`]: which kind of address it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Server {
    /// A user addressed by phone number (`s.whatsapp.net`).
    User,
    /// A user addressed by a linked identity (`lid`), which hides the phone number.
    Lid,
    /// A group chat (`g.us`).
    Group,
}

impl Server {
    fn as_str(self) -> &'static str {
        match self {
            Self::User => "s.whatsapp.net",
            Self::Lid => "lid",
            Self::Group => "g.us",
        }
    }
}

/// A WhatsApp address: `user@server`. Shared text, like [`PhoneNumber`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Jid {
    /// The whole address, kept as text: it is written far more often than taken apart.
    full: Arc<str>,
    server: Server,
}

impl Jid {
    /// Parses `user@s.whatsapp.net`, `id@lid` or `id@g.us`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let err = || IdError::Jid(s.to_owned());
        let (user, server) = s.split_once('@').ok_or_else(err)?;
        let server = match server {
            "s.whatsapp.net" => Server::User,
            "lid" => Server::Lid,
            "g.us" => Server::Group,
            _ => return Err(err()),
        };
        let valid_user = !user.is_empty()
            && user.len() <= 64
            && user.bytes().all(|b| b.is_ascii_digit() || b == b'-');
        if !valid_user {
            return Err(err());
        }
        Ok(Self {
            full: s.into(),
            server,
        })
    }

    /// A LID address for the given opaque id (digits).
    pub fn lid(id: &str) -> Result<Self, IdError> {
        Self::parse(&format!("{id}@lid"))
    }

    /// A group address for the given group id (digits and dashes).
    pub fn group(id: &str) -> Result<Self, IdError> {
        Self::parse(&format!("{id}@g.us"))
    }

    /// The part before `@`.
    pub fn user(&self) -> &str {
        &self.full[..self.full.len() - self.server.as_str().len() - 1]
    }

    /// The whole address, `user@server`.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// Which kind of address this is.
    pub fn server(&self) -> Server {
        self.server
    }

    /// True for group chats.
    pub fn is_group(&self) -> bool {
        self.server == Server::Group
    }

    /// The phone number of a user JID; `None` for LIDs and groups.
    pub fn phone(&self) -> Option<PhoneNumber> {
        match self.server {
            Server::User => PhoneNumber::parse(&format!("+{}", self.user())).ok(),
            Server::Lid | Server::Group => None,
        }
    }
}

impl fmt::Display for Jid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl FromStr for Jid {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

macro_rules! string_serde {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                Self::parse(&raw).map_err(serde::de::Error::custom)
            }
        }
    };
}
string_serde!(PhoneNumber);
string_serde!(Jid);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn phone_numbers_follow_e164() {
        assert!(PhoneNumber::parse("+15550001").is_ok());
        for bad in [
            "15550001",
            "+0155500",
            "+123",
            "+1234567890123456",
            "+1555a001",
            "",
        ] {
            assert!(PhoneNumber::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn jids_round_trip_and_know_their_kind() {
        let n = PhoneNumber::parse("+15550001").expect("valid");
        assert_eq!(n.jid().to_string(), "15550001@s.whatsapp.net");
        assert_eq!(n.jid().phone(), Some(n));
        let g = Jid::parse("120363-1@g.us").expect("valid");
        assert!(g.is_group() && g.phone().is_none());
        assert_eq!(Jid::parse("77@lid").expect("valid").server(), Server::Lid);
        assert!(Jid::parse("1@example.com").is_err());
        assert!(Jid::parse("@lid").is_err());
    }

    proptest! {
        #[test]
        fn any_valid_number_round_trips(d in "[1-9][0-9]{6,14}") {
            let n = PhoneNumber::parse(&format!("+{d}")).expect("generated valid");
            prop_assert_eq!(n.jid().phone(), Some(n.clone()));
            prop_assert_eq!(n.to_string().parse::<PhoneNumber>().ok(), Some(n));
        }

        #[test]
        fn parsing_never_panics(s in "\\PC*") {
            let _ = PhoneNumber::parse(&s);
            let _ = Jid::parse(&s);
        }
    }
}
