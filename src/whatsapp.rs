//! The production transport: real WhatsApp numbers through whatsapp-rust 0.7.0.
//!
//! - `backend`: the crate's storage `Backend` over Switchboard's store ([`WaBackend`]): one per
//!   number, on the store's one pool, secrets sealed, every write fenced with the number's token.
//! - `events`: the crate's `Event` as the port's `WaEvent`, by one pure function.
//! - `proxy`: the transport factory each number dials through: directly, or through the SOCKS5
//!   or HTTP proxy its settings name.
//! - `session`: the transport port ([`WhatsAppConnector`], [`WhatsAppSession`]): one `Bot` per
//!   number, its inline event handler and its inbound durability hook.
//!
//! No whatsapp-rust type crosses the transport port: this module turns the crate's API and
//! events into Switchboard's own.

mod backend;
mod events;
mod proxy;
mod session;

pub use backend::WaBackend;
pub use events::{DROPPED, inbound, map_event};
pub use proxy::{PROXY_SETTING, Proxy, proxy_of};
pub use session::{
    CONNECT_FAILURES, WHATSAPP_URL, WhatsAppConnector, WhatsAppOptions, WhatsAppSession,
};
