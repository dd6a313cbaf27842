//! The production transport: real WhatsApp numbers through whatsapp-rust 0.7.0.
//!
//! - `backend`: the crate's storage `Backend` over Switchboard's store ([`WaBackend`]): one per
//!   number, on the store's one pool, secrets sealed, every write fenced with the number's token.
//!
//! No whatsapp-rust type crosses the transport port: this module turns the crate's API and
//! events into Switchboard's own.

mod backend;

pub use backend::WaBackend;
