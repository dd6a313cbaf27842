//! The small keyword/echo bot the demo runs, a stand-in model for its AI replies, and the chaos
//! wrapper that makes conversations panic now and then.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use switchboard_actors::responder::{AiBackend, AiError, ChatContext, Reply, Responder};
use switchboard_actors::transport::InboundMessage;

/// Answers a few keywords, hands `ai …` to the model, and echoes the rest.
#[derive(Debug, Default)]
pub struct KeywordBot;

impl Responder for KeywordBot {
    fn respond(&self, ctx: &ChatContext, msg: &InboundMessage) -> Reply {
        let text = msg.text.trim();
        let lower = text.to_lowercase();
        if let Some(question) = lower.strip_prefix("ai ") {
            return Reply::Ai {
                prompt: question.to_owned(),
                fallback: "Sorry, our assistant is busy. A person will get back to you.".to_owned(),
            };
        }
        let answer = if lower.starts_with("hi") || lower.starts_with("hello") {
            "Hello! Reply MENU to see what I can do.".to_owned()
        } else if lower.contains("menu") {
            "1) PRICE  2) HOURS  3) start with AI to ask our assistant".to_owned()
        } else if lower.contains("price") {
            "The basic plan is 9 EUR a month.".to_owned()
        } else if lower.contains("hours") {
            "We are open 9:00 to 18:00, Monday to Friday.".to_owned()
        } else if ctx.turns == 1 {
            format!("Welcome! You said: {text}")
        } else {
            format!("You said: {text}")
        };
        Reply::Text(answer)
    }
}

/// A deterministic stand-in model: answers after a short, length-dependent delay.
#[derive(Debug, Default)]
pub struct CannedModel;

#[async_trait]
impl AiBackend for CannedModel {
    async fn complete(&self, prompt: &str) -> Result<String, AiError> {
        let words = prompt.split_whitespace().count() as u64;
        tokio::time::sleep(Duration::from_millis(50 + 20 * words)).await;
        Ok(format!(
            "Here is what I found about \"{prompt}\": please see our help centre."
        ))
    }
}

/// Wraps a responder and panics on every `every`-th message it sees (0: never): a crash inside
/// a conversation actor that its redelivery then processes.
pub struct ChaosResponder<R> {
    inner: R,
    every: u64,
    seen: AtomicU64,
}

impl<R> ChaosResponder<R> {
    /// Panics on one message in `every`.
    pub fn new(inner: R, every: u64) -> Self {
        Self {
            inner,
            every,
            seen: AtomicU64::new(0),
        }
    }
}

impl<R: Responder> Responder for ChaosResponder<R> {
    fn respond(&self, ctx: &ChatContext, msg: &InboundMessage) -> Reply {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        if self.every > 0 && n.is_multiple_of(self.every) {
            panic!("chaos: injected panic in a conversation");
        }
        self.inner.respond(ctx, msg)
    }
}
