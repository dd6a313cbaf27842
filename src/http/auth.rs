//! Who is asking: bearer tokens, their tenant and role.
//!
//! A token is `sbt_` and 64 hex digits (32 random bytes). Only its SHA-256 is stored; every
//! request's token is hashed and looked up. The super-admin's token comes from
//! `SWITCHBOARD_ADMIN_TOKEN` (any string of 32 characters or more) and is compared by hash
//! too. A tenant's token acts within its tenant with its [`Role`]; the super-admin acts on
//! every tenant and alone creates tenants.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use rand::RngCore;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use super::Api;
use super::problem::Problem;
use crate::store::Role;

/// The shortest bootstrap token accepted.
pub const MIN_ADMIN_TOKEN: usize = 32;

/// The caller of a request, authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The bootstrap token: every tenant, every route.
    Super,
    /// A token of one tenant.
    Tenant {
        /// The token's public id: the actor in the audit log.
        token: String,
        /// Its tenant.
        tenant: String,
        /// What it may do there.
        role: Role,
    },
}

impl Principal {
    /// The actor the audit log names.
    pub fn actor(&self) -> String {
        match self {
            Self::Super => "super-admin".to_owned(),
            Self::Tenant { token, .. } => token.clone(),
        }
    }

    /// The tenant this caller is limited to; `None` for the super-admin.
    pub fn scope(&self) -> Option<&str> {
        match self {
            Self::Super => None,
            Self::Tenant { tenant, .. } => Some(tenant),
        }
    }

    /// Whether the caller may see `tenant`'s resources at all. One it may not is answered
    /// 404, as if it did not exist.
    pub fn sees(&self, tenant: &str) -> bool {
        self.scope().is_none_or(|t| t == tenant)
    }

    /// The tenant a list is limited to: the caller's own (asking for another is a 404), or,
    /// for the super-admin, the one `asked` for if any.
    pub fn narrow<'a>(&'a self, asked: Option<&'a str>) -> Result<Option<&'a str>, Problem> {
        match (self.scope(), asked) {
            (Some(own), Some(asked)) if own != asked => {
                Err(Problem::not_found(format!("no tenant {asked}")))
            }
            (Some(own), _) => Ok(Some(own)),
            (None, asked) => Ok(asked),
        }
    }

    /// 403 unless the caller's role is at least `role`.
    pub fn require(&self, role: Role) -> Result<(), Problem> {
        match self {
            Self::Super => Ok(()),
            Self::Tenant { role: have, .. } if *have >= role => Ok(()),
            Self::Tenant { role: have, .. } => Err(Problem::forbidden(format!(
                "this needs the {} role; the token is {}",
                role.as_str(),
                have.as_str()
            ))),
        }
    }

    /// 403 unless the caller is the super-admin.
    pub fn require_super(&self) -> Result<(), Problem> {
        match self {
            Self::Super => Ok(()),
            Self::Tenant { .. } => Err(Problem::forbidden("only the super-admin may do this")),
        }
    }
}

/// A new token's secret and the hash that is stored.
pub fn new_secret() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("sbt_{}", hex::encode(bytes));
    let hash = hash(&secret);
    (secret, hash)
}

/// A new token id (public).
pub fn new_token_id() -> String {
    format!("tok_{:016x}", rand::random::<u64>())
}

/// The stored form of a secret.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl FromRequestParts<Api> for Principal {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<Self, Self::Rejection> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| Problem::unauthorized("an Authorization: Bearer token is needed"))?;
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Problem::unauthorized("expected Authorization: Bearer <token>"))?;
        let hashed = hash(secret);
        let who = if let Some(admin) = &api.admin_token
            && hash(admin.expose_secret()) == hashed
        {
            Self::Super
        } else {
            match api.store.token_by_hash(&hashed).await {
                Ok(Some(t)) => Self::Tenant {
                    token: t.id,
                    tenant: t.tenant,
                    role: t.role,
                },
                Ok(None) => return Err(Problem::unauthorized("the token is unknown or revoked")),
                Err(e) if e.is_retryable() => return Err(Problem::unavailable(&e)),
                Err(e) => return Err(Problem::internal(&e)),
            }
        };
        api.limit
            .check(&who.actor(), tokio::time::Instant::now())
            .map_err(super::edges::too_many)?;
        Ok(who)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_rank_and_tenants_see_only_their_own() {
        let editor = Principal::Tenant {
            token: "tok_1".into(),
            tenant: "t1".into(),
            role: Role::Editor,
        };
        assert!(editor.require(Role::Viewer).is_ok());
        assert!(editor.require(Role::Editor).is_ok());
        assert!(editor.require(Role::Admin).is_err());
        assert!(editor.require_super().is_err());
        assert!(editor.sees("t1") && !editor.sees("t2"));
        assert!(Principal::Super.sees("t2") && Principal::Super.require(Role::Admin).is_ok());
        let (secret, stored) = new_secret();
        assert!(secret.starts_with("sbt_") && secret.len() == 68);
        assert_eq!(hash(&secret), stored);
        assert_ne!(stored, secret);
    }
}
