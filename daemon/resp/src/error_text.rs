//! What of an error reply may be shown: Redis echoes its callers' bytes in error texts (an
//! unknown command's arguments, `CONFIG SET` values, a script's `error_reply` text, ACL rules),
//! so a text is kept only when it is one of Redis' own fixed messages, and then only as the
//! message's literal pieces, each argument Redis filled in shown as `…`.
use std::{collections::HashMap, fmt, sync::OnceLock};

use crate::error_templates::{PREFIXES, TEMPLATES};

/// One of Redis' fixed error messages (an index into the vendored table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ErrorTemplate(u16);

impl ErrorTemplate {
    /// The fixed message an error text (without its leading `-`) is, if any.
    pub fn of(text: &[u8]) -> Option<Self> {
        let index = Index::get();
        index
            .by_head
            .get(head(text))
            .into_iter()
            .flatten()
            .chain(&index.open_head)
            .copied()
            .find(|&id| matches(TEMPLATES[usize::from(id)], text))
            .map(ErrorTemplate)
    }
}

impl fmt::Display for ErrorTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pieces = TEMPLATES[usize::from(self.0)];
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 {
                f.write_str("…")?;
            }
            f.write_str(piece)?;
        }
        Ok(())
    }
}

/// Whether Redis itself replies with this errorstats prefix; a script's `error_reply` can make
/// up any, including one that is a secret.
pub fn is_redis_prefix(prefix: &str) -> bool {
    redis_prefix(prefix).is_some()
}

/// The prefix as Redis' own table spells it, when Redis uses it.
pub fn redis_prefix(prefix: &str) -> Option<&'static str> {
    PREFIXES
        .binary_search(&prefix)
        .ok()
        .map(|index| PREFIXES[index])
}

/// Templates grouped by their first two words, so that a text is compared with a handful of
/// them rather than all.
struct Index {
    by_head: HashMap<&'static [u8], Vec<u16>>,
    /// Templates with an argument within their first two words: compared with every text.
    open_head: Vec<u16>,
}

impl Index {
    fn get() -> &'static Index {
        static INDEX: OnceLock<Index> = OnceLock::new();
        INDEX.get_or_init(|| {
            let mut index = Index {
                by_head: HashMap::new(),
                open_head: Vec::new(),
            };
            for (id, pieces) in TEMPLATES.iter().enumerate() {
                let id = u16::try_from(id).expect("fewer than 65536 templates");
                let first = pieces[0].as_bytes();
                let head_is_literal = pieces.len() == 1 || head(first).len() < first.len();
                if head_is_literal {
                    index.by_head.entry(head(first)).or_default().push(id);
                } else {
                    index.open_head.push(id);
                }
            }
            index
        })
    }
}

/// A text up to its second space: the prefix and the first word of the message.
fn head(text: &[u8]) -> &[u8] {
    let mut spaces = text.iter().enumerate().filter(|(_, b)| **b == b' ');
    match spaces.nth(1) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// Whether `text` is the literal `pieces` with any text between each two of them.
fn matches(pieces: &[&str], text: &[u8]) -> bool {
    let Some((first, rest)) = pieces.split_first() else {
        return false;
    };
    let Some(mut rest_of_text) = text.strip_prefix(first.as_bytes()) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return rest_of_text.is_empty();
    };
    for piece in middle {
        let piece = piece.as_bytes();
        match rest_of_text
            .windows(piece.len().max(1))
            .position(|w| w.starts_with(piece))
        {
            Some(at) => rest_of_text = &rest_of_text[at + piece.len()..],
            None if piece.is_empty() => {}
            None => return false,
        }
    }
    rest_of_text.ends_with(last.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(text: &str) -> Option<String> {
        ErrorTemplate::of(text.as_bytes()).map(|t| t.to_string())
    }

    #[test]
    fn fixed_messages_are_kept_whole() {
        for text in [
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "ERR syntax error",
            "ERR value is not an integer or out of range",
            "NOAUTH Authentication required.",
            "EXECABORT Transaction discarded because of previous errors.",
        ] {
            assert_eq!(shown(text).as_deref(), Some(text));
        }
    }

    #[test]
    fn echoed_arguments_are_replaced() {
        assert_eq!(
            shown("ERR unknown command 'CONFIG', with args beginning with: 'SET' 'requirepass' 'hunter2' ")
                .as_deref(),
            Some("ERR unknown command '…', with args beginning with: …")
        );
        assert_eq!(
            shown("ERR wrong number of arguments for 'get' command").as_deref(),
            Some("ERR wrong number of arguments for '…' command")
        );
        assert_eq!(
            shown("ERR Error in ACL SETUSER modifier '>hunter2x': Syntax error").as_deref(),
            Some("ERR Error in ACL SETUSER modifier '…': …")
        );
        assert_eq!(
            shown("MOVED 3999 127.0.0.1:6381").as_deref(),
            None,
            "a redirection's text is built from a variable prefix: the prefix only"
        );
    }

    #[test]
    fn anything_else_keeps_no_text() {
        for text in [
            "ERR hunter2",
            "ERR syntax error hunter2",
            "hunter2 the rest",
            "",
            "ERR",
            "ERR unknown command",
        ] {
            assert_eq!(shown(text), None, "{text}");
        }
    }

    #[test]
    fn redis_prefixes_are_known_and_made_up_ones_are_not() {
        for prefix in [
            "ERR",
            "WRONGTYPE",
            "NOSCRIPT",
            "MOVED",
            "ASK",
            "BUSYGROUP",
            "NOPERM",
        ] {
            assert!(is_redis_prefix(prefix), "{prefix}");
        }
        for prefix in ["HUNTER2", "err", "", "MY_ERR_CODE"] {
            assert!(!is_redis_prefix(prefix), "{prefix}");
        }
    }

    #[test]
    fn every_template_matches_its_own_text_with_arguments_filled_in() {
        for (id, pieces) in TEMPLATES.iter().enumerate() {
            let filled = pieces.join("ARG x'y");
            let found = ErrorTemplate::of(filled.as_bytes()).expect("matches");
            // Another template may match first (one with more arguments); what it shows is
            // still only literal text of Redis' own.
            assert!(
                !found.to_string().contains("ARG"),
                "{id}: {filled} shown as {found}"
            );
        }
    }
}
