//! Shared rendering: times, latencies, who-did-it, colour, tables, JSON rows.
use std::{borrow::Cow, io::IsTerminal};

use respwatch_proto::{unix_ns, v1};
use serde_json::{Value, json};

/// Writes to stdout; a closed pipe (`| head`) is not an error.
pub fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(error.into()),
        _ => Ok(()),
    }
}

/// Colour only on a terminal, and never with NO_COLOR set.
pub fn colour_enabled() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

pub fn paint(on: bool, code: &str, text: &str) -> String {
    if on {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// `HH:MM:SS.mmm` UTC.
pub fn clock(time: Option<&respwatch_proto::Timestamp>) -> String {
    let ns = time.map(unix_ns).unwrap_or_default();
    let secs = ns / 1_000_000_000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}", (ns / 1_000_000) % 1000)
}

/// RFC 3339 UTC with nanoseconds.
pub fn rfc3339(time: Option<&respwatch_proto::Timestamp>) -> String {
    let ns = time.map(unix_ns).unwrap_or_default();
    let secs = (ns / 1_000_000_000) as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rest / 3600,
        (rest / 60) % 60,
        rest % 60,
        ns % 1_000_000_000
    )
}

/// `850ns`, `97µs`, `12.3ms`, `1.20s`.
pub fn latency_ns(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..10_000 => format!("{:.1}µs", ns as f64 / 1e3),
        10_000..1_000_000 => format!("{}µs", ns / 1_000),
        1_000_000..100_000_000 => format!("{:.1}ms", ns as f64 / 1e6),
        100_000_000..1_000_000_000 => format!("{}ms", ns / 1_000_000),
        _ => format!("{:.2}s", ns as f64 / 1e9),
    }
}

pub fn latency_usec(usec: f64) -> String {
    latency_ns((usec * 1000.0).round() as u64)
}

/// Text from the wire or from other pods (keys, error texts, command and process names) as it
/// may be printed on a terminal: control characters (escape sequences could rewrite the
/// operator's screen) and bidirectional overrides (which reorder what is shown) become visible
/// escapes, `\x1b` or `\u{202e}`. Everything else is left as it is.
pub fn visible(text: &str) -> Cow<'_, str> {
    let hidden = |c: char| c.is_control() || is_bidi_control(c);
    if !text.chars().any(hidden) {
        return Cow::Borrowed(text);
    }
    use std::fmt::Write;
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        // Writing to a String cannot fail.
        let _ = if !hidden(c) {
            out.write_char(c)
        } else if c.is_ascii() {
            write!(out, "\\x{:02x}", c as u32)
        } else {
            write!(out, "\\u{{{:x}}}", c as u32)
        };
    }
    Cow::Owned(out)
}

/// Unicode's bidirectional marks, embeddings, overrides and isolates.
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

/// `ns/pod` when the pod is known, else `comm[pid]` (or `comm` when grouped without pids).
pub fn who(namespace: &str, pod: &str, comm: &str, pid: u32) -> String {
    let (namespace, pod, comm) = (visible(namespace), visible(pod), visible(comm));
    if !pod.is_empty() {
        format!("{namespace}/{pod}")
    } else if pid != 0 {
        format!("{comm}[{pid}]")
    } else if !comm.is_empty() {
        comm.into_owned()
    } else {
        "*".to_owned()
    }
}

pub fn role(value: i32) -> &'static str {
    v1::Role::try_from(value)
        .unwrap_or(v1::Role::Unspecified)
        .short_name()
}

/// Left-aligned columns, the last one not padded; numeric columns right-aligned.
pub fn table(header: &[&str], rows: &[Vec<String>], numeric: &[bool]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if numeric.get(i).copied().unwrap_or(false) {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                if i != last {
                    out.push_str(&" ".repeat(pad));
                }
            }
            if i != last {
                out.push_str("  ");
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// A stats row with Redis' INFO commandstats names (numbers as numbers, every field present).
pub fn row_json(row: &v1::StatsRow) -> Value {
    json!({
        "command": row.command,
        "calls": row.calls,
        "usec": row.usec,
        "usec_per_call": row.usec_per_call,
        "rejected_calls": row.rejected_calls,
        "failed_calls": row.failed_calls,
        "namespace": row.namespace,
        "pod": row.pod,
        "container": row.container,
        "workload": row.workload,
        "workload_kind": row.workload_kind,
        "pid": row.pid,
        "comm": row.comm,
        "role": role(row.role),
        "peer": row.peer,
        "peer_pod": row.peer_pod,
        "peer_service": row.peer_service,
        "p50_usec": row.p50_usec,
        "p99_usec": row.p99_usec,
        "max_usec": row.max_usec,
        "bytes_in": row.bytes_in,
        "bytes_out": row.bytes_out,
        "errors": row.errors.iter().collect::<std::collections::BTreeMap<_, _>>(),
    })
}

pub fn error_total(row: &v1::StatsRow) -> u64 {
    row.errors.values().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let t = respwatch_proto::timestamp(1_700_000_000_123_456_789);
        assert_eq!(rfc3339(Some(&t)), "2023-11-14T22:13:20.123456789Z");
        assert_eq!(clock(Some(&t)), "22:13:20.123");
        assert_eq!(latency_ns(97_318), "97µs");
        assert_eq!(latency_ns(5_400_000), "5.4ms");
        assert_eq!(who("", "", "redis-server", 7), "redis-server[7]");
        assert_eq!(who("shop", "web-1", "node", 7), "shop/web-1");
        let t = table(
            &["A", "N"],
            &[vec!["xx".into(), "5".into()]],
            &[false, true],
        );
        assert_eq!(t, "A   N\nxx  5\n");
    }

    #[test]
    fn wire_text_cannot_reach_the_terminal_raw() {
        assert!(matches!(visible("user:42 café"), Cow::Borrowed(_)));
        assert_eq!(visible("\x1b]0;pwned\x07k"), "\\x1b]0;pwned\\x07k");
        assert_eq!(visible("a\r\nb\tc\x7f"), "a\\x0d\\x0ab\\x09c\\x7f");
        assert_eq!(visible("\u{9b}2J"), "\\u{9b}2J");
        assert_eq!(visible("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(who("", "", "evil\x1b[2J", 7), "evil\\x1b[2J[7]");
    }
}
