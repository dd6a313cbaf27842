//! A TCP proxy to a database that the test can switch off and on, to stand for the database
//! being stopped: while off, connections are refused and those open are cut, as when the
//! server process is down. Include with `#[path = "support/proxy.rs"] mod proxy;`.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The proxy on `127.0.0.1:port`, forwarding to `upstream`.
pub struct Proxy {
    pub port: u16,
    upstream: String,
    running: Mutex<Option<JoinHandle<()>>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// A running proxy on a free port.
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Self {
            port,
            upstream: upstream.to_owned(),
            running: Mutex::new(None),
            conns: Arc::default(),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream.clone();
        let conns = self.conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                conns.lock().unwrap().push(conn);
            }
        });
        *self.running.lock().unwrap() = Some(task);
    }

    /// The database "stops": new connections are refused, open ones are cut.
    pub fn stop(&self) {
        if let Some(task) = self.running.lock().unwrap().take() {
            task.abort();
        }
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    /// The database is back on the same port.
    pub async fn resume(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.serve(listener);
    }
}
