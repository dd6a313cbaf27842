//! Message texts as the databases keep them: faithfully, whatever they hold.
//!
//! PostgreSQL `text` cannot hold NUL (U+0000), and its JSON refuses `\u0000` when converting to
//! text, so one NUL in a message would fail a whole batch. Texts are therefore stored encoded,
//! reversibly, on both stores: a text with no NUL and no [`MARK`] is stored as it is (every
//! real message, in practice, at the cost of one scan); any other is stored as [`MARK`]
//! followed by the text with each NUL written `MARK 0` and each `MARK` written `MARK MARK`. A
//! stored text that starts with `MARK` is therefore always an encoded one.

use std::borrow::Cow;

/// U+FFFF, a noncharacter: never meant to appear in text that people exchange.
pub const MARK: char = '\u{FFFF}';

/// The form of `text` the databases store.
pub fn encode(text: &str) -> Cow<'_, str> {
    if !text.contains(['\0', MARK]) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    out.push(MARK);
    for c in text.chars() {
        match c {
            '\0' => {
                out.push(MARK);
                out.push('0');
            }
            MARK => {
                out.push(MARK);
                out.push(MARK);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The text that `stored` encodes.
pub fn decode(stored: String) -> String {
    let Some(rest) = stored.strip_prefix(MARK) else {
        return stored;
    };
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        if c != MARK {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('0') => out.push('\0'),
            // `MARK MARK`, or a lone `MARK` at the end (never written): the mark itself.
            _ => out.push(MARK),
        }
    }
    out
}

/// The stored form of the first [`PREVIEW_CHARS`](super::PREVIEW_CHARS) characters of `text`.
pub fn preview(text: &str) -> String {
    encode(&super::preview(text)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_texts_are_stored_as_they_are() {
        assert!(matches!(encode("hello, wörld 👋"), Cow::Borrowed(_)));
        assert_eq!(decode("hello".to_owned()), "hello");
    }

    #[test]
    fn nul_and_the_mark_are_escaped_and_nothing_else() {
        let stored = encode("x\0y\u{FFFF}z");
        assert_eq!(stored, "\u{FFFF}x\u{FFFF}0y\u{FFFF}\u{FFFF}z");
        assert!(!stored.contains('\0'));
        assert_eq!(decode(stored.into_owned()), "x\0y\u{FFFF}z");
    }

    proptest! {
        #[test]
        fn every_text_round_trips_and_is_stored_without_nul(text in any::<String>()) {
            let stored = encode(&text);
            prop_assert!(!stored.contains('\0'));
            prop_assert_eq!(decode(stored.into_owned()), text);
        }
    }
}
