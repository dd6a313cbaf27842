//! Operator commands to numbers across the cluster, on Redis Streams.
//!
//! Keys under the cluster's prefix:
//! - `commands:<node>`: a stream per node of commands for the numbers it runs, each with an
//!   `id`, the `number`, the `command` (`restart`, `logout`, `pair_code`, `send` with its
//!   `to`, `text` and `key`) and a `deadline_ms` (the caller's clock: past it the caller has given up, and the
//!   command is dropped);
//! - `reply:<id>`: the outcome of one command (`outcome` `ok` — with the `message_id` and
//!   `repeat` of a send —, `not_here`, `key_reused`, `invalid`, `unavailable` or `failed`, and a
//!   `message`), expiring a minute after it is written.
//!
//! A caller (a node, or `switchboard numbers restart|logout|send`) finds the owner in the number's
//! lease, checks that its announcement is live, adds the command to the owner's stream and
//! waits for the reply up to its timeout. A number that moved meanwhile is looked up again.
//! Each node reads its own stream on a client of its own (a blocking read holds the
//! connection), from the start when it starts (what its previous incarnation left is carried
//! out if still in time), carries each command out through its fleet and deletes it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use switchboard_actors::PhoneNumber;
use switchboard_actors::command::{BusinessSend, CommandError, Done, NumberCommand};
use switchboard_actors::store::unix_ms;
use switchboard_actors::transport::MessageId;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Keys;
use super::membership::node_of;

/// How long a reply is kept for a caller that has not read it yet.
const REPLY_KEPT: Duration = Duration::from_secs(60);
/// Commands kept per node stream (approximately): a node down for long drops the oldest.
const STREAM_CAP: i64 = 10_000;
/// How long a node's stream is kept after its last command.
const STREAM_KEPT: Duration = Duration::from_secs(24 * 3600);
/// How long one blocking read of the node's stream waits before looking at `stop` again.
const READ_BLOCK: Duration = Duration::from_secs(1);
/// Lookups of a number that moves while its command travels.
const ATTEMPTS: usize = 3;

/// Sends commands to the nodes that own the numbers.
#[derive(Clone)]
pub struct CommandBus {
    client: Client,
    keys: Keys,
}

impl CommandBus {
    /// A bus on `client` under `keys`. The client waits for replies with blocking reads, so a
    /// caller that sends many commands at once gives the bus a client of its own.
    pub fn new(client: Client, keys: Keys) -> Self {
        Self { client, keys }
    }

    /// Carries out `command` on the node that owns `number`, waiting at most `timeout` for
    /// its answer; returns that node's id and what it did.
    pub async fn send(
        &self,
        number: &PhoneNumber,
        command: &NumberCommand,
        timeout: Duration,
    ) -> Result<(String, Done), CommandError> {
        let mut last = CommandError::NoOwner(number.clone());
        for _ in 0..ATTEMPTS {
            let node = self.owner(number).await?;
            match self.send_to(&node, number, command, timeout).await {
                Ok(done) => return Ok((node, done)),
                // It moved while the command travelled: ask its new owner.
                Err(CommandError::NotHere(_)) => {
                    last = CommandError::NotHere(number.clone());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// The live node holding `number`'s lease.
    pub async fn owner(&self, number: &PhoneNumber) -> Result<String, CommandError> {
        let held: Option<String> = self
            .client
            .get(self.keys.lease(number))
            .await
            .map_err(unavailable)?;
        let Some(held) = held else {
            return Err(CommandError::NoOwner(number.clone()));
        };
        let node = node_of(&held).to_owned();
        let live: i64 = self
            .client
            .exists(self.keys.node(&node))
            .await
            .map_err(unavailable)?;
        if live == 0 {
            return Err(CommandError::OwnerGone {
                number: number.clone(),
                node,
            });
        }
        Ok(node)
    }

    async fn send_to(
        &self,
        node: &str,
        number: &PhoneNumber,
        command: &NumberCommand,
        timeout: Duration,
    ) -> Result<Done, CommandError> {
        let id = format!("{:032x}", rand::random::<u128>());
        let deadline = unix_ms() + u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut fields = vec![
            ("id", id.clone()),
            ("number", number.to_string()),
            ("command", command.as_str().to_owned()),
            ("deadline_ms", deadline.to_string()),
        ];
        if let NumberCommand::Send(send) = command {
            fields.push(("to", send.to.to_string()));
            fields.push(("text", send.text.clone()));
            fields.push(("key", send.key.clone()));
        }
        let _: String = self
            .client
            .xadd(
                self.keys.commands(node),
                false,
                ("MAXLEN", "~", STREAM_CAP),
                "*",
                fields,
            )
            .await
            .map_err(unavailable)?;
        // The stream of a node id that never comes back goes a day after its last command.
        let kept = i64::try_from(STREAM_KEPT.as_millis()).unwrap_or(i64::MAX);
        let _: i64 = self
            .client
            .pexpire(self.keys.commands(node), kept, None)
            .await
            .map_err(unavailable)?;
        let block = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let options = Options {
            timeout: Some(timeout + Duration::from_secs(2)),
            ..Options::default()
        };
        let reply: Value = self
            .client
            .with_options(&options)
            .xread(Some(1), Some(block), self.keys.reply(&id), "0")
            .await
            .map_err(unavailable)?;
        let Some(fields) = entries(reply).into_iter().next().map(|(_, f)| f) else {
            return Err(CommandError::Timeout {
                node: node.to_owned(),
                after: timeout,
            });
        };
        outcome_of(number, &fields)
    }
}

/// The command an entry carries; `None` for a malformed one.
fn command_of(fields: &HashMap<String, String>) -> Result<NumberCommand, CommandError> {
    let field = |name: &str| {
        fields
            .get(name)
            .ok_or_else(|| CommandError::Invalid(format!("{name}: missing")))
    };
    match field("command")?.as_str() {
        "restart" => Ok(NumberCommand::Restart),
        "logout" => Ok(NumberCommand::Logout),
        "pair_code" => Ok(NumberCommand::PairCode),
        "send" => {
            BusinessSend::new(field("to")?, field("text")?, field("key")?).map(NumberCommand::Send)
        }
        other => Err(CommandError::Invalid(format!(
            "command: {other:?} is not one this node knows"
        ))),
    }
}

/// A reply entry's fields for `outcome`.
fn reply_fields(outcome: &Result<Done, CommandError>) -> Vec<(&'static str, String)> {
    let (kind, message) = match outcome {
        Ok(_) => ("ok", String::new()),
        Err(CommandError::NotHere(_)) => ("not_here", String::new()),
        Err(CommandError::KeyReused) => ("key_reused", String::new()),
        Err(e @ CommandError::Invalid(_)) => ("invalid", e.to_string()),
        Err(e @ CommandError::Unavailable(_)) => ("unavailable", e.to_string()),
        Err(e) => ("failed", e.to_string()),
    };
    let mut fields = vec![("outcome", kind.to_owned()), ("message", message)];
    if let Ok(Done::Queued { id, repeat }) = outcome {
        fields.push(("message_id", id.to_string()));
        fields.push(("repeat", repeat.to_string()));
    }
    fields
}

/// What a reply entry says, for a command to `number`.
fn outcome_of(
    number: &PhoneNumber,
    fields: &HashMap<String, String>,
) -> Result<Done, CommandError> {
    let message = fields.get("message").cloned().unwrap_or_default();
    match fields.get("outcome").map(String::as_str) {
        Some("ok") => match fields.get("message_id").and_then(|i| MessageId::parse(i)) {
            Some(id) => Ok(Done::Queued {
                id,
                repeat: fields.get("repeat").is_some_and(|r| r == "true"),
            }),
            None => Ok(Done::Done),
        },
        Some("not_here") => Err(CommandError::NotHere(number.clone())),
        Some("key_reused") => Err(CommandError::KeyReused),
        Some("invalid") => Err(CommandError::Invalid(message)),
        Some("unavailable") => Err(CommandError::Unavailable(message)),
        _ => Err(CommandError::Failed(message)),
    }
}

/// Serves the commands addressed to node `node`: reads them on `reader` (a client of its own),
/// carries each out with `apply`, and answers on `writer`, until `stop`.
pub fn serve<F, Fut>(
    reader: Client,
    writer: Client,
    keys: Keys,
    node: String,
    apply: F,
    stop: CancellationToken,
) -> JoinHandle<()>
where
    F: Fn(PhoneNumber, NumberCommand) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Done, CommandError>> + Send + 'static,
{
    let apply = Arc::new(apply);
    tokio::spawn(async move {
        let stream = keys.commands(&node);
        let mut last = "0-0".to_owned();
        let options = Options {
            timeout: Some(READ_BLOCK + Duration::from_secs(2)),
            ..Options::default()
        };
        let block = u64::try_from(READ_BLOCK.as_millis()).unwrap_or(1000);
        let reader = reader.with_options(&options);
        loop {
            let read = tokio::select! {
                () = stop.cancelled() => return,
                read = reader
                    .xread::<Value, _, _>(Some(64), Some(block), stream.clone(), last.clone()) => read,
            };
            let entries = match read {
                Ok(r) => entries(r),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read commands; trying again");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            };
            for (entry, fields) in entries {
                last.clone_from(&entry);
                let (writer, keys, stream, apply) =
                    (writer.clone(), keys.clone(), stream.clone(), apply.clone());
                tokio::spawn(async move {
                    if let Some((id, outcome)) = carry_out(&fields, &*apply).await {
                        answer(&writer, &keys, &id, outcome).await;
                    }
                    let _: Result<i64, _> = writer.xdel(stream, entry).await;
                });
            }
        }
    })
}

/// Carries out one command entry; `None` for one malformed or past its deadline (no reply:
/// its caller has given up or never was one).
async fn carry_out<F, Fut>(
    fields: &HashMap<String, String>,
    apply: &F,
) -> Option<(String, Result<Done, CommandError>)>
where
    F: Fn(PhoneNumber, NumberCommand) -> Fut,
    Fut: Future<Output = Result<Done, CommandError>>,
{
    let id = fields.get("id")?.clone();
    let deadline: u64 = fields.get("deadline_ms")?.parse().ok()?;
    if unix_ms() > deadline {
        tracing::info!(%id, "command arrived after its caller gave up; dropped");
        return None;
    }
    let number = fields
        .get("number")
        .and_then(|n| PhoneNumber::parse(n).ok())
        .ok_or_else(|| CommandError::Invalid("number: missing or not E.164".to_owned()));
    let outcome = match (number, command_of(fields)) {
        (Ok(number), Ok(command)) => apply(number, command).await,
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    Some((id, outcome))
}

async fn answer(writer: &Client, keys: &Keys, id: &str, outcome: Result<Done, CommandError>) {
    let key = keys.reply(id);
    let fields = reply_fields(&outcome);
    let written: Result<String, _> = writer.xadd(&key, false, None::<()>, "*", fields).await;
    let kept = i64::try_from(REPLY_KEPT.as_millis()).unwrap_or(i64::MAX);
    let expired: Result<i64, _> = writer.pexpire(&key, kept, None).await;
    if let Err(e) = written.and(expired.map(|_| String::new())) {
        tracing::warn!(%id, error = %e, "cannot answer a command");
    }
}

/// The entries of an `XREAD` answer over one stream, in order: `(id, fields)`. Nil (nothing
/// arrived) is none; RESP2 arrays and RESP3 maps are both read.
fn entries(reply: Value) -> Vec<(String, HashMap<String, String>)> {
    let streams: Vec<Value> = match reply {
        Value::Map(map) => map.inner().into_values().collect(),
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| s.into_array().into_iter().nth(1))
            .collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for entry in streams.into_iter().flat_map(Value::into_array) {
        let mut parts = entry.into_array().into_iter();
        let (Some(id), Some(fields)) = (parts.next().and_then(Value::into_string), parts.next())
        else {
            continue;
        };
        let mut map = HashMap::new();
        let mut flat = fields.into_array().into_iter();
        while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
            if let (Some(k), Some(v)) = (k.into_string(), v.into_string()) {
                map.insert(k, v);
            }
        }
        out.push((id, map));
    }
    out
}

fn unavailable(e: Error) -> CommandError {
    CommandError::Unavailable(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(fields: &[(&str, String)]) -> HashMap<String, String> {
        fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn commands_and_outcomes_survive_the_wire_and_bad_entries_say_which_field() {
        let send =
            BusinessSend::new("15550002@s.whatsapp.net", "hello\nthere", "k-1").expect("valid");
        let entry = map(&[
            ("command", "send".to_owned()),
            ("to", send.to.to_string()),
            ("text", send.text.clone()),
            ("key", send.key.clone()),
        ]);
        assert_eq!(command_of(&entry), Ok(NumberCommand::Send(send)));
        let restart = map(&[("command", "restart".to_owned())]);
        assert_eq!(command_of(&restart), Ok(NumberCommand::Restart));
        let missing = map(&[("command", "send".to_owned()), ("to", "1@lid".to_owned())]);
        assert!(
            matches!(command_of(&missing), Err(CommandError::Invalid(m)) if m.starts_with("text"))
        );
        let unknown = map(&[("command", "reboot".to_owned())]);
        assert!(
            matches!(command_of(&unknown), Err(CommandError::Invalid(m)) if m.starts_with("command"))
        );

        let number = PhoneNumber::parse("+15550001").expect("valid");
        let id = MessageId::for_key(&number, "k-1");
        for outcome in [
            Ok(Done::Done),
            Ok(Done::Queued {
                id: id.clone(),
                repeat: false,
            }),
            Ok(Done::Queued { id, repeat: true }),
            Err(CommandError::NotHere(number.clone())),
            Err(CommandError::KeyReused),
        ] {
            let back = outcome_of(&number, &map(&reply_fields(&outcome)));
            assert_eq!(back, outcome);
        }
        let invalid = Err(CommandError::Invalid("to: bad".to_owned()));
        assert_eq!(outcome_of(&number, &map(&reply_fields(&invalid))), invalid);
    }
}
