//! The client side of `sim serve`'s wire: one WebSocket per connection, JSON text frames.

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::client::{Link, LinkRx, LinkTx};
use super::wire::{ClientFrame, ServerFrame};

/// Frames queued each way between the socket and the session.
const FRAMES_QUEUED: usize = 65_536;

/// Connects to `ws://{addr}/wire` and says hello. A connection that fails to open, or that the
/// network closes before any frame, is a silent connect failure to the session.
pub(crate) async fn dial(addr: &str, hello: ClientFrame) -> Link {
    let (client_tx, mut client_rx) = mpsc::channel::<ClientFrame>(FRAMES_QUEUED);
    let (server_tx, server_rx) = mpsc::channel::<ServerFrame>(FRAMES_QUEUED);
    let url = format!("ws://{addr}/wire");
    let task = tokio::spawn(async move {
        let Ok((ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
            return;
        };
        let (mut sink, mut stream) = ws.split();
        let Ok(hello) = serde_json::to_string(&hello) else {
            return;
        };
        if sink.send(Message::text(hello)).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                out = client_rx.recv() => match out.and_then(|f| serde_json::to_string(&f).ok()) {
                    Some(text) => {
                        if sink.send(Message::text(text)).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                incoming = stream.next() => match incoming {
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerFrame>(&text) {
                        Ok(frame) => {
                            // Waiting here holds the socket: the server sees a slow reader.
                            if server_tx.send(frame).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "unreadable frame from the simulator"),
                    },
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
                () = server_tx.closed() => break,
            }
        }
        // Close politely and wait for the network to confirm, so a successor connection
        // never finds this one still open.
        let _ = sink.send(Message::Close(None)).await;
        while let Some(Ok(_)) = stream.next().await {}
    });
    Link {
        tx: LinkTx::Remote(client_tx),
        rx: LinkRx::Remote(server_rx, task),
    }
}
