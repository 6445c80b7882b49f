//! The common messages, decoded in one pass when a chunk holds all of them: commands (arrays of
//! bulk strings) and the replies most commands get (`+`, `-`, `:`, `$`). The state machine
//! handles everything else, and anything here that is not exactly well formed: these functions
//! only ever say "not this shape", never "malformed", so that errors, limits and partial
//! messages stay the state machine's alone. On what they accept, their frames are the ones the
//! state machine would build (the property tests feed every input whole and split to check).

use super::{
    Frame, Item, Kind, MAX_AGGREGATE_LEN, MAX_BULK_LEN, MAX_ELEMENT_TEXT, MAX_HEADER_LEN,
    MAX_ITEMS, MAX_KEPT_ELEMENTS, MAX_TEXT, Text, parse_i64, recycle_items, spare_items,
};

/// A complete top-level message at the start of `input`, and its length on the wire.
pub(super) fn whole_message(input: &[u8]) -> Option<(Frame, usize)> {
    match *input.first()? {
        b'*' => command(input),
        b'+' => line(input, Kind::SimpleString),
        b'-' => line(input, Kind::Error),
        b':' => {
            let (n, end) = header(input)?;
            Some((frame(Kind::Integer, 0, None, Some(n), Vec::new()), end))
        }
        b'$' => {
            let (len, body) = header(input)?;
            let (_, end) = bulk_body(input, len, body)?;
            Some((
                frame(Kind::BulkString, len as u64, None, None, Vec::new()),
                end,
            ))
        }
        _ => None,
    }
}

/// `*<n>\r\n` followed by `n` non-null bulk strings.
fn command(input: &[u8]) -> Option<(Frame, usize)> {
    let (count, at) = header(input)?;
    if count < 1 || count as u64 > MAX_AGGREGATE_LEN {
        return None;
    }
    let mut items = spare_items();
    let parsed = elements(input, count as usize, at, &mut items);
    match parsed {
        Some(end) => {
            let mut frame = frame(Kind::Array, count as u64, None, None, items);
            frame.all_bulk = true;
            Some((frame, end))
        }
        None => {
            recycle_items(items);
            None
        }
    }
}

/// `count` non-null bulk strings from `at`, summarised into `items`; where they end.
fn elements(input: &[u8], count: usize, mut at: usize, items: &mut Vec<Item>) -> Option<usize> {
    for index in 0..count {
        if input.get(at) != Some(&b'$') {
            return None;
        }
        let (len, body) = header(&input[at..])?;
        let (content, end) = bulk_body(&input[at..], len, body)?;
        if index < MAX_ITEMS {
            let kept = content.len().min(MAX_ELEMENT_TEXT);
            items.push(Item {
                kind: Kind::BulkString,
                null: false,
                len: len as u64,
                text: (index < MAX_KEPT_ELEMENTS).then(|| Text::from_slice(&content[..kept])),
                integer: None,
            });
        }
        at += end;
    }
    Some(at)
}

/// A `+` or `-` line.
fn line(input: &[u8], kind: Kind) -> Option<(Frame, usize)> {
    let lf = input.iter().position(|&b| b == b'\n')?;
    if lf < 2 || input[lf - 1] != b'\r' {
        return None;
    }
    let content = &input[1..lf - 1];
    let text = Text::from_slice(&content[..content.len().min(MAX_TEXT)]);
    let frame = frame(kind, content.len() as u64, Some(text), None, Vec::new());
    Some((frame, lf + 1))
}

/// The number in a `<type><number>\r\n` header, and where the header ends.
fn header(input: &[u8]) -> Option<(i64, usize)> {
    let window = &input[..input.len().min(MAX_HEADER_LEN + 2)];
    let lf = window.iter().position(|&b| b == b'\n')?;
    if lf < 2 || input[lf - 1] != b'\r' {
        return None;
    }
    Some((parse_i64(&input[1..lf - 1])?, lf + 1))
}

/// A bulk body of `len` bytes starting at `body`, with its CRLF: the body and where it ends.
fn bulk_body(input: &[u8], len: i64, body: usize) -> Option<(&[u8], usize)> {
    if len < 0 || len as u64 > MAX_BULK_LEN {
        return None;
    }
    let end = body.checked_add(len as usize)?;
    if input.get(end..end.checked_add(2)?)? != b"\r\n" {
        return None;
    }
    Some((&input[body..end], end + 2))
}

fn frame(
    kind: Kind,
    len: u64,
    text: Option<Text>,
    integer: Option<i64>,
    items: Vec<Item>,
) -> Frame {
    Frame {
        kind,
        null: false,
        wire_len: 0,
        attributes: 0,
        len,
        text,
        integer,
        items,
        all_bulk: false,
    }
}
