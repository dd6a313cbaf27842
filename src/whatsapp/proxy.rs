//! Per-number proxies: the transport factory every number's client dials through.
//!
//! A number's `settings.proxy` (`socks5://[user:pass@]host:port` or
//! `http://[user:pass@]host:port`) routes its connection to WhatsApp through that proxy: a
//! SOCKS5 `CONNECT` (the proxy resolves WhatsApp's host name) or an HTTP `CONNECT` tunnel, then
//! TLS and the WebSocket upgrade over it, as the crate's own tokio transport does over a direct
//! TCP connection ([`from_websocket`] wraps the result). Without a proxy the crate's factory
//! dials directly.
//!
//! The setting is read at every connect, so a change applies at the number's next connection.
//! A proxy that cannot be parsed or reached fails that connect like an unreachable WhatsApp:
//! the client backs off and tries again, and the failure is counted and logged with the reason.

use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use async_trait::async_trait;
use base64::Engine as _;
use switchboard_actors::ids::PhoneNumber;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_websockets::{ClientBuilder, Connector};
use whatsapp_rust::wacore::net::{
    Transport, TransportEvent, TransportFactory, WHATSAPP_WEB_ORIGIN,
};
use whatsapp_rust_tokio_transport::{
    TokioWebSocketTransportFactory, default_tls_connector, from_websocket,
};

use crate::store::SqlStore;

/// The key of a number's settings that names its proxy.
pub const PROXY_SETTING: &str = "proxy";

/// A proxy a number connects through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proxy {
    /// SOCKS5, with a user name and password if given.
    Socks5 {
        /// `host:port` of the proxy.
        addr: String,
        /// User name and password (RFC 1929).
        auth: Option<(String, String)>,
    },
    /// An HTTP proxy's `CONNECT` tunnel.
    Http {
        /// `host:port` of the proxy.
        addr: String,
        /// User name and password (Basic `Proxy-Authorization`).
        auth: Option<(String, String)>,
    },
}

impl Proxy {
    /// Parses `socks5://[user:pass@]host:port` (also `socks5h://`) or
    /// `http://[user:pass@]host:port`; the error says what is wrong.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("proxy {url:?}: expected scheme://host:port"))?;
        let rest = rest.trim_end_matches('/');
        let (auth, addr) = match rest.rsplit_once('@') {
            Some((auth, addr)) => {
                let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
                (Some((user.to_owned(), pass.to_owned())), addr)
            }
            None => (None, rest),
        };
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!(
                "proxy {url:?}: expected host:port after the scheme"
            ));
        }
        let addr = addr.to_owned();
        match scheme {
            "socks5" | "socks5h" => Ok(Self::Socks5 { addr, auth }),
            "http" => Ok(Self::Http { addr, auth }),
            other => Err(format!(
                "proxy {url:?}: scheme {other:?} is not socks5, socks5h or http"
            )),
        }
    }

    /// A TCP stream to `host:port` through the proxy.
    pub async fn tunnel(&self, host: &str, port: u16) -> anyhow::Result<TcpStream> {
        match self {
            Self::Socks5 { addr, auth } => socks5(addr, auth.as_ref(), host, port).await,
            Self::Http { addr, auth } => http_connect(addr, auth.as_ref(), host, port).await,
        }
    }
}

/// The proxy in a number's settings, if it names one.
pub fn proxy_of(settings: &serde_json::Value) -> Result<Option<Proxy>, String> {
    match settings.get(PROXY_SETTING) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(url)) if url.is_empty() => Ok(None),
        Some(serde_json::Value::String(url)) => Proxy::parse(url).map(Some),
        Some(other) => Err(format!("settings.proxy must be a string, not {other}")),
    }
}

/// Dials WhatsApp for one number: through its proxy if its settings name one, directly
/// otherwise.
pub(crate) struct NumberTransport {
    pub(crate) url: String,
    pub(crate) store: SqlStore,
    pub(crate) number: PhoneNumber,
}

#[async_trait]
impl TransportFactory for NumberTransport {
    async fn create_transport(
        &self,
    ) -> anyhow::Result<(Arc<dyn Transport>, async_channel::Receiver<TransportEvent>)> {
        let record = self
            .store
            .number(&self.number)
            .await
            .context("reading the number's settings")?;
        let proxy = match record {
            Some(r) => proxy_of(&r.settings).map_err(|e| anyhow!(e))?,
            None => None,
        };
        let Some(proxy) = proxy else {
            return TokioWebSocketTransportFactory::new()
                .with_url(&self.url)
                .create_transport()
                .await;
        };
        let uri: http::Uri = self.url.parse().context("parsing the WhatsApp URL")?;
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("no host in {}", self.url))?;
        let tls = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            other => bail!("unsupported scheme {other:?} in {}", self.url),
        };
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let stream = proxy
            .tunnel(host, port)
            .await
            .with_context(|| format!("connecting through the proxy to {host}:{port}"))?;
        let connector = if tls {
            default_tls_connector()
        } else {
            Connector::Plain
        };
        let stream = connector
            .wrap(host, stream)
            .await
            .context("TLS through the proxy")?;
        let origin = http::HeaderValue::from_static(WHATSAPP_WEB_ORIGIN);
        let (ws, _) = ClientBuilder::from_uri(uri)
            .add_header(http::header::ORIGIN, origin)
            .context("the Origin header")?
            .connect_on(stream)
            .await
            .context("WebSocket upgrade through the proxy")?;
        Ok(from_websocket(ws))
    }
}

/// RFC 1928 `CONNECT` by domain name, with RFC 1929 user/password authentication if given.
async fn socks5(
    proxy: &str,
    auth: Option<&(String, String)>,
    host: &str,
    port: u16,
) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy)
        .await
        .context("reaching the proxy")?;
    let method = if auth.is_some() { 0x02 } else { 0x00 };
    s.write_all(&[0x05, 0x01, method]).await?;
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply).await?;
    if reply != [0x05, method] {
        bail!("the SOCKS5 proxy refused the authentication method ({reply:?})");
    }
    if let Some((user, pass)) = auth {
        let (user, pass) = (user.as_bytes(), pass.as_bytes());
        if user.len() > 255 || pass.len() > 255 {
            bail!("SOCKS5 user name and password are at most 255 bytes");
        }
        let mut req = vec![0x01, user.len() as u8];
        req.extend_from_slice(user);
        req.push(pass.len() as u8);
        req.extend_from_slice(pass);
        s.write_all(&req).await?;
        s.read_exact(&mut reply).await?;
        if reply[1] != 0x00 {
            bail!("the SOCKS5 proxy refused the user name and password");
        }
    }
    let name = host.as_bytes();
    if name.len() > 255 {
        bail!("host name too long for SOCKS5");
    }
    let mut req = vec![0x05, 0x01, 0x00, 0x03, name.len() as u8];
    req.extend_from_slice(name);
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    if head[1] != 0x00 {
        bail!(
            "the SOCKS5 proxy refused the connection (reply {})",
            head[1]
        );
    }
    // The bound address, which the client has no use for.
    let skip = match head[3] {
        0x01 => 4,
        0x04 => 16,
        0x03 => usize::from(s.read_u8().await?),
        other => bail!("the SOCKS5 proxy answered an unknown address type {other}"),
    };
    let mut bound = vec![0u8; skip + 2];
    s.read_exact(&mut bound).await?;
    Ok(s)
}

/// An HTTP `CONNECT` tunnel, with Basic authentication if given.
async fn http_connect(
    proxy: &str,
    auth: Option<&(String, String)>,
    host: &str,
    port: u16,
) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy)
        .await
        .context("reaching the proxy")?;
    let mut req = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n");
    if let Some((user, pass)) = auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    // The response head, read a byte at a time so that nothing after it is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            bail!("the HTTP proxy's response head is too long");
        }
        head.push(s.read_u8().await?);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.lines().next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if !code.starts_with('2') {
        bail!("the HTTP proxy refused the tunnel: {status}");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_parse_with_and_without_credentials() {
        assert_eq!(
            Proxy::parse("socks5://127.0.0.1:1080"),
            Ok(Proxy::Socks5 {
                addr: "127.0.0.1:1080".into(),
                auth: None
            })
        );
        assert_eq!(
            Proxy::parse("http://ann:s3cret@proxy.example:3128/"),
            Ok(Proxy::Http {
                addr: "proxy.example:3128".into(),
                auth: Some(("ann".into(), "s3cret".into()))
            })
        );
        for bad in [
            "proxy:1080",
            "ftp://h:1",
            "socks5://h",
            "socks5://:1080",
            "http://h:x",
        ] {
            assert!(Proxy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_setting_is_optional_and_must_be_a_string() {
        assert_eq!(proxy_of(&serde_json::json!({})), Ok(None));
        assert_eq!(proxy_of(&serde_json::json!({ "proxy": "" })), Ok(None));
        assert!(proxy_of(&serde_json::json!({ "proxy": 5 })).is_err());
        assert!(matches!(
            proxy_of(&serde_json::json!({ "proxy": "socks5://h:1" })),
            Ok(Some(Proxy::Socks5 { .. }))
        ));
    }
}
