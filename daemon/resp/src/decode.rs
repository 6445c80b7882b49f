//! Streaming RESP2/RESP3 decoder: one [`Decoder`] per connection direction.
//!
//! The decoder never holds a value: bulk bodies are skipped by their declared length (only a
//! bounded prefix of the few elements a correlator needs is copied), simple lines are streamed
//! with a bounded prefix, and only headers (≤ [`MAX_HEADER_LEN`]) and inline commands
//! (≤ [`MAX_INLINE_LEN`], Redis' own inline limit) are buffered. Whatever the input, memory is
//! bounded and every byte fed is accounted for exactly once: either in the `wire_len` of an
//! emitted [`Frame`], in the `skipped_bytes` of a [`Desync`], or in the frame still in progress.
//!
//! Loss is explicit. When the decoder cannot know where the next message starts (a bad byte,
//! a header hidden in bytes the kernel did not copy, a ring-buffer gap) it reports a [`Desync`]
//! and discards input up to the next chunk boundary (the next [`Decoder::feed`]) that starts
//! with a whole RESP line: the capture layer delivers one chunk per packet, and a packet start
//! is the only place where a new message is likely to start. It never guesses a message start
//! in the middle of a chunk.

use std::cell::RefCell;

use smallvec::SmallVec;
use thiserror::Error;

mod whole;

/// Command arguments / aggregate elements whose text prefix is kept (command name, subcommand,
/// first key, `CLIENT REPLY OFF`, pub/sub message kinds).
pub const MAX_KEPT_ELEMENTS: usize = 4;
/// Bytes kept from each of those elements: all of them inline, so no argument costs an
/// allocation (a longer key is kept, and shown, cut to this).
pub const MAX_ELEMENT_TEXT: usize = INLINE_TEXT;
/// Bytes kept from error texts and simple-string replies.
pub const MAX_TEXT: usize = 256;
/// Kept texts up to this length live inside their [`Item`] or [`Frame`]: most keys and
/// Redis' own error messages (so neither costs an allocation).
pub const INLINE_TEXT: usize = 80;

/// A kept text prefix. Command names, most keys and status replies fit inline, so decoding
/// ordinary traffic allocates nothing per element (an allocation per kept argument was the
/// largest part of the daemon's time in malloc).
pub type Text = SmallVec<[u8; INLINE_TEXT]>;

/// Room a decoder's line buffer keeps between messages.
const KEPT_LINE: usize = 256;
/// Items a recycled buffer may hold room for ([`recycle_items`]).
const MAX_SPARE_ITEMS: usize = 16;
/// Recycled buffers kept per thread.
const MAX_SPARE_BUFFERS: usize = 256;

thread_local! {
    /// Emptied [`Frame::items`] buffers, shared by every decoder of a thread: frames are
    /// decoded without allocating, and idle connections hold none.
    static SPARE_ITEMS: RefCell<Vec<Vec<Item>>> = const { RefCell::new(Vec::new()) };
}

/// An empty item buffer, recycled when one is spare.
fn spare_items() -> Vec<Item> {
    SPARE_ITEMS
        .try_with(|spare| spare.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Hands a frame's item buffer back once its consumer is done with it, for the next frame
/// of any decoder on this thread. Buffers that grew large (long EXEC replies) are let go.
pub fn recycle_items(mut items: Vec<Item>) {
    if items.capacity() == 0 || items.capacity() > MAX_SPARE_ITEMS {
        return;
    }
    items.clear();
    let _ = SPARE_ITEMS.try_with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < MAX_SPARE_BUFFERS {
            spare.push(items);
        }
    });
}
/// Top-level elements of an aggregate summarised in [`Frame::items`] (EXEC results).
pub const MAX_ITEMS: usize = 1024;
/// Longest inline command line, as Redis' `PROTO_INLINE_MAX_SIZE`.
pub const MAX_INLINE_LEN: usize = 64 * 1024;
/// Longest length/integer header line (an `i64` needs 20 bytes).
pub const MAX_HEADER_LEN: usize = 32;
/// Largest bulk length accepted (Redis' default `proto-max-bulk-len`).
pub const MAX_BULK_LEN: u64 = 512 * 1024 * 1024;
/// Largest aggregate element count accepted (Redis rejects multibulk counts above `INT_MAX`).
/// Elements are counted, never stored, so a large limit costs no memory.
pub const MAX_AGGREGATE_LEN: u64 = i32::MAX as u64;
/// Deepest aggregate nesting accepted.
pub const MAX_DEPTH: usize = 128;

/// RESP type of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `+`
    SimpleString,
    /// `-`
    Error,
    /// `:`
    Integer,
    /// `$` (also the null bulk `$-1`, see [`Frame::null`])
    BulkString,
    /// `*` (also the null array `*-1`)
    Array,
    /// `_` (RESP3)
    Null,
    /// `#`
    Boolean,
    /// `,`
    Double,
    /// `(`
    BigNumber,
    /// `!`
    BulkError,
    /// `=`
    VerbatimString,
    /// `%`
    Map,
    /// `~`
    Set,
    /// `>`: out-of-band data, never a reply to a request.
    Push,
    /// A line not starting with a type byte: Redis' inline command protocol.
    Inline,
    /// The RDB snapshot a master sends a replica after `+FULLRESYNC`: `$<len>\r\n` and the
    /// bytes, with no CRLF after them, or (diskless sync) `$EOF:<40-byte mark>\r\n`, the bytes,
    /// and the mark again.
    Snapshot,
}

impl Kind {
    /// Error replies (`-` and `!`).
    pub fn is_error(self) -> bool {
        matches!(self, Kind::Error | Kind::BulkError)
    }

    /// Aggregates whose elements are summarised in [`Frame::items`].
    pub fn is_aggregate(self) -> bool {
        matches!(self, Kind::Array | Kind::Map | Kind::Set | Kind::Push)
    }
}

/// Bounded summary of one element of a top-level aggregate (or one inline argument).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// RESP type.
    pub kind: Kind,
    /// `$-1`, `*-1` or `_`.
    pub null: bool,
    /// Declared length: bytes for strings, elements for aggregates (pairs for maps).
    pub len: u64,
    /// Bounded text prefix: kept for the first [`MAX_KEPT_ELEMENTS`] string elements and for
    /// every error element. Bytes the kernel did not copy are missing from it.
    pub text: Option<Text>,
    /// Value of an integer element.
    pub integer: Option<i64>,
}

/// Bounded summary of one top-level message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// RESP type of the message (after any attributes).
    pub kind: Kind,
    /// `$-1`, `*-1` or `_`.
    pub null: bool,
    /// Bytes on the wire, including any attribute (`|`) preceding the message.
    pub wire_len: u64,
    /// Number of attributes that preceded the message.
    pub attributes: u32,
    /// Declared length: bytes for strings, elements for aggregates (pairs for maps), arguments
    /// for inline commands.
    pub len: u64,
    /// Bounded text of simple strings, errors, doubles, booleans and big numbers.
    pub text: Option<Text>,
    /// Value of an integer reply.
    pub integer: Option<i64>,
    /// Summaries of the first [`MAX_ITEMS`] top-level elements (or inline arguments).
    pub items: Vec<Item>,
    /// For aggregates and inline commands: every top-level element is a non-null bulk string.
    pub all_bulk: bool,
}

impl Frame {
    /// Shaped like a command: a non-empty array of bulk strings, or an inline command line.
    pub fn is_command(&self) -> bool {
        match self.kind {
            Kind::Array => !self.null && self.len > 0 && self.all_bulk,
            Kind::Inline => self.len > 0,
            _ => false,
        }
    }

    /// Bounded prefix of element `i` (command argument `i`), when kept.
    pub fn arg(&self, i: usize) -> Option<&[u8]> {
        self.items.get(i).and_then(|it| it.text.as_deref())
    }

    /// Error text (without the leading `-`), bounded.
    pub fn error_text(&self) -> Option<&[u8]> {
        if self.kind.is_error() {
            Some(self.text.as_deref().unwrap_or_default())
        } else {
            None
        }
    }
}

/// Why the decoder lost track of message boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DesyncReason {
    /// A byte that starts no RESP value where one was expected.
    #[error("unexpected type byte 0x{0:02x}")]
    BadTypeByte(u8),
    /// A line not terminated by CRLF.
    #[error("line not terminated by CRLF")]
    BadLineEnding,
    /// A length/integer header longer than [`MAX_HEADER_LEN`].
    #[error("header line too long")]
    HeaderTooLong,
    /// An inline command longer than [`MAX_INLINE_LEN`].
    #[error("inline command too long")]
    InlineTooLong,
    /// A header that is not a valid number.
    #[error("invalid number in header")]
    BadNumber,
    /// A negative length other than the RESP2 null.
    #[error("invalid length")]
    BadLength,
    /// A bulk length above [`MAX_BULK_LEN`].
    #[error("bulk length {0} above limit")]
    BulkTooLong(u64),
    /// An aggregate count above [`MAX_AGGREGATE_LEN`].
    #[error("aggregate length {0} above limit")]
    TooManyElements(u64),
    /// Aggregates nested deeper than [`MAX_DEPTH`].
    #[error("aggregates nested too deep")]
    TooDeep,
    /// RESP3 streamed strings/aggregates (`$?`, `*?`): Redis never sends them.
    #[error("streamed RESP3 types are not supported")]
    StreamedUnsupported,
    /// A bulk body not followed by CRLF.
    #[error("bulk body not terminated by CRLF")]
    BadBulkTerminator,
    /// A `_` or `#` line with an invalid value.
    #[error("invalid null or boolean")]
    BadValue,
    /// An inline command with unbalanced quotes (Redis closes such connections).
    #[error("unbalanced quotes in inline command")]
    UnbalancedQuotes,
    /// Bytes the kernel did not copy hid a message boundary.
    #[error("message header in uncopied bytes")]
    Truncated,
    /// Stream bytes lost (ring buffer overflow) outside a skippable body.
    #[error("stream bytes lost")]
    Lost,
    /// While resynchronising, a chunk that does not start with a plausible message.
    #[error("no message start at chunk boundary")]
    NoMessageStart,
    /// Bytes skipped while joining a stream mid-way, before its first message start: the
    /// decoder was never in sync, so no sync was lost.
    #[error("joining the stream mid-way")]
    JoiningMidStream,
}

/// A loss of synchronisation: `skipped_bytes` of the stream were not decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desync {
    /// What went wrong.
    pub reason: DesyncReason,
    /// Stream bytes discarded (including the partial message in progress, if any).
    pub skipped_bytes: u64,
}

/// Output of the decoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// One complete top-level message.
    Frame(Frame),
    /// Bytes skipped because message boundaries were lost.
    Desync(Desync),
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Expecting the type byte of a value (or an inline command at top level).
    Start,
    /// Reading a length/integer header after type byte `ty`, buffered in `line`.
    Header { ty: u8 },
    /// Streaming a text line, keeping up to `cap` bytes in `text`.
    Text {
        kind: Kind,
        seen: u64,
        last_cr: bool,
        cap: usize,
    },
    /// Reading an inline command line, buffered in `line`.
    Inline,
    /// Skipping a bulk body and its CRLF, keeping up to `cap` bytes in `text`.
    Body {
        kind: Kind,
        declared: u64,
        data_left: u64,
        trailer_left: u8,
        cap: usize,
    },
    /// Reading the header of a snapshot (`$<len>` or `$EOF:<mark>`), buffered in `line`.
    SnapshotHeader,
    /// Scanning a diskless snapshot for its closing mark (`snapshot_mark`); `line` holds the
    /// last bytes seen, which may begin the mark.
    SnapshotEof,
    /// Discarding until the next chunk boundary.
    Resync,
}

/// Length of the mark that delimits a diskless snapshot (`CONFIG_RUN_ID_SIZE`).
pub const SNAPSHOT_MARK_LEN: usize = 40;

#[derive(Debug, Clone, Copy)]
struct Agg {
    kind: Kind,
    attribute: bool,
    declared: u64,
    remaining: u64,
}

/// Where the value being started sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Top,
    Element(usize),
    Deep,
}

/// Streaming RESP decoder for one direction of one connection.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    stack: Vec<Agg>,
    line: Vec<u8>,
    text: Text,
    items: Vec<Item>,
    all_bulk: bool,
    attributes: u32,
    /// Stream offset of the next byte to decode (wrapping; only differences matter).
    pos: u64,
    /// Stream offset where the message in progress started.
    frame_start: u64,
    /// A `+FULLRESYNC` reply was decoded: a snapshot comes next (after keepalive newlines).
    snapshot_next: bool,
    /// A message start was found at least once (false while joining a stream mid-way).
    synced: bool,
    snapshot_mark: [u8; SNAPSHOT_MARK_LEN],
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

fn is_type_byte(b: u8) -> bool {
    matches!(
        b,
        b'+' | b'-'
            | b':'
            | b'$'
            | b'*'
            | b'_'
            | b'#'
            | b','
            | b'('
            | b'!'
            | b'='
            | b'%'
            | b'~'
            | b'>'
            | b'|'
    )
}

/// Whether a chunk where the decoder looks for a message after losing its place starts like
/// one: the whole first line of a RESP value (`*2\r\n`, `$5\r\n`, `+OK\r\n`, `-ERR …\r\n`
/// …), or as much of it as the chunk holds. Inline commands are not looked for here: a chunk
/// boundary inside a value of letters would pass for one.
fn plausible_start(chunk: &[u8]) -> bool {
    let Some((&first, rest)) = chunk.split_first() else {
        return false;
    };
    let line_end = rest.iter().position(|&b| b == b'\r');
    let line = &rest[..line_end.unwrap_or(rest.len())];
    let terminated = match line_end {
        Some(cr) => rest.get(cr + 1).is_none_or(|&b| b == b'\n'),
        None => line.len() <= MAX_HEADER_LEN,
    };
    let number = |line: &[u8]| {
        let digits = line.strip_prefix(b"-").unwrap_or(line);
        !digits.is_empty() && digits.len() <= 20 && digits.iter().all(u8::is_ascii_digit)
    };
    let printable = |line: &[u8]| line.iter().all(|b| (0x20..0x7f).contains(b));
    terminated
        && match first {
            b'*' | b'$' | b':' | b'%' | b'~' | b'>' | b'|' | b'=' | b'!' | b'(' => number(line),
            b'+' | b',' => !line.is_empty() && printable(line),
            b'-' => line.first().is_some_and(u8::is_ascii_uppercase) && printable(line),
            b'_' => line.is_empty(),
            b'#' => line == b"t" || line == b"f",
            _ => false,
        }
}

fn text_kind(b: u8) -> Option<Kind> {
    Some(match b {
        b'+' => Kind::SimpleString,
        b'-' => Kind::Error,
        b'_' => Kind::Null,
        b'#' => Kind::Boolean,
        b',' => Kind::Double,
        b'(' => Kind::BigNumber,
        _ => return None,
    })
}

fn parse_i64(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(if neg { -v } else { v })
}

/// Split an inline command line like Redis' `sdssplitargs`: whitespace separated, with
/// `"..."` (C escapes) and `'...'` quoting. Only the first [`MAX_KEPT_ELEMENTS`] arguments are
/// kept (bounded); the count covers all of them.
fn split_inline(line: &[u8]) -> Result<(u64, Vec<Item>), DesyncReason> {
    let mut argc = 0u64;
    let mut items = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= n {
            return Ok((argc, items));
        }
        let mut arg = Text::new();
        let mut len = 0u64;
        let mut push = |arg: &mut Text, b: u8| {
            len += 1;
            if arg.len() < MAX_ELEMENT_TEXT {
                arg.push(b);
            }
        };
        let quote = match line[i] {
            q @ (b'"' | b'\'') => {
                i += 1;
                Some(q)
            }
            _ => None,
        };
        loop {
            let Some(&c) = line.get(i) else {
                if quote.is_some() {
                    return Err(DesyncReason::UnbalancedQuotes);
                }
                break;
            };
            match quote {
                None if c.is_ascii_whitespace() => break,
                None => {
                    push(&mut arg, c);
                    i += 1;
                }
                Some(q) if c == q => {
                    i += 1;
                    // Redis requires the closing quote to be followed by a space or the end.
                    if line.get(i).is_some_and(|b| !b.is_ascii_whitespace()) {
                        return Err(DesyncReason::UnbalancedQuotes);
                    }
                    break;
                }
                Some(q) if c == b'\\' && i + 1 < n => {
                    let e = line[i + 1];
                    let hex = |b: u8| (b as char).to_digit(16);
                    if q == b'"'
                        && e == b'x'
                        && i + 3 < n
                        && let (Some(h), Some(l)) = (hex(line[i + 2]), hex(line[i + 3]))
                    {
                        push(&mut arg, (h * 16 + l) as u8);
                        i += 4;
                        continue;
                    }
                    let out = match (q, e) {
                        (b'"', b'n') => b'\n',
                        (b'"', b'r') => b'\r',
                        (b'"', b't') => b'\t',
                        (b'"', b'b') => 0x08,
                        (b'"', b'a') => 0x07,
                        (b'\'', b'\'') => b'\'',
                        (b'\'', _) => {
                            push(&mut arg, c);
                            i += 1;
                            continue;
                        }
                        (_, other) => other,
                    };
                    push(&mut arg, out);
                    i += 2;
                }
                Some(_) => {
                    push(&mut arg, c);
                    i += 1;
                }
            }
        }
        if items.len() < MAX_KEPT_ELEMENTS {
            items.push(Item {
                kind: Kind::BulkString,
                null: false,
                len,
                text: Some(arg),
                integer: None,
            });
        }
        argc += 1;
    }
}

impl Decoder {
    /// A decoder positioned at a message boundary (the start of a connection).
    pub fn new() -> Self {
        Decoder {
            state: State::Start,
            stack: Vec::new(),
            line: Vec::new(),
            text: Text::new(),
            items: Vec::new(),
            all_bulk: true,
            attributes: 0,
            pos: 0,
            frame_start: 0,
            snapshot_next: false,
            synced: true,
            snapshot_mark: [0; SNAPSHOT_MARK_LEN],
        }
    }

    /// A decoder for a stream joined at an unknown position (the agent attached after the
    /// connection started): the first chunk is treated like a chunk after a desync, so garbage
    /// mid-message bytes are discarded rather than decoded.
    pub fn mid_stream() -> Self {
        Decoder {
            state: State::Resync,
            synced: false,
            ..Self::new()
        }
    }

    /// Bytes held awaiting more input (header/inline line, kept text prefixes).
    pub fn buffered(&self) -> usize {
        self.line.len()
            + self.text.len()
            + self
                .items
                .iter()
                .map(|i| i.text.as_ref().map_or(0, |text| text.len()))
                .sum::<usize>()
    }

    /// Bytes of the message in progress consumed so far (not yet in a frame or a desync).
    pub fn pending_bytes(&self) -> u64 {
        self.pos.wrapping_sub(self.frame_start)
    }

    /// Whether the decoder is discarding input until the next chunk boundary.
    pub fn is_resyncing(&self) -> bool {
        matches!(self.state, State::Resync)
    }

    /// `copied` are the bytes captured; `uncopied` more stream bytes followed them that were not
    /// captured (the kernel copies only a bounded window). Appends decoded items to `out`.
    pub fn feed(&mut self, copied: &[u8], uncopied: u64, out: &mut Vec<Decoded>) {
        self.feed_chunk(copied, uncopied, true, out);
    }

    /// Like [`Decoder::feed`], for bytes that continue a chunk rather than start one (the rest
    /// of a packet, or a retransmission trimmed to its new bytes): no message is looked for at
    /// their start while the decoder is resynchronising.
    pub fn feed_continuation(&mut self, copied: &[u8], uncopied: u64, out: &mut Vec<Decoded>) {
        self.feed_chunk(copied, uncopied, false, out);
    }

    fn feed_chunk(&mut self, copied: &[u8], uncopied: u64, boundary: bool, out: &mut Vec<Decoded>) {
        if let State::Resync = self.state {
            if !boundary || !plausible_start(copied) {
                let n = (copied.len() as u64).saturating_add(uncopied);
                self.skip_resyncing(n, DesyncReason::NoMessageStart, out);
                return;
            }
            self.state = State::Start;
            self.synced = true;
        }
        let chunk_end = self.pos.wrapping_add(copied.len() as u64);
        let mut rest = copied;
        while !rest.is_empty() {
            if let Some(n) = self.whole_message(rest, out) {
                rest = &rest[n..];
                continue;
            }
            match self.step(rest, out) {
                Ok(n) => rest = &rest[n..],
                Err(reason) => {
                    let unread = chunk_end.wrapping_sub(self.pos);
                    self.desync(reason, unread.saturating_add(uncopied), out);
                    return;
                }
            }
        }
        if uncopied > 0 {
            self.skip_unknown(uncopied, DesyncReason::Truncated, out);
        }
    }

    /// A message that starts here and lies wholly in `input`, when it has one of the common
    /// shapes [`whole`] decodes in one pass, in under half the state machine's instructions.
    fn whole_message(&mut self, input: &[u8], out: &mut Vec<Decoded>) -> Option<usize> {
        if !matches!(self.state, State::Start)
            || !self.stack.is_empty()
            || self.attributes > 0
            || self.snapshot_next
        {
            return None;
        }
        let (mut frame, len) = whole::whole_message(input)?;
        frame.wire_len = len as u64;
        self.advance(len);
        self.frame_start = self.pos;
        self.emit(frame, out);
        Some(len)
    }

    /// Hands a top-level frame on. A master's `+FULLRESYNC` announces a snapshot.
    fn emit(&mut self, frame: Frame, out: &mut Vec<Decoded>) {
        if frame.kind == Kind::SimpleString
            && frame
                .text
                .as_deref()
                .is_some_and(|text| text.starts_with(b"FULLRESYNC"))
        {
            self.snapshot_next = true;
        }
        out.push(Decoded::Frame(frame));
    }

    /// `len` bytes of the stream were lost (ring buffer overflow): content unknown.
    pub fn lose(&mut self, len: u64, out: &mut Vec<Decoded>) {
        if len == 0 {
            return;
        }
        if let State::Resync = self.state {
            self.skip_resyncing(len, DesyncReason::Lost, out);
        } else {
            self.skip_unknown(len, DesyncReason::Lost, out);
        }
    }

    fn skip_resyncing(&mut self, n: u64, reason: DesyncReason, out: &mut Vec<Decoded>) {
        self.pos = self.pos.wrapping_add(n);
        self.frame_start = self.pos;
        let reason = if self.synced {
            reason
        } else {
            DesyncReason::JoiningMidStream
        };
        if n > 0 {
            out.push(Decoded::Desync(Desync {
                reason,
                skipped_bytes: n,
            }));
        }
    }

    /// `n` stream bytes of unknown content follow: fine inside a bulk body, a desync otherwise.
    fn skip_unknown(&mut self, mut n: u64, reason: DesyncReason, out: &mut Vec<Decoded>) {
        if let State::Body {
            kind,
            declared,
            data_left,
            trailer_left,
            ..
        } = &mut self.state
        {
            let in_data = n.min(*data_left);
            *data_left -= in_data;
            n -= in_data;
            let in_trailer = n.min(u64::from(*trailer_left));
            // `in_trailer` ≤ 2, so the narrowing cannot lose information.
            *trailer_left -= in_trailer as u8;
            n -= in_trailer;
            self.pos = self.pos.wrapping_add(in_data + in_trailer);
            if *data_left == 0 && *trailer_left == 0 {
                let (kind, declared) = (*kind, *declared);
                self.finish_body(kind, declared, out);
            }
        }
        if n > 0 {
            self.desync(reason, n, out);
        }
    }

    fn desync(&mut self, reason: DesyncReason, unread: u64, out: &mut Vec<Decoded>) {
        self.snapshot_next = false;
        let skipped = self.pending_bytes().saturating_add(unread);
        self.pos = self.pos.wrapping_add(unread);
        self.reset_message();
        self.state = State::Resync;
        out.push(Decoded::Desync(Desync {
            reason,
            skipped_bytes: skipped,
        }));
    }

    fn reset_message(&mut self) {
        self.frame_start = self.pos;
        self.stack.clear();
        self.line.clear();
        // A long inline line or text once does not keep its room on every idle connection.
        if self.line.capacity() > KEPT_LINE {
            self.line = Vec::new();
        }
        self.text.clear();
        self.items.clear();
        self.all_bulk = true;
        self.attributes = 0;
    }

    fn ctx(&self) -> Ctx {
        match self.stack.as_slice() {
            [] => Ctx::Top,
            [agg] if !agg.attribute => {
                // `remaining` ≤ `declared` and both fit the element index space we keep.
                let index = agg.declared_elements() - agg.remaining;
                Ctx::Element(usize::try_from(index).unwrap_or(usize::MAX))
            }
            _ => Ctx::Deep,
        }
    }

    /// Consume bytes from `input` (non-empty); returns how many.
    fn step(&mut self, input: &[u8], out: &mut Vec<Decoded>) -> Result<usize, DesyncReason> {
        match self.state {
            State::Start | State::Resync => self.step_start(input),
            State::Header { ty } => self.step_header(ty, input, out),
            State::Text {
                kind,
                seen,
                last_cr,
                cap,
            } => self.step_text(kind, seen, last_cr, cap, input, out),
            State::Inline => self.step_inline(input, out),
            State::Body { .. } => self.step_body(input, out),
            State::SnapshotHeader => self.step_snapshot_header(input),
            State::SnapshotEof => self.step_snapshot_eof(input, out),
        }
    }

    /// After `+FULLRESYNC`: keepalive newlines, then `$`.
    fn step_snapshot_start(&mut self, input: &[u8]) -> usize {
        let newlines = input.iter().take_while(|&&b| b == b'\n').count();
        if newlines > 0 {
            self.advance(newlines);
            return newlines;
        }
        self.snapshot_next = false;
        if input.first() == Some(&b'$') {
            self.line.clear();
            self.state = State::SnapshotHeader;
            self.advance(1);
            1
        } else {
            // Not a snapshot after all (a master refusing): decode as usual.
            0
        }
    }

    fn step_snapshot_header(&mut self, input: &[u8]) -> Result<usize, DesyncReason> {
        let limit = 4 + SNAPSHOT_MARK_LEN + 1;
        let (consumed, done) = self.buffer_line(input, limit, DesyncReason::HeaderTooLong)?;
        if !done {
            return Ok(consumed);
        }
        if self.line.pop() != Some(b'\r') {
            return Err(DesyncReason::BadLineEnding);
        }
        if let Some(mark) = self.line.strip_prefix(b"EOF:") {
            let mark: [u8; SNAPSHOT_MARK_LEN] =
                mark.try_into().map_err(|_| DesyncReason::BadLength)?;
            self.snapshot_mark = mark;
            self.line.clear();
            self.state = State::SnapshotEof;
            return Ok(consumed);
        }
        // A snapshot may be larger than any bulk string: no length limit here.
        let len = parse_i64(&self.line)
            .and_then(|n| u64::try_from(n).ok())
            .ok_or(DesyncReason::BadNumber)?;
        self.line.clear();
        self.state = State::Body {
            kind: Kind::Snapshot,
            declared: len,
            data_left: len,
            trailer_left: 0,
            cap: 0,
        };
        Ok(consumed)
    }

    /// Finds the mark that ends a diskless snapshot, also when a chunk boundary splits it.
    fn step_snapshot_eof(
        &mut self,
        input: &[u8],
        out: &mut Vec<Decoded>,
    ) -> Result<usize, DesyncReason> {
        let mark = self.snapshot_mark;
        let held = self.line.len();
        // A mark that starts in the bytes held from before and ends in this input.
        let mut joined = std::mem::take(&mut self.line);
        joined.extend_from_slice(&input[..input.len().min(SNAPSHOT_MARK_LEN - 1)]);
        let across = joined
            .windows(SNAPSHOT_MARK_LEN)
            .position(|window| window == mark)
            .filter(|start| *start < held)
            .map(|start| start + SNAPSHOT_MARK_LEN - held);
        let within = || {
            input
                .windows(SNAPSHOT_MARK_LEN)
                .position(|window| window[0] == mark[0] && window == mark)
                .map(|start| start + SNAPSHOT_MARK_LEN)
        };
        if let Some(end) = across.or_else(within) {
            self.advance(end);
            self.line.clear();
            let len = self.pending_bytes();
            self.complete(
                Item {
                    kind: Kind::Snapshot,
                    null: false,
                    len,
                    text: None,
                    integer: None,
                },
                out,
            );
            return Ok(end);
        }
        // Keep the last bytes seen: they may begin the mark.
        let keep_from = joined.len().saturating_sub(SNAPSHOT_MARK_LEN - 1);
        self.line = if input.len() >= SNAPSHOT_MARK_LEN - 1 {
            input[input.len() - (SNAPSHOT_MARK_LEN - 1)..].to_vec()
        } else {
            joined[keep_from..].to_vec()
        };
        self.advance(input.len());
        Ok(input.len())
    }

    fn step_start(&mut self, input: &[u8]) -> Result<usize, DesyncReason> {
        if self.snapshot_next && self.stack.is_empty() {
            let used = self.step_snapshot_start(input);
            if used > 0 || self.snapshot_next {
                return Ok(used);
            }
        }
        let Some(&b) = input.first() else {
            return Ok(0);
        };
        if let Some(kind) = text_kind(b) {
            let cap = match (self.ctx(), kind) {
                (Ctx::Top, _) => MAX_TEXT,
                (Ctx::Element(i), Kind::Error) if i < MAX_ITEMS => MAX_TEXT,
                (Ctx::Element(i), _) if i < MAX_KEPT_ELEMENTS => MAX_ELEMENT_TEXT,
                // A boolean must be captured to be validated.
                (_, Kind::Boolean) => 1,
                _ => 0,
            };
            self.text.clear();
            self.state = State::Text {
                kind,
                seen: 0,
                last_cr: false,
                cap,
            };
            self.advance(1);
            Ok(1)
        } else if is_type_byte(b) {
            self.line.clear();
            self.state = State::Header { ty: b };
            self.advance(1);
            Ok(1)
        } else if self.stack.is_empty() && self.attributes == 0 {
            self.line.clear();
            self.state = State::Inline;
            Ok(0)
        } else {
            Err(DesyncReason::BadTypeByte(b))
        }
    }

    fn advance(&mut self, n: usize) {
        self.pos = self.pos.wrapping_add(n as u64);
    }

    /// Buffer a line into `self.line` up to `limit`; returns the complete line length when the
    /// terminating LF was found, and how many input bytes were consumed.
    fn buffer_line(
        &mut self,
        input: &[u8],
        limit: usize,
        too_long: DesyncReason,
    ) -> Result<(usize, bool), DesyncReason> {
        let (take, done) = match input.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (input.len(), false),
        };
        if self.line.len() + take > limit {
            return Err(too_long);
        }
        self.line.extend_from_slice(&input[..take]);
        let consumed = if done { take + 1 } else { take };
        self.advance(consumed);
        Ok((consumed, done))
    }

    fn step_header(
        &mut self,
        ty: u8,
        input: &[u8],
        out: &mut Vec<Decoded>,
    ) -> Result<usize, DesyncReason> {
        let (consumed, done) =
            self.buffer_line(input, MAX_HEADER_LEN + 1, DesyncReason::HeaderTooLong)?;
        if !done {
            return Ok(consumed);
        }
        if self.line.pop() != Some(b'\r') {
            return Err(DesyncReason::BadLineEnding);
        }
        if self.line == b"?" {
            return Err(DesyncReason::StreamedUnsupported);
        }
        let n = parse_i64(&self.line).ok_or(DesyncReason::BadNumber)?;
        self.line.clear();
        match ty {
            b':' => self.complete(
                Item {
                    kind: Kind::Integer,
                    null: false,
                    len: 0,
                    text: None,
                    integer: Some(n),
                },
                out,
            ),
            b'$' | b'!' | b'=' => {
                let kind = match ty {
                    b'$' => Kind::BulkString,
                    b'!' => Kind::BulkError,
                    _ => Kind::VerbatimString,
                };
                if n == -1 && ty == b'$' {
                    self.complete(null_item(kind), out);
                    return Ok(consumed);
                }
                let len = u64::try_from(n).map_err(|_| DesyncReason::BadLength)?;
                if len > MAX_BULK_LEN {
                    return Err(DesyncReason::BulkTooLong(len));
                }
                let cap = match (self.ctx(), kind) {
                    (Ctx::Top, Kind::BulkError) => MAX_TEXT,
                    (Ctx::Element(i), Kind::BulkError) if i < MAX_ITEMS => MAX_TEXT,
                    (Ctx::Element(i), _) if i < MAX_KEPT_ELEMENTS => MAX_ELEMENT_TEXT,
                    _ => 0,
                };
                self.text.clear();
                self.state = State::Body {
                    kind,
                    declared: len,
                    data_left: len,
                    trailer_left: 2,
                    cap,
                };
            }
            _ => {
                let (kind, attribute) = match ty {
                    b'*' => (Kind::Array, false),
                    b'%' => (Kind::Map, false),
                    b'~' => (Kind::Set, false),
                    b'>' => (Kind::Push, false),
                    _ => (Kind::Map, true),
                };
                if n == -1 && ty == b'*' {
                    self.complete(null_item(kind), out);
                    return Ok(consumed);
                }
                let len = u64::try_from(n).map_err(|_| DesyncReason::BadLength)?;
                if len > MAX_AGGREGATE_LEN {
                    return Err(DesyncReason::TooManyElements(len));
                }
                let agg = Agg {
                    kind,
                    attribute,
                    declared: len,
                    remaining: 0,
                };
                let elements = agg.declared_elements();
                if elements == 0 {
                    self.state = State::Start;
                    if attribute {
                        self.attribute_done();
                    } else {
                        self.complete(aggregate_item(kind, len), out);
                    }
                    return Ok(consumed);
                }
                if self.stack.len() >= MAX_DEPTH {
                    return Err(DesyncReason::TooDeep);
                }
                self.stack.push(Agg {
                    remaining: elements,
                    ..agg
                });
                self.state = State::Start;
            }
        }
        Ok(consumed)
    }

    fn step_text(
        &mut self,
        kind: Kind,
        seen: u64,
        last_cr: bool,
        cap: usize,
        input: &[u8],
        out: &mut Vec<Decoded>,
    ) -> Result<usize, DesyncReason> {
        let found = input.iter().position(|&b| b == b'\n');
        let take = found.unwrap_or(input.len());
        let room = cap.saturating_sub(self.text.len()).min(take);
        self.text.extend_from_slice(&input[..room]);
        let seen = seen + take as u64;
        let Some(lf) = found else {
            self.advance(take);
            self.state = State::Text {
                kind,
                seen,
                last_cr: input.last() == Some(&b'\r'),
                cap,
            };
            return Ok(take);
        };
        self.advance(lf + 1);
        let cr = if lf > 0 {
            input[lf - 1] == b'\r'
        } else {
            last_cr
        };
        if !cr {
            return Err(DesyncReason::BadLineEnding);
        }
        let content_len = usize::try_from(seen - 1).unwrap_or(usize::MAX);
        self.text.truncate(content_len);
        let valid = match kind {
            Kind::Null => content_len == 0,
            Kind::Boolean => matches!(self.text.as_slice(), b"t" | b"f"),
            _ => true,
        };
        if !valid {
            return Err(DesyncReason::BadValue);
        }
        let text = (cap > 0 && kind != Kind::Null).then(|| std::mem::take(&mut self.text));
        self.text.clear();
        self.state = State::Start;
        self.complete(
            Item {
                kind,
                null: kind == Kind::Null,
                len: seen - 1,
                text,
                integer: None,
            },
            out,
        );
        Ok(lf + 1)
    }

    fn step_inline(&mut self, input: &[u8], out: &mut Vec<Decoded>) -> Result<usize, DesyncReason> {
        let (consumed, done) =
            self.buffer_line(input, MAX_INLINE_LEN, DesyncReason::InlineTooLong)?;
        if !done {
            return Ok(consumed);
        }
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        let (argc, items) = split_inline(&self.line)?;
        self.line.clear();
        self.state = State::Start;
        let frame = Frame {
            kind: Kind::Inline,
            null: false,
            wire_len: self.pending_bytes(),
            attributes: 0,
            len: argc,
            text: None,
            integer: None,
            items,
            all_bulk: true,
        };
        self.reset_message();
        out.push(Decoded::Frame(frame));
        Ok(consumed)
    }

    fn step_body(&mut self, input: &[u8], out: &mut Vec<Decoded>) -> Result<usize, DesyncReason> {
        let State::Body {
            kind,
            declared,
            data_left,
            trailer_left,
            cap,
        } = &mut self.state
        else {
            return Ok(0);
        };
        let (kind, declared, cap) = (*kind, *declared, *cap);
        let take = usize::try_from(*data_left)
            .unwrap_or(usize::MAX)
            .min(input.len());
        *data_left -= take as u64;
        let mut used = take;
        if *data_left == 0 {
            while *trailer_left > 0 && used < input.len() {
                let expected = if *trailer_left == 2 { b'\r' } else { b'\n' };
                if input[used] != expected {
                    self.advance(used);
                    return Err(DesyncReason::BadBulkTerminator);
                }
                *trailer_left -= 1;
                used += 1;
            }
        }
        let complete = *data_left == 0 && *trailer_left == 0;
        let room = cap.saturating_sub(self.text.len()).min(take);
        self.text.extend_from_slice(&input[..room]);
        self.advance(used);
        if complete {
            self.finish_body(kind, declared, out);
        }
        Ok(used)
    }

    fn finish_body(&mut self, kind: Kind, declared: u64, out: &mut Vec<Decoded>) {
        let cap = match self.state {
            State::Body { cap, .. } => cap,
            _ => 0,
        };
        let text = (cap > 0).then(|| std::mem::take(&mut self.text));
        self.text.clear();
        self.state = State::Start;
        self.complete(
            Item {
                kind,
                null: false,
                len: declared,
                text,
                integer: None,
            },
            out,
        );
    }

    fn attribute_done(&mut self) {
        if self.stack.is_empty() {
            self.attributes = self.attributes.saturating_add(1);
        }
    }

    /// A value completed: account it to its parent aggregate, or emit the top-level frame.
    fn complete(&mut self, mut item: Item, out: &mut Vec<Decoded>) {
        self.state = State::Start;
        loop {
            let depth = self.stack.len();
            let Some(parent) = self.stack.last_mut() else {
                let all_bulk = item.kind.is_aggregate() && self.all_bulk;
                let frame = Frame {
                    kind: item.kind,
                    null: item.null,
                    wire_len: self.pending_bytes(),
                    attributes: self.attributes,
                    len: item.len,
                    text: item.text,
                    integer: item.integer,
                    items: std::mem::take(&mut self.items),
                    all_bulk,
                };
                self.reset_message();
                self.emit(frame, out);
                return;
            };
            parent.remaining -= 1;
            let parent_done = parent.remaining == 0;
            let parent = *parent;
            if depth == 1 && !parent.attribute {
                if item.kind != Kind::BulkString || item.null {
                    self.all_bulk = false;
                }
                if self.items.len() < MAX_ITEMS {
                    if self.items.capacity() == 0 {
                        self.items = spare_items();
                    }
                    self.items.push(item);
                }
            }
            if !parent_done {
                return;
            }
            self.stack.pop();
            if parent.attribute {
                self.attribute_done();
                return;
            }
            item = aggregate_item(parent.kind, parent.declared);
        }
    }
}

impl Agg {
    fn declared_elements(&self) -> u64 {
        if self.attribute || self.kind == Kind::Map {
            self.declared * 2
        } else {
            self.declared
        }
    }
}

fn null_item(kind: Kind) -> Item {
    Item {
        kind,
        null: true,
        len: 0,
        text: None,
        integer: None,
    }
}

fn aggregate_item(kind: Kind, len: u64) -> Item {
    Item {
        kind,
        null: false,
        len,
        text: None,
        integer: None,
    }
}

#[cfg(test)]
mod tests;
