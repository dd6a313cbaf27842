//! Who writes to an account: contacts in DMs (addressed by phone, or by LID for a share of
//! them) and in groups (senders by LID), a person on the account's own phone, and scripted
//! load.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use switchboard_actors::ids::{Jid, PhoneNumber};
use switchboard_actors::transport::{InboundMessage, MessageId};
use tokio::time::Instant;

use super::{Network, SimError, State, fnv};

/// Scripted inbound load.
#[derive(Debug, Clone)]
pub struct TrafficSpec {
    /// Target accounts; `None` for all accounts.
    pub numbers: Option<Vec<PhoneNumber>>,
    /// Distinct contacts writing to each account.
    pub contacts_per_number: u32,
    /// Messages per second over all accounts.
    pub rate_per_s: f64,
    /// How long it runs.
    pub duration: Duration,
    /// Seed of the texts and the choice of sender.
    pub seed: u64,
}

impl Network {
    /// A contact sends a message to `number`: in a DM, or in `group` if given. Returns its id.
    pub fn inbound(
        &self,
        number: &PhoneNumber,
        from: &PhoneNumber,
        text: &str,
        group: Option<&str>,
        id: Option<&str>,
    ) -> Result<MessageId, SimError> {
        let mut st = self.lock();
        if !st.accounts.contains_key(number) {
            return Err(SimError::UnknownAccount(number.clone()));
        }
        let (chat, sender, sender_alt) = match group {
            Some(g) => {
                let group = Jid::group(g).map_err(|e| SimError::Invalid {
                    field: "group",
                    problem: e.to_string(),
                })?;
                (group, lid_of(from), Some(from.jid()))
            }
            None => {
                let (chat, alt) = self.dm_addresses(from);
                (chat.clone(), chat, Some(alt))
            }
        };
        let id = match id {
            Some(raw) => MessageId::parse(raw).ok_or_else(|| SimError::Invalid {
                field: "id",
                problem: "1 to 128 printable characters without spaces".to_owned(),
            })?,
            None => new_id(&mut st, "3A"),
        };
        let at_ms = self.now_ms();
        if !st
            .ledger
            .inbound_offered(at_ms, number, &chat, &sender, &id)
        {
            return Err(SimError::DuplicateId(id.to_string()));
        }
        let message = InboundMessage {
            id: id.clone(),
            chat,
            sender,
            sender_alt,
            is_from_me: false,
            text: text.to_owned(),
            media: None,
            timestamp_ms: self.server_time_ms(),
            offline: false,
        };
        self.offer(&mut st, number, message);
        Ok(id)
    }

    /// A person writes to contact `to` from the account's own phone; the linked device sees it
    /// as an `is_from_me` message in that chat. Returns its id.
    pub fn phone_send(
        &self,
        number: &PhoneNumber,
        to: &PhoneNumber,
        text: &str,
    ) -> Result<MessageId, SimError> {
        let mut st = self.lock();
        if !st.accounts.contains_key(number) {
            return Err(SimError::UnknownAccount(number.clone()));
        }
        let (chat, _) = self.dm_addresses(to);
        let id = new_id(&mut st, "3EB1");
        let at_ms = self.now_ms();
        st.ledger.phone_sent(at_ms, number, &chat, &id, text);
        let message = InboundMessage {
            id: id.clone(),
            chat,
            sender: number.jid(),
            sender_alt: Some(lid_of(number)),
            is_from_me: true,
            text: text.to_owned(),
            media: None,
            timestamp_ms: self.server_time_ms(),
            offline: false,
        };
        self.offer(&mut st, number, message);
        Ok(id)
    }

    /// Puts `message` in the account's inbox and delivers it if the client is online.
    fn offer(&self, st: &mut State, number: &PhoneNumber, message: InboundMessage) {
        let now = Instant::now();
        let Some(acct) = st.accounts.get_mut(number) else {
            return;
        };
        let undecryptable = !message.is_from_me && acct.faults.undecryptable(now);
        if let Some(seq) = acct.inbox.push(message, undecryptable) {
            self.deliver_live(st, number, seq);
        }
    }

    /// A contact's DM chat as WhatsApp addresses it (by phone, or by LID for `lid_share` of
    /// contacts), and the other address.
    fn dm_addresses(&self, contact: &PhoneNumber) -> (Jid, Jid) {
        let lid = lid_of(contact);
        let share = (fnv(contact.digits().as_bytes()) % 1000) as f64 / 1000.0;
        let by_lid = share < self.inner.config.lid_share;
        if by_lid {
            (lid, contact.jid())
        } else {
            (contact.jid(), lid)
        }
    }

    /// Starts scripted traffic and returns its run number at once. The run ends after its
    /// duration or at [`Network::stop_traffic`].
    pub fn start_traffic(&self, spec: TrafficSpec) -> Result<u64, SimError> {
        if !(spec.rate_per_s.is_finite() && spec.rate_per_s > 0.0) {
            return Err(SimError::Invalid {
                field: "rate_per_s",
                problem: "must be a positive number".to_owned(),
            });
        }
        if spec.contacts_per_number == 0 {
            return Err(SimError::Invalid {
                field: "contacts_per_number",
                problem: "must be at least 1".to_owned(),
            });
        }
        let numbers = match spec.numbers.clone() {
            Some(list) => {
                let st = self.lock();
                if let Some(missing) = list.iter().find(|n| !st.accounts.contains_key(*n)) {
                    return Err(SimError::UnknownAccount(missing.clone()));
                }
                list
            }
            None => {
                let mut all: Vec<_> = self.lock().accounts.keys().cloned().collect();
                all.sort();
                all
            }
        };
        let network = self.clone();
        tokio::spawn(async move { network.run_traffic(spec, numbers).await });
        Ok(self
            .inner
            .runs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1)
    }

    /// Ends every traffic run.
    pub fn stop_traffic(&self) {
        self.inner.traffic_stop.cancel();
    }

    async fn run_traffic(self, spec: TrafficSpec, numbers: Vec<PhoneNumber>) {
        const TICK: Duration = Duration::from_millis(10);
        if numbers.is_empty() {
            return;
        }
        let mut rng = SmallRng::seed_from_u64(spec.seed);
        let end = Instant::now() + spec.duration;
        let mut budget = 0.0;
        let mut tick = tokio::time::interval(TICK);
        let stop = self.inner.traffic_stop.clone();
        while Instant::now() < end {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            budget += spec.rate_per_s * TICK.as_secs_f64();
            while budget >= 1.0 {
                budget -= 1.0;
                let number = &numbers[rng.random_range(0..numbers.len())];
                let contact = contact_of(number, rng.random_range(0..spec.contacts_per_number));
                let text = PHRASES[rng.random_range(0..PHRASES.len())];
                let _ = self.inbound(number, &contact, text, None, None);
            }
        }
    }
}

/// A fresh message id with `prefix`, shaped like the ids of WhatsApp's apps.
fn new_id(st: &mut State, prefix: &str) -> MessageId {
    let n = st.next_id;
    st.next_id += 1;
    let salt: u32 = st.rng.random();
    let text = format!("{prefix}{salt:08X}{n:010X}");
    MessageId::parse(&text).expect("a prefix and hex digits make a valid id")
}

/// A contact's LID: a stable opaque id derived from its phone number.
fn lid_of(phone: &PhoneNumber) -> Jid {
    let h = fnv(phone.as_str().as_bytes()) % 100_000_000_000_000;
    Jid::lid(&format!("{h:014}")).unwrap_or_else(|_| phone.jid())
}

/// The `index`-th scripted contact of `number`: a stable, valid E.164 number.
pub fn contact_of(number: &PhoneNumber, index: u32) -> PhoneNumber {
    let mut bytes = number.as_str().as_bytes().to_vec();
    bytes.extend_from_slice(&index.to_le_bytes());
    let n = fnv(&bytes) % 1_000_000_000;
    PhoneNumber::parse(&format!("+49{n:09}")).unwrap_or_else(|_| number.clone())
}

/// What scripted contacts write.
const PHRASES: &[&str] = &[
    "hi",
    "hello there",
    "menu",
    "what are your opening hours?",
    "price of the basic plan?",
    "ai can you summarise your refund policy?",
    "I'd like to talk to someone",
    "thanks!",
    "is my order shipped?",
    "ok",
];
