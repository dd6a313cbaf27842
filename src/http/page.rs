//! Cursor pagination: `?limit=…&cursor=…` in, `{"items": […], "next_cursor": …}` out.
//!
//! A cursor is opaque to clients: the key of the last item of the page, base64url-encoded, so
//! that a page is a keyset query (`key > cursor`) however far into the list it is.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::problem::Problem;

/// Items per page unless asked.
pub const DEFAULT_LIMIT: usize = 100;
/// The most items a page holds.
pub const MAX_LIMIT: usize = 500;

/// The query of a list.
#[derive(Debug, Default, Deserialize)]
pub struct PageQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

/// A page asked for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageAsk {
    /// Items wanted.
    pub limit: usize,
    /// The key after which the page starts.
    pub after: Option<String>,
}

impl PageQuery {
    /// Checks `limit` (1 to [`MAX_LIMIT`]) and decodes `cursor`, naming the one at fault.
    pub fn ask(&self) -> Result<PageAsk, Problem> {
        let limit = match &self.limit {
            None => DEFAULT_LIMIT,
            Some(raw) => raw
                .parse::<usize>()
                .ok()
                .filter(|l| (1..=MAX_LIMIT).contains(l))
                .ok_or_else(|| {
                    Problem::invalid("limit", format!("an integer from 1 to {MAX_LIMIT}"))
                })?,
        };
        let after = self
            .cursor
            .as_deref()
            .map(|c| {
                URL_SAFE_NO_PAD
                    .decode(c)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| Problem::invalid("cursor", "not a cursor this API gave out"))
            })
            .transpose()?;
        Ok(PageAsk { limit, after })
    }
}

impl PageAsk {
    /// The cursor's key read by `parse`: a key this API never gives out is a 422 on `cursor`.
    pub fn after_as<T>(&self, parse: impl Fn(&str) -> Option<T>) -> Result<Option<T>, Problem> {
        self.after
            .as_deref()
            .map(|a| {
                parse(a).ok_or_else(|| Problem::invalid("cursor", "not a cursor this API gave out"))
            })
            .transpose()
    }
}

/// The query of a list that the super-admin may narrow to one tenant (a tenant's token lists
/// its own).
#[derive(Debug, Default, Deserialize)]
pub struct TenantPageQuery {
    /// The page.
    #[serde(flatten)]
    pub page: PageQuery,
    /// The tenant asked for.
    pub tenant: Option<String>,
}

/// One page of a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    /// The items, in the list's order.
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; absent on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page of `items` (fetched with one more than `ask.limit`, to know whether more follow),
    /// the cursor being the key of its last item.
    pub fn of(mut items: Vec<T>, ask: &PageAsk, key: impl Fn(&T) -> String) -> Self {
        let more = items.len() > ask.limit;
        items.truncate(ask.limit);
        let next_cursor = more
            .then(|| items.last().map(|i| URL_SAFE_NO_PAD.encode(key(i))))
            .flatten();
        Self { items, next_cursor }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_fetched_one_long_has_a_cursor_that_decodes_to_its_last_key() {
        let ask = PageQuery {
            limit: Some("2".into()),
            cursor: None,
        }
        .ask()
        .expect("valid");
        let page = Page::of(vec!["a", "b", "c"], &ask, |s| (*s).to_owned());
        assert_eq!(page.items, vec!["a", "b"]);
        let next = PageQuery {
            limit: None,
            cursor: page.next_cursor,
        }
        .ask()
        .expect("valid");
        assert_eq!(next.after.as_deref(), Some("b"));
        assert_eq!(next.limit, DEFAULT_LIMIT);
        let last = Page::of(vec!["c"], &next, |s| (*s).to_owned());
        assert!(last.next_cursor.is_none());
        for bad in ["0", "501", "x", "-1"] {
            let q = PageQuery {
                limit: Some(bad.into()),
                cursor: None,
            };
            assert!(q.ask().is_err(), "{bad}");
        }
        let q = PageQuery {
            limit: None,
            cursor: Some("%%%".into()),
        };
        assert!(q.ask().is_err());
    }
}
