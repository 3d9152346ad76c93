//! Canonical JSON (v1) and the event record encoding (v1) that the hash
//! chain covers. The exact rules are in docs/INTEGRITY.md; this module is
//! their reference implementation.
//!
//! The node encodes from the JSON text it received, a verifier from what
//! PostgreSQL's `jsonb` prints back; both must yield the same bytes, so the
//! canonical form depends only on the JSON value (key order, duplicate keys,
//! whitespace, string escapes and number spelling are normalised).
//!
//! [`canonical_text`] is the reference: serde_json parses the text into a
//! [`Value`], which is then written out. [`write_canonical_text`] and
//! [`Canonicalizer`] give the same bytes (and errors) in one pass over the
//! text, several times faster; use them where it counts, like `verify`.
//! The same pass also protects payloads on ingest (`scan.rs`, for
//! [`crate::protect::text`]).

use std::ops::Range;

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

mod scan;
pub(crate) use scan::{PathTrie, Slot, Substitute};

/// The `format` number written into every [`ChainRecord`].
pub const FORMAT_VERSION: u32 = 1;

/// The `prev` hash of a chain's first record.
pub const GENESIS: [u8; 32] = [0; 32];

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Why a value has no canonical form. All variants mean the input is at
/// fault: reject it, retrying will not help.
#[derive(Debug, thiserror::Error)]
pub enum CanonicalError {
    /// Not JSON, or nested deeper than serde_json's limit of 127 levels.
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A number literal that does not follow the JSON number grammar.
    #[error("invalid JSON number {literal:?}")]
    NumberSyntax { literal: String },
    /// A non-zero number whose normalised exponent does not fit an i64.
    #[error("number {literal:?} has an exponent outside the 64-bit range")]
    ExponentOutOfRange { literal: String },
}

/// Parses `json` and returns its canonical form. The result is itself JSON
/// with the same value, so it can be stored instead of the original.
pub fn canonical_text(json: &str) -> Result<String, CanonicalError> {
    let value: Value = serde_json::from_str(json)?;
    let mut out = Vec::with_capacity(json.len());
    write_value(&value, &mut out)?;
    // Invariant: the output is made of &str slices and ASCII only.
    Ok(String::from_utf8(out).expect("canonical JSON is UTF-8"))
}

/// Appends the canonical form of `value` to `out`. On error `out` is left
/// as it was.
pub fn write_value(value: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    let start = out.len();
    let result = write_any(value, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn write_any(value: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(n.as_str(), out)?,
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_any(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // Sort explicitly: a Map keeps insertion order if any crate in
            // the build enables serde_json's `preserve_order`.
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(key, out);
                out.push(b':');
                write_any(item, out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

/// Appends `s` as a canonical JSON string: only `"`, `\` and U+0000..U+001F
/// are escaped, everything else is raw UTF-8.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    write_str_bytes(s.as_bytes(), out);
}

/// Appends `s` as serde_json writes a string: the short escapes `\b \t \n
/// \f \r` where JSON has them, else `\u00` and lowercase hex.
pub(crate) fn write_str_serde(s: &str, out: &mut Vec<u8>) {
    write_str_bytes_as(true, s.as_bytes(), out);
}

/// [`write_str`] for the UTF-8 bytes of a string. Copies the runs between
/// bytes that need an escape in bulk.
fn write_str_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run_start = 0;
    loop {
        let i = find_special(bytes, run_start);
        out.extend_from_slice(&bytes[run_start..i]);
        let Some(&b) = bytes.get(i) else {
            break;
        };
        push_escaped_byte(b, out);
        run_start = i + 1;
    }
    out.push(b'"');
}

/// [`write_str_bytes`], or with serde_json's escapes when `compact`.
#[inline]
fn write_str_bytes_as(compact: bool, bytes: &[u8], out: &mut Vec<u8>) {
    if !compact {
        write_str_bytes(bytes, out);
        return;
    }
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run_start = 0;
    loop {
        let i = find_special(bytes, run_start);
        out.extend_from_slice(&bytes[run_start..i]);
        let Some(&b) = bytes.get(i) else {
            break;
        };
        push_compact_escaped_byte(b, out);
        run_start = i + 1;
    }
    out.push(b'"');
}

/// [`push_escaped_byte`], or serde_json's escape when `compact`.
#[inline]
fn escape_byte(compact: bool, b: u8, out: &mut Vec<u8>) {
    if compact {
        push_compact_escaped_byte(b, out);
    } else {
        push_escaped_byte(b, out);
    }
}

/// serde_json's escape of `"`, `\` or a control character: the short
/// forms `\b \t \n \f \r` where JSON has them, else `\u00` and
/// lowercase hex.
fn push_compact_escaped_byte(b: u8, out: &mut Vec<u8>) {
    let short = match b {
        b'"' => b'"',
        b'\\' => b'\\',
        0x08 => b'b',
        0x09 => b't',
        0x0a => b'n',
        0x0c => b'f',
        0x0d => b'r',
        _ => return push_escaped_byte(b, out),
    };
    out.extend_from_slice(&[b'\\', short]);
}

/// Appends the escape of `"`, `\` or a control character.
fn push_escaped_byte(b: u8, out: &mut Vec<u8>) {
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        _ => out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX[usize::from(b >> 4)],
            HEX[usize::from(b & 0xf)],
        ]),
    }
}

/// The index of the first byte at or after `from` that is `"`, `\` or below
/// 0x20 (the bytes a JSON string cannot hold raw), or `bytes.len()`.
#[inline]
fn find_special(bytes: &[u8], from: usize) -> usize {
    find_control_or(bytes, from, [b'"', b'\\'])
}

/// The index of the first byte at or after `from` that is below 0x20 or one
/// of `extra` (ASCII), or `bytes.len()`. Looks at eight bytes at a time.
#[inline]
pub(crate) fn find_control_or<const N: usize>(bytes: &[u8], from: usize, extra: [u8; N]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = from;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut lanes = [0u8; 8];
        lanes.copy_from_slice(chunk);
        // Byte k of the chunk is lane k (bits 8k..8k+8).
        let x = u64::from_le_bytes(lanes);
        // The classic "has a byte < n" and "has a zero byte" tests. A lane
        // can be flagged wrongly only above a lane that is rightly flagged
        // (borrows run upwards), so the lowest flagged lane is exact.
        let mut found = x.wrapping_sub(ONES * 0x20) & !x;
        for byte in extra {
            let y = x ^ (ONES * u64::from(byte));
            found |= y.wrapping_sub(ONES) & !y;
        }
        found &= HIGH;
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&b) = bytes.get(i) {
        if b < 0x20 || extra.contains(&b) {
            return i;
        }
        i += 1;
    }
    i
}

/// Appends the canonical form of the JSON text `json` to `out`: the same
/// bytes as [`canonical_text`] (and the same error when there are none),
/// in one pass over the text without building a [`Value`]. On error `out`
/// is left as it was.
///
/// Uses a per-thread [`Canonicalizer`]; hold one yourself to choose where
/// its scratch space lives.
/// True when an object in `json` starts with one of serde_json's private
/// keys (after unescaping): serde_json would read it as a number or as raw
/// JSON, not as the object the producer sent. Such input must be refused.
pub fn uses_private_keys(json: &str) -> bool {
    let mut canonicalizer = Canonicalizer::new();
    let mut out = Vec::new();
    matches!(
        canonicalizer.single_pass(json, &mut out),
        Err(Stop::PrivateKey)
    )
}

pub fn write_canonical_text(json: &str, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Canonicalizer> =
            std::cell::RefCell::new(Canonicalizer::new());
    }
    // The scratch is unavailable only while the thread exits: then a fresh
    // one does the job.
    SCRATCH
        .try_with(|cell| {
            cell.try_borrow_mut()
                .ok()
                .map(|mut scratch| scratch.canonicalize(json, out))
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| Canonicalizer::new().canonicalize(json, out))
}

/// Scratch space for writing canonical JSON straight from JSON text, kept
/// between calls so that a warmed-up canonicaliser does not allocate.
///
/// Values are written to the output as they are read. An object's members
/// are written in the order of the text, each as `"key":value`, and only
/// if their keys are not already strictly ascending are they moved aside
/// and copied back sorted, without the earlier of any duplicate keys.
#[derive(Debug, Default)]
pub struct Canonicalizer {
    /// The members of the objects being written, innermost object last.
    members: Vec<Member>,
    /// The decoded keys that were written with escapes, innermost last.
    keys: Vec<u8>,
    /// An object's members while they are copied back in key order.
    moved: Vec<u8>,
    /// Where a scan's sorted members went ([`Canonicalizer::scan`]).
    moves: Vec<usize>,
}

/// Scratch buffers larger than this are released after use.
const KEEP_SCRATCH: usize = 1 << 20;

/// serde_json's recursion limit: it refuses the 128th nested level.
const MAX_DEPTH: u32 = 128;

/// Keys that make serde_json read an object as a number or as embedded
/// JSON text when it is deserialised into a [`Value`] (with the
/// `arbitrary_precision` and `raw_value` features), when they come first.
const PRIVATE_NUMBER_KEY: &[u8] = b"$serde_json::private::Number";
const PRIVATE_RAW_VALUE_KEY: &[u8] = b"$serde_json::private::RawValue";

/// One object member written to the output.
#[derive(Debug, Clone, Copy)]
struct Member {
    /// The decoded key: `key_start..key_end` of the JSON text, or of
    /// [`Canonicalizer::keys`] when `key_decoded`.
    key_start: usize,
    key_end: usize,
    key_decoded: bool,
    /// The key's first 8 bytes, big-endian, zero-padded: ordered like the
    /// keys unless equal, which spares most comparisons a call to memcmp.
    key_prefix: u64,
    /// `"key":value` in the output.
    start: usize,
    end: usize,
    /// The value holds a number with no canonical form.
    poisoned: bool,
}

impl Member {
    fn key<'a>(&self, text: &'a [u8], keys: &'a [u8]) -> &'a [u8] {
        let source = if self.key_decoded { keys } else { text };
        &source[self.key_start..self.key_end]
    }

    /// Bytewise order of the keys.
    #[inline]
    fn cmp_key(&self, other: &Member, text: &[u8], keys: &[u8]) -> std::cmp::Ordering {
        self.key_prefix
            .cmp(&other.key_prefix)
            .then_with(|| self.key(text, keys).cmp(other.key(text, keys)))
    }
}

/// The first 8 bytes of `source[start..end]`, big-endian, zero-padded.
#[inline]
fn key_prefix(source: &[u8], start: usize, end: usize) -> u64 {
    let len = end - start;
    if let Some(chunk) = source.get(start..start + 8) {
        let mut lanes = [0u8; 8];
        lanes.copy_from_slice(chunk);
        let x = u64::from_be_bytes(lanes);
        if len >= 8 {
            x
        } else {
            // Keep the first `len` bytes (none when len is 0).
            x & !(u64::MAX >> (8 * len))
        }
    } else {
        let mut lanes = [0u8; 8];
        for (lane, &b) in lanes.iter_mut().zip(&source[start..end]) {
            *lane = b;
        }
        u64::from_be_bytes(lanes)
    }
}

/// Why the single pass gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Not one JSON text, or nested 128 levels deep.
    Syntax,
    /// A number in the value has an exponent outside the 64-bit range.
    Range,
    /// An object starts with one of serde_json's private keys.
    PrivateKey,
    /// An object has the key a scan refuses ([`Canonicalizer::scan`]).
    RefusedKey,
}

impl Canonicalizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the canonical form of `json` to `out`; see
    /// [`write_canonical_text`]. On error `out` is left as it was.
    pub fn canonicalize(&mut self, json: &str, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
        let start = out.len();
        let result = self.single_pass(json, out);
        self.release_large_scratch();
        if result.is_ok() {
            return Ok(());
        }
        // Invalid input, or a private key (which no event has in practice):
        // the reference implementation decides, so the error or the output
        // is exactly its own. Costs a second parse of a rejected text.
        out.truncate(start);
        let text = canonical_text(json)?;
        out.extend_from_slice(text.as_bytes());
        Ok(())
    }

    /// The canonical form in one pass, or why there is none (or, for
    /// [`Stop::PrivateKey`], why this pass cannot tell). Leaves garbage in
    /// `out` on error.
    fn single_pass(&mut self, json: &str, out: &mut Vec<u8>) -> Result<(), Stop> {
        self.members.clear();
        self.keys.clear();
        out.reserve(json.len() + 16);
        let mut pass = Pass {
            text: json,
            src: json.as_bytes(),
            pos: 0,
            members: &mut self.members,
            keys: &mut self.keys,
            moved: &mut self.moved,
            out,
            hooks: (),
        };
        pass.skip_ws();
        let poisoned = pass.value(0, OFF_PATH)?;
        pass.skip_ws();
        if pass.pos != pass.src.len() {
            return Err(Stop::Syntax);
        }
        if poisoned {
            return Err(Stop::Range);
        }
        Ok(())
    }

    fn release_large_scratch(&mut self) {
        if self.moved.capacity() > KEEP_SCRATCH {
            self.moved = Vec::new();
        }
        if self.keys.capacity() > KEEP_SCRATCH {
            self.keys = Vec::new();
        }
        if self.members.capacity() * std::mem::size_of::<Member>() > KEEP_SCRATCH {
            self.members = Vec::new();
        }
        if self.moves.capacity() * std::mem::size_of::<usize>() > KEEP_SCRATCH {
            self.moves = Vec::new();
        }
    }
}

/// The trie node of a value no recorded path goes through.
const OFF_PATH: u32 = u32::MAX;

/// What a [`Pass`] does besides writing canonical JSON: nothing for the
/// plain pass (`()`, whose checks compile away), recording where the values
/// at some paths are ([`Canonicalizer::scan`]), or writing serde_json's
/// compact form ([`Canonicalizer::compact`]).
trait Hooks {
    /// Write serde_json's compact form (`serde_json::to_writer` of the
    /// parsed `Value`) instead of canonical JSON: same key order and
    /// duplicates, serde_json's string escapes, numbers as serde_json keeps
    /// them with `arbitrary_precision`.
    const COMPACT: bool = false;
    /// Follow paths: `member`, `element`, `records`, `record` and the moves.
    const PATHS: bool = false;

    /// The node of member `key` (decoded) under `node`; may refuse the key.
    fn member(&mut self, _node: u32, _key: &[u8]) -> Result<u32, Stop> {
        Ok(OFF_PATH)
    }
    /// The node of element `index` of the array at `node`.
    fn element(&self, _node: u32, _index: usize) -> u32 {
        OFF_PATH
    }
    /// Whether the value at `node` (not `OFF_PATH`) is recorded.
    fn records(&self, _node: u32) -> bool {
        false
    }
    /// The value at `node` is `src` in the text and `out` in the output.
    fn record(&mut self, _node: u32, _src: Range<usize>, _out: Range<usize>) {}
    /// How many values were recorded so far.
    fn recorded(&self) -> usize {
        0
    }
    /// An object with recorded values is being rewritten in key order; its
    /// members (in key order) follow: `Some(new start)` or `None` (dropped).
    fn begin_moves(&mut self) {}
    fn member_moved(&mut self, _to: Option<usize>) {}
    /// Applies the moves to the values recorded since `from`, inside the
    /// `members` (in key order, at their old places).
    fn apply_moves(&mut self, _from: usize, _members: &[Member]) {}
    /// For the value at `pos`: the bytes to write instead, and where it ends.
    fn substitute(&self, _pos: usize) -> Option<(&[u8], usize)> {
        None
    }
}

impl Hooks for () {}

/// One run of [`Canonicalizer::single_pass`]: a recursive descent parser
/// that writes as it reads. Its methods return whether the value they wrote
/// is poisoned by a number without canonical form: that is an error only if
/// the value survives (a later duplicate key can drop it), as it is for
/// [`canonical_text`], which parses before it writes.
struct Pass<'a, 'b, H: Hooks> {
    text: &'a str,
    src: &'a [u8],
    pos: usize,
    members: &'b mut Vec<Member>,
    keys: &'b mut Vec<u8>,
    moved: &'b mut Vec<u8>,
    out: &'b mut Vec<u8>,
    hooks: H,
}

impl<H: Hooks> Pass<'_, '_, H> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    #[inline]
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// A value at `pos` (whitespace skipped), inside `depth` arrays and
    /// objects, at trie node `node` of the hooks.
    fn value(&mut self, depth: u32, node: u32) -> Result<bool, Stop> {
        if H::COMPACT {
            if let Some((bytes, end)) = self.hooks.substitute(self.pos) {
                self.out.extend_from_slice(bytes);
                self.pos = end;
                return Ok(false);
            }
        }
        if H::PATHS && node != OFF_PATH && self.hooks.records(node) {
            let (src, out) = (self.pos, self.out.len());
            let poisoned = self.bare_value(depth, node)?;
            self.hooks.record(node, src..self.pos, out..self.out.len());
            return Ok(poisoned);
        }
        self.bare_value(depth, node)
    }

    fn bare_value(&mut self, depth: u32, node: u32) -> Result<bool, Stop> {
        match self.peek() {
            Some(b'"') => {
                self.pos += 1;
                self.string()?;
                Ok(false)
            }
            Some(b'{') => self.object(depth + 1, node),
            Some(b'[') => self.array(depth + 1, node),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            _ => Err(Stop::Syntax),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<bool, Stop> {
        if self.src.get(self.pos..self.pos + word.len()) != Some(word) {
            return Err(Stop::Syntax);
        }
        self.pos += word.len();
        self.out.extend_from_slice(word);
        Ok(false)
    }

    fn number(&mut self) -> Result<bool, Stop> {
        let src = self.src;
        let digits_from = |mut i: usize| {
            while let Some(b'0'..=b'9') = src.get(i) {
                i += 1;
            }
            i
        };
        let start = self.pos;
        let negative = src.get(start) == Some(&b'-');
        let int_start = start + usize::from(negative);
        let int_end = match src.get(int_start) {
            Some(b'0') => int_start + 1,
            Some(b'1'..=b'9') => digits_from(int_start + 1),
            _ => return Err(Stop::Syntax),
        };
        let mut i = int_end;
        let mut frac = &src[i..i];
        if src.get(i) == Some(&b'.') {
            let end = digits_from(i + 1);
            if end == i + 1 {
                return Err(Stop::Syntax);
            }
            frac = &src[i + 1..end];
            i = end;
        }
        if let Some(b'e' | b'E') = src.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = src.get(i) {
                i += 1;
            }
            let end = digits_from(i);
            if end == i {
                return Err(Stop::Syntax);
            }
            self.pos = end;
            if H::COMPACT {
                // serde_json spells the exponent `e`, with its sign.
                let marker = int_end + if frac.is_empty() { 0 } else { frac.len() + 1 };
                self.out.extend_from_slice(&src[start..marker]);
                self.out.push(b'e');
                match src.get(marker + 1) {
                    Some(&sign @ (b'+' | b'-')) => self.out.push(sign),
                    _ => self.out.push(b'+'),
                }
                self.out.extend_from_slice(&src[i..end]);
                return Ok(false);
            }
            // start and end are next to ASCII bytes, so on char boundaries.
            return match write_number(&self.text[start..end], self.out) {
                Ok(()) => Ok(false),
                Err(CanonicalError::ExponentOutOfRange { .. }) => Ok(true),
                Err(_) => Err(Stop::Syntax),
            };
        }
        self.pos = i;
        if H::COMPACT {
            self.out.extend_from_slice(&src[start..i]);
            return Ok(false);
        }
        // No exponent (as PostgreSQL prints numbers): write_number's rules,
        // with the exponent known to be small.
        let int = &src[int_start..int_end];
        let frac_kept = trim_end_zeros(frac);
        if frac_kept.is_empty() {
            let digits = trim_end_zeros(int);
            if digits.is_empty() {
                self.out.push(b'0');
                return Ok(false);
            }
            if negative {
                self.out.push(b'-');
            }
            self.out.extend_from_slice(digits);
            if digits.len() < int.len() {
                self.out.push(b'e');
                push_usize(int.len() - digits.len(), self.out);
            }
        } else {
            if negative {
                self.out.push(b'-');
            }
            if int == b"0" {
                let first = frac_kept.iter().position(|&d| d != b'0').unwrap_or(0);
                self.out.extend_from_slice(&frac_kept[first..]);
            } else {
                self.out.extend_from_slice(int);
                self.out.extend_from_slice(frac_kept);
            }
            self.out.extend_from_slice(b"e-");
            push_usize(frac_kept.len(), self.out);
        }
        Ok(false)
    }

    /// A string value; `pos` is past the opening quote.
    fn string(&mut self) -> Result<(), Stop> {
        let stop = find_special(self.src, self.pos);
        if self.src.get(stop) == Some(&b'"') {
            // Nothing to decode or escape: copy it with its quotes.
            self.out.extend_from_slice(&self.src[self.pos - 1..=stop]);
            self.pos = stop + 1;
            return Ok(());
        }
        self.out.push(b'"');
        loop {
            let stop = find_special(self.src, self.pos);
            self.out.extend_from_slice(&self.src[self.pos..stop]);
            match self.src.get(stop) {
                Some(b'"') => {
                    self.pos = stop + 1;
                    self.out.push(b'"');
                    return Ok(());
                }
                Some(b'\\') => {
                    self.pos = stop + 1;
                    let c = self.escape()?;
                    if c < '\u{80}' && (c < '\u{20}' || c == '"' || c == '\\') {
                        // The checks above make the cast lossless.
                        escape_byte(H::COMPACT, c as u8, self.out);
                    } else {
                        push_char(c, self.out);
                    }
                }
                // A raw control character, or the end of the text.
                _ => return Err(Stop::Syntax),
            }
        }
    }

    /// A key; `pos` is past its opening quote. Writes it as a canonical
    /// string and returns the decoded key: a range of the text when it has
    /// no escapes, else a range of `keys`.
    fn key(&mut self) -> Result<(usize, usize, bool), Stop> {
        let start = self.pos;
        let stop = find_special(self.src, start);
        match self.src.get(stop) {
            Some(b'"') => {
                // Nothing to decode or escape: copy it with its quotes.
                self.pos = stop + 1;
                self.out.extend_from_slice(&self.src[start - 1..=stop]);
                Ok((start, stop, false))
            }
            Some(b'\\') => {
                let key_start = self.keys.len();
                self.keys.extend_from_slice(&self.src[start..stop]);
                self.pos = stop + 1;
                loop {
                    let c = self.escape()?;
                    push_char(c, self.keys);
                    let stop = find_special(self.src, self.pos);
                    self.keys.extend_from_slice(&self.src[self.pos..stop]);
                    match self.src.get(stop) {
                        Some(b'"') => {
                            self.pos = stop + 1;
                            break;
                        }
                        Some(b'\\') => self.pos = stop + 1,
                        _ => return Err(Stop::Syntax),
                    }
                }
                let key_end = self.keys.len();
                write_str_bytes_as(H::COMPACT, &self.keys[key_start..key_end], self.out);
                Ok((key_start, key_end, true))
            }
            _ => Err(Stop::Syntax),
        }
    }

    /// The character of an escape; `pos` is past its backslash. Surrogates
    /// must come in pairs, as serde_json and PostgreSQL require.
    fn escape(&mut self) -> Result<char, Stop> {
        let b = self.peek().ok_or(Stop::Syntax)?;
        self.pos += 1;
        let c = match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let unit = self.hex4()?;
                let scalar = match unit {
                    0xD800..=0xDBFF => {
                        if self.src.get(self.pos..self.pos + 2) != Some(b"\\u") {
                            return Err(Stop::Syntax);
                        }
                        self.pos += 2;
                        let low = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return Err(Stop::Syntax);
                        }
                        0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                    }
                    _ => unit,
                };
                // None for a lone trailing surrogate.
                return char::from_u32(scalar).ok_or(Stop::Syntax);
            }
            _ => return Err(Stop::Syntax),
        };
        Ok(c)
    }

    fn hex4(&mut self) -> Result<u32, Stop> {
        let digits = self.src.get(self.pos..self.pos + 4).ok_or(Stop::Syntax)?;
        let mut unit = 0;
        for &d in digits {
            let value = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return Err(Stop::Syntax),
            };
            unit = unit << 4 | u32::from(value);
        }
        self.pos += 4;
        Ok(unit)
    }

    fn array(&mut self, depth: u32, node: u32) -> Result<bool, Stop> {
        if depth >= MAX_DEPTH {
            return Err(Stop::Syntax);
        }
        self.pos += 1;
        self.out.push(b'[');
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            self.out.push(b']');
            return Ok(false);
        }
        let mut poisoned = false;
        let mut index = 0;
        loop {
            let child = if H::PATHS && node != OFF_PATH {
                self.hooks.element(node, index)
            } else {
                OFF_PATH
            };
            index += 1;
            poisoned |= self.value(depth, child)?;
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.out.push(b',');
                    self.skip_ws();
                }
                Some(b']') => {
                    self.pos += 1;
                    self.out.push(b']');
                    return Ok(poisoned);
                }
                _ => return Err(Stop::Syntax),
            }
        }
    }

    fn object(&mut self, depth: u32, node: u32) -> Result<bool, Stop> {
        if depth >= MAX_DEPTH {
            return Err(Stop::Syntax);
        }
        self.pos += 1;
        let open = self.out.len();
        self.out.push(b'{');
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            self.out.push(b'}');
            return Ok(false);
        }
        let base = self.members.len();
        let keys_base = self.keys.len();
        let recorded_base = self.hooks.recorded();
        let mut ascending = true;
        loop {
            if self.peek() != Some(b'"') {
                return Err(Stop::Syntax);
            }
            self.pos += 1;
            let start = self.out.len();
            let (key_start, key_end, key_decoded) = self.key()?;
            let key_prefix = if key_decoded {
                key_prefix(self.keys, key_start, key_end)
            } else {
                key_prefix(self.src, key_start, key_end)
            };
            let member = Member {
                key_start,
                key_end,
                key_decoded,
                key_prefix,
                start,
                end: start,
                poisoned: false,
            };
            match self.members[base..].last() {
                None => {
                    let key = member.key(self.src, self.keys);
                    if key == PRIVATE_NUMBER_KEY || key == PRIVATE_RAW_VALUE_KEY {
                        return Err(Stop::PrivateKey);
                    }
                }
                Some(previous) => {
                    if ascending && previous.cmp_key(&member, self.src, self.keys).is_ge() {
                        ascending = false;
                    }
                }
            }
            let child = if H::PATHS {
                self.hooks.member(node, member.key(self.src, self.keys))?
            } else {
                OFF_PATH
            };
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(Stop::Syntax);
            }
            self.pos += 1;
            self.out.push(b':');
            self.skip_ws();
            let poisoned = self.value(depth, child)?;
            // Built whole here: the CPU forwards one wide store better than
            // fields updated one by one.
            self.members.push(Member {
                end: self.out.len(),
                poisoned,
                ..member
            });
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.out.push(b',');
                    self.skip_ws();
                }
                Some(b'}') => {
                    self.pos += 1;
                    break;
                }
                _ => return Err(Stop::Syntax),
            }
        }
        let poisoned = if ascending {
            // Already in canonical order, and no duplicates.
            self.out.push(b'}');
            self.members[base..].iter().any(|m| m.poisoned)
        } else {
            self.sort_members(open, base, recorded_base)
        };
        self.members.truncate(base);
        self.keys.truncate(keys_base);
        Ok(poisoned)
    }

    /// Rewrites the members of the object that opens at `open` (those from
    /// `base` on) in key order, keeping only the last of equal keys, and
    /// closes it; values recorded since `recorded_base` move along. Returns
    /// whether a kept member is poisoned.
    fn sort_members(&mut self, open: usize, base: usize, recorded_base: usize) -> bool {
        let (src, keys) = (self.src, &**self.keys);
        let members = &mut self.members[base..];
        // Equal keys stay in text order, so the last one is kept.
        members.sort_unstable_by(|a, b| a.cmp_key(b, src, keys).then(a.start.cmp(&b.start)));
        let body = open + 1;
        self.moved.clear();
        self.moved.extend_from_slice(&self.out[body..]);
        self.out.truncate(body);
        let track = H::PATHS && self.hooks.recorded() > recorded_base;
        if track {
            self.hooks.begin_moves();
        }
        let mut poisoned = false;
        let mut first = true;
        for (i, member) in members.iter().enumerate() {
            if let Some(next) = members.get(i + 1) {
                if next.cmp_key(member, src, keys).is_eq() {
                    if track {
                        self.hooks.member_moved(None);
                    }
                    continue;
                }
            }
            if !first {
                self.out.push(b',');
            }
            first = false;
            poisoned |= member.poisoned;
            if track {
                self.hooks.member_moved(Some(self.out.len()));
            }
            self.out
                .extend_from_slice(&self.moved[member.start - body..member.end - body]);
        }
        self.out.push(b'}');
        if track {
            self.hooks.apply_moves(recorded_base, &self.members[base..]);
        }
        poisoned
    }
}

/// `digits` without its trailing zeros.
#[inline]
fn trim_end_zeros(digits: &[u8]) -> &[u8] {
    let kept = digits
        .iter()
        .rposition(|&d| d != b'0')
        .map_or(0, |last| last + 1);
    &digits[..kept]
}

fn push_usize(n: usize, out: &mut Vec<u8>) {
    let mut buf = [0u8; 20];
    // usize is at most 64 bits wide.
    out.extend_from_slice(decimal(n as u64, &mut buf));
}

/// Appends `c` as UTF-8.
#[inline]
fn push_char(c: char, out: &mut Vec<u8>) {
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

/// Appends the canonical form of a JSON number literal: `0`, or an optional
/// `-`, the significant digits without leading or trailing zeros, and
/// `e<exponent>` unless the exponent is 0. Works on the text, so any
/// precision is exact, and never allocates in proportion to the exponent.
pub fn write_number(literal: &str, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    let Some(parts) = split_number(literal) else {
        return Err(CanonicalError::NumberSyntax {
            literal: shorten(literal),
        });
    };
    let Some((head, tail, shift)) = significand(parts.int, parts.frac) else {
        // Zero in any spelling, whatever its exponent.
        out.push(b'0');
        return Ok(());
    };
    let out_of_range = || CanonicalError::ExponentOutOfRange {
        literal: shorten(literal),
    };
    // |exponent| < 2^127 and |shift| <= the literal's length, so an i128
    // holds the sum; it must then fit an i64.
    let exponent = parse_exponent(parts.exp).ok_or_else(out_of_range)?;
    let exponent = exponent
        .checked_add(shift)
        .and_then(|e| i64::try_from(e).ok())
        .ok_or_else(out_of_range)?;
    if parts.negative {
        out.push(b'-');
    }
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(tail.as_bytes());
    if exponent != 0 {
        out.push(b'e');
        push_i64(exponent, out);
    }
    Ok(())
}

/// A number literal split along the JSON grammar
/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
struct NumberParts<'a> {
    negative: bool,
    int: &'a str,
    frac: &'a str,
    /// The exponent's sign and digits, without the `e`.
    exp: &'a str,
}

fn split_number(literal: &str) -> Option<NumberParts<'_>> {
    let (negative, rest) = match literal.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, literal),
    };
    let int_len = digit_run(rest);
    let int = &rest[..int_len];
    if int.is_empty() || (int.len() > 1 && int.starts_with('0')) {
        return None;
    }
    let mut rest = &rest[int_len..];
    let mut frac = "";
    if let Some(after_dot) = rest.strip_prefix('.') {
        let len = digit_run(after_dot);
        if len == 0 {
            return None;
        }
        frac = &after_dot[..len];
        rest = &after_dot[len..];
    }
    let mut exp = "";
    if let Some(after_e) = rest.strip_prefix(['e', 'E']) {
        let unsigned = after_e.strip_prefix(['+', '-']).unwrap_or(after_e);
        let len = digit_run(unsigned);
        if len == 0 || len != unsigned.len() {
            return None;
        }
        exp = after_e;
        rest = "";
    }
    if !rest.is_empty() {
        return None;
    }
    Some(NumberParts {
        negative,
        int,
        frac,
        exp,
    })
}

fn digit_run(s: &str) -> usize {
    s.bytes().take_while(u8::is_ascii_digit).count()
}

/// The significant digits of `int.frac` as two slices to concatenate, and
/// the amount to add to the literal's exponent; `None` for zero.
fn significand<'a>(int: &'a str, frac: &'a str) -> Option<(&'a str, &'a str, i128)> {
    let int = int.trim_start_matches('0');
    let frac_kept = frac.trim_end_matches('0');
    if !frac_kept.is_empty() {
        // The last significant digit is in the fraction.
        let shift = -to_i128(frac_kept.len());
        if int.is_empty() {
            return Some(("", frac_kept.trim_start_matches('0'), shift));
        }
        return Some((int, frac_kept, shift));
    }
    let digits = int.trim_end_matches('0');
    if digits.is_empty() {
        return None;
    }
    Some((digits, "", to_i128(int.len() - digits.len())))
}

fn to_i128(n: usize) -> i128 {
    // Lossless: usize is at most 64 bits wide.
    n as i128
}

/// The value of an exponent's `[+-]?[0-9]*` text (empty is 0), or `None`
/// when it overflows an i128.
fn parse_exponent(exp: &str) -> Option<i128> {
    let (negative, digits) = match exp.as_bytes().first() {
        Some(b'-') => (true, &exp[1..]),
        Some(b'+') => (false, &exp[1..]),
        _ => (false, exp),
    };
    let mut value: i128 = 0;
    for d in digits.bytes() {
        value = value.checked_mul(10)?.checked_add(i128::from(d - b'0'))?;
    }
    Some(if negative { -value } else { value })
}

fn shorten(literal: &str) -> String {
    const MAX: usize = 64;
    if literal.len() <= MAX {
        return literal.to_string();
    }
    // Number literals are ASCII, but the caller's text may not be.
    let mut end = MAX;
    while !literal.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &literal[..end])
}

/// The decimal digits of `n`, in the tail of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        // n % 10 < 10, so the cast cannot truncate.
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

pub(crate) fn push_i64(n: i64, out: &mut Vec<u8>) {
    if n < 0 {
        out.push(b'-');
    }
    let mut buf = [0u8; 20];
    out.extend_from_slice(decimal(n.unsigned_abs(), &mut buf));
}

/// An integer as a canonical number (trailing zeros become the exponent:
/// 1200 is `12e2`), so that encoded records are canonical JSON too.
fn write_int(negative: bool, magnitude: u64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 20];
    let digits = decimal(magnitude, &mut buf);
    let kept = match digits.iter().rposition(|&d| d != b'0') {
        Some(last) => &digits[..=last],
        None => {
            out.push(b'0');
            return;
        }
    };
    if negative {
        out.push(b'-');
    }
    out.extend_from_slice(kept);
    let zeros = digits.len() - kept.len();
    if zeros > 0 {
        out.push(b'e');
        out.extend_from_slice(decimal(zeros as u64, &mut buf));
    }
}

/// One stored event as the hash chain sees it (encoding v1).
/// For [`ChainRecord::encode`], `headers`, `metadata` and `payload` must
/// already be canonical JSON text ([`canonical_text`]); they are embedded
/// verbatim. [`ChainRecord::encode_canonicalizing`] takes any JSON text.
#[derive(Debug, Clone, Copy)]
pub struct ChainRecord<'a> {
    pub chain_id: &'a str,
    pub position: u64,
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub stream_id: &'a str,
    pub stream_version: Option<i64>,
    pub occurred_at: DateTime<Utc>,
    pub ingested_at: DateTime<Utc>,
    pub source: Option<&'a str>,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub subject_id: Option<&'a str>,
    pub kafka_topic: Option<&'a str>,
    pub kafka_partition: Option<i32>,
    pub kafka_offset: Option<i64>,
    pub headers: &'a str,
    pub metadata: Option<&'a str>,
    pub payload: &'a str,
    pub blind_index: &'a [String],
    pub content_hash: &'a [u8; 32],
}

/// The JSON columns of a [`ChainRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonField {
    Headers,
    Metadata,
    Payload,
}

impl JsonField {
    pub fn name(self) -> &'static str {
        match self {
            JsonField::Headers => "headers",
            JsonField::Metadata => "metadata",
            JsonField::Payload => "payload",
        }
    }
}

impl ChainRecord<'_> {
    /// Appends the record's canonical JSON object: keys in bytewise order,
    /// absent values as `null`. Written straight into `out`: this runs for
    /// every ingested event.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let verbatim = |_: JsonField, json: &str, out: &mut Vec<u8>| {
            out.extend_from_slice(json.as_bytes());
            Ok::<(), std::convert::Infallible>(())
        };
        match self.encode_with(out, verbatim) {
            Ok(()) => {}
            Err(never) => match never {},
        }
    }

    /// Appends the same bytes as [`ChainRecord::encode`] would for the
    /// canonical forms of `headers`, `metadata` and `payload`, which here
    /// may be any JSON text (as PostgreSQL prints `jsonb`): each is
    /// canonicalised straight into `out`, with no intermediate string.
    /// On error `out` holds a partial record.
    pub fn encode_canonicalizing(
        &self,
        canonicalizer: &mut Canonicalizer,
        out: &mut Vec<u8>,
    ) -> Result<(), (JsonField, CanonicalError)> {
        self.encode_with(out, |field, json, out| {
            canonicalizer
                .canonicalize(json, out)
                .map_err(|e| (field, e))
        })
    }

    /// The encoding, with `json` writing each JSON column.
    #[inline]
    fn encode_with<E>(
        &self,
        out: &mut Vec<u8>,
        mut json: impl FnMut(JsonField, &str, &mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        out.extend_from_slice(b"{\"blind_index\":[");
        for (i, entry) in self.blind_index.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(entry, out);
        }
        out.extend_from_slice(b"],\"causation_id\":");
        write_opt_uuid(self.causation_id, out);
        out.extend_from_slice(b",\"chain_id\":");
        write_str(self.chain_id, out);
        out.extend_from_slice(b",\"content_hash\":\"");
        for &byte in self.content_hash {
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0xf)]);
        }
        out.extend_from_slice(b"\",\"correlation_id\":");
        write_opt_uuid(self.correlation_id, out);
        out.extend_from_slice(b",\"event_id\":");
        write_uuid(self.event_id, out);
        out.extend_from_slice(b",\"event_type\":");
        write_str(self.event_type, out);
        out.extend_from_slice(b",\"format\":");
        write_int(false, u64::from(FORMAT_VERSION), out);
        out.extend_from_slice(b",\"headers\":");
        json(JsonField::Headers, self.headers, out)?;
        out.extend_from_slice(b",\"ingested_at\":");
        write_timestamp(self.ingested_at, out);
        out.extend_from_slice(b",\"kafka_offset\":");
        write_opt_i64(self.kafka_offset, out);
        out.extend_from_slice(b",\"kafka_partition\":");
        write_opt_i64(self.kafka_partition.map(i64::from), out);
        out.extend_from_slice(b",\"kafka_topic\":");
        write_opt_str(self.kafka_topic, out);
        out.extend_from_slice(b",\"metadata\":");
        match self.metadata {
            Some(metadata) => json(JsonField::Metadata, metadata, out)?,
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"occurred_at\":");
        write_timestamp(self.occurred_at, out);
        out.extend_from_slice(b",\"payload\":");
        json(JsonField::Payload, self.payload, out)?;
        out.extend_from_slice(b",\"position\":");
        write_int(false, self.position, out);
        out.extend_from_slice(b",\"source\":");
        write_opt_str(self.source, out);
        out.extend_from_slice(b",\"stream_id\":");
        write_str(self.stream_id, out);
        out.extend_from_slice(b",\"stream_version\":");
        write_opt_i64(self.stream_version, out);
        out.extend_from_slice(b",\"subject_id\":");
        write_opt_str(self.subject_id, out);
        out.push(b'}');
        Ok(())
    }
}

/// The chain hash of a record: SHA-256(prev || record bytes).
pub fn chain_hash(prev: &[u8; 32], record: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(prev)
        .chain_update(record)
        .finalize()
        .into()
}

fn write_opt_str(value: Option<&str>, out: &mut Vec<u8>) {
    match value {
        Some(s) => write_str(s, out),
        None => out.extend_from_slice(b"null"),
    }
}

fn write_opt_i64(value: Option<i64>, out: &mut Vec<u8>) {
    match value {
        Some(n) => write_int(n < 0, n.unsigned_abs(), out),
        None => out.extend_from_slice(b"null"),
    }
}

pub(crate) fn write_uuid(id: Uuid, out: &mut Vec<u8>) {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.push(b'"');
    out.extend_from_slice(id.hyphenated().encode_lower(&mut buf).as_bytes());
    out.push(b'"');
}

pub(crate) fn write_opt_uuid(id: Option<Uuid>, out: &mut Vec<u8>) {
    match id {
        Some(id) => write_uuid(id, out),
        None => out.extend_from_slice(b"null"),
    }
}

/// `"YYYY-MM-DDTHH:MM:SS.ffffffZ"`, truncated to the microsecond that
/// PostgreSQL stores. Goes through the microsecond count, as sqlx does when
/// it binds the value, so a leap second encodes as the instant PostgreSQL
/// keeps (the next second).
fn write_timestamp(at: DateTime<Utc>, out: &mut Vec<u8>) {
    // Invariant: the microsecond count of a valid DateTime is one too.
    let at = DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at);
    out.push(b'"');
    write_year(at.year(), out);
    out.push(b'-');
    push_padded(at.month(), 2, out);
    out.push(b'-');
    push_padded(at.day(), 2, out);
    out.push(b'T');
    push_padded(at.hour(), 2, out);
    out.push(b':');
    push_padded(at.minute(), 2, out);
    out.push(b':');
    push_padded(at.second(), 2, out);
    out.push(b'.');
    push_padded(at.timestamp_subsec_micros(), 6, out);
    out.extend_from_slice(b"Z\"");
}

/// Four digits for years 0000..=9999; outside that, ISO 8601's expanded
/// form: a sign and at least four digits (year 0 is 1 BC).
fn write_year(year: i32, out: &mut Vec<u8>) {
    if year < 0 {
        out.push(b'-');
    } else if year > 9999 {
        out.push(b'+');
    }
    push_padded(year.unsigned_abs(), 4, out);
}

fn push_padded(n: u32, width: usize, out: &mut Vec<u8>) {
    let mut buf = [0u8; 20];
    let digits = decimal(u64::from(n), &mut buf);
    for _ in digits.len()..width {
        out.push(b'0');
    }
    out.extend_from_slice(digits);
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// The canonical form by the reference implementation, after checking
    /// that the single pass agrees.
    fn canon(json: &str) -> String {
        let expected = canonical_text(json).unwrap();
        assert_eq!(
            single(json),
            Ok(expected.clone()),
            "single pass of {json:?}"
        );
        assert_eq!(fast(json), Ok(expected.clone()), "fast path of {json:?}");
        expected
    }

    /// [`write_canonical_text`], with its error as text.
    fn fast(json: &str) -> Result<String, String> {
        let mut out = Vec::new();
        write_canonical_text(json, &mut out).map_err(|e| e.to_string())?;
        Ok(String::from_utf8(out).unwrap())
    }

    /// The single pass alone, without the fallback to `canonical_text`.
    fn single(json: &str) -> Result<String, Stop> {
        let mut out = Vec::new();
        Canonicalizer::new().single_pass(json, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    fn number(literal: &str) -> String {
        let mut out = Vec::new();
        write_number(literal, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn literals() {
        assert_eq!(canon(" true "), "true");
        assert_eq!(canon("false"), "false");
        assert_eq!(canon("\tnull\r\n"), "null");
    }

    #[test]
    fn numbers_keep_their_exact_value() {
        let cases = [
            ("7", "7"),
            ("-7", "-7"),
            ("100", "1e2"),
            ("1.50", "15e-1"),
            ("-0.0015", "-15e-4"),
            ("1E+2", "1e2"),
            ("1e2", "1e2"),
            ("1e-2", "1e-2"),
            ("1.0e+0002", "1e2"),
            ("10e-1", "1"),
            ("0.1", "1e-1"),
            ("120.0340", "120034e-3"),
            ("1000.001", "1000001e-3"),
            ("12345678901234567890123", "12345678901234567890123"),
            ("123456789012345678901230", "12345678901234567890123e1"),
            ("0.000000000000000000000000000001", "1e-30"),
            ("1e9223372036854775807", "1e9223372036854775807"),
            ("10e9223372036854775806", "1e9223372036854775807"),
            ("1e-9223372036854775808", "1e-9223372036854775808"),
            ("0.1e-9223372036854775807", "1e-9223372036854775808"),
            // The literal's exponent overflows an i64, the adjusted one not.
            ("0.1e9223372036854775808", "1e9223372036854775807"),
            ("1e-00", "1"),
            ("-1E-0", "-1"),
        ];
        for (literal, expected) in cases {
            assert_eq!(number(literal), expected, "{literal}");
            assert_eq!(canon(literal), expected, "{literal} via parse");
        }
    }

    #[test]
    fn every_zero_is_0() {
        for literal in [
            "0",
            "-0",
            "0.0",
            "-0.0",
            "0.000",
            "0e5",
            "0E-5",
            "-0e+00",
            "0.00e99",
            // No exponent to keep, so no range to check.
            "0e99999999999999999999999999999999999999999999999",
        ] {
            assert_eq!(number(literal), "0", "{literal}");
            assert_eq!(canon(literal), "0", "{literal} via parse");
        }
    }

    #[test]
    fn exponents_outside_i64_are_errors() {
        for literal in [
            "1e9223372036854775808",
            "10e9223372036854775807",
            "1e-9223372036854775809",
            "0.01e-9223372036854775807",
            "1e99999999999999999999999999999999999999999999999999999999",
            "-1e-99999999999999999999999999999999999999999999999999999999",
        ] {
            let mut out = b"x".to_vec();
            let error = write_number(literal, &mut out).unwrap_err();
            assert!(
                matches!(error, CanonicalError::ExponentOutOfRange { .. }),
                "{literal}: {error}"
            );
            assert_eq!(out, b"x", "output untouched");
            assert!(canonical_text(literal).is_err());
            assert_eq!(single(literal), Err(Stop::Range), "{literal}");
            assert!(fast(literal).is_err());
        }
    }

    #[test]
    fn huge_exponent_literal_is_cheap() {
        // A megabyte of exponent digits: rejected without a big allocation.
        let literal = format!("1e{}", "9".repeat(1_000_000));
        let error = canonical_text(&literal).unwrap_err();
        assert!(matches!(error, CanonicalError::ExponentOutOfRange { .. }));
        assert!(error.to_string().len() < 200, "message is shortened");
        let zeros = format!("1e{}5", "0".repeat(1_000_000));
        assert_eq!(canon(&zeros), "1e5");
    }

    #[test]
    fn bad_number_syntax_is_an_error() {
        for literal in [
            "", "-", "+1", "01", "-01", "1.", ".5", "1e", "1e+", "1.e5", "1e5.0", "NaN",
            "Infinity", "0x10", "1 ", " 1", "1_000", "--1", "1ee2", "١",
        ] {
            let error = write_number(literal, &mut Vec::new()).unwrap_err();
            assert!(
                matches!(error, CanonicalError::NumberSyntax { .. }),
                "{literal:?}: {error}"
            );
        }
    }

    #[test]
    fn numbers_from_rust_values() {
        let mut out = Vec::new();
        write_value(
            &serde_json::json!([1.5, -0.0, 1e300, u64::MAX, i64::MIN]),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[15e-1,0,1e300,18446744073709551615,-9223372036854775808]"
        );
    }

    #[test]
    fn strings_escape_only_quote_backslash_and_controls() {
        let cases = [
            (r#""plain""#, r#""plain""#),
            (r#""a\"b\\c""#, r#""a\"b\\c""#),
            (r#""\/""#, r#""/""#),
            (r#""\b\f\n\r\t""#, r#""\u0008\u000c\u000a\u000d\u0009""#),
            (r#""\u001F\u0001\u0000""#, r#""\u001f\u0001\u0000""#),
            (r#""\u007f""#, "\"\u{7f}\""),
            (r#""\u00e9\u00E9é""#, "\"ééé\""),
            (r#""\ud83d\ude00😀""#, "\"😀😀\""),
            (r#""\uDBFF\uDFFF""#, "\"\u{10FFFF}\""),
            (r#""\u2028\ufeff""#, "\"\u{2028}\u{feff}\""),
            ("\"日本語\"", "\"日本語\""),
        ];
        for (json, expected) in cases {
            assert_eq!(canon(json), expected, "{json}");
        }
        let mut out = Vec::new();
        write_str("a\u{1f}\"\\\u{7f}z", &mut out);
        assert_eq!(out, b"\"a\\u001f\\\"\\\\\x7fz\"");
    }

    #[test]
    fn lone_surrogates_are_rejected() {
        // PostgreSQL refuses them too.
        assert!(canonical_text(r#""\ud800""#).is_err());
        assert!(canonical_text(r#""\ude00""#).is_err());
    }

    #[test]
    fn objects_sort_keys_bytewise_and_keep_the_last_duplicate() {
        assert_eq!(
            canon(r#"{ "b" : 1, "a" : 2, "aa": 3, "A": 4, "": 5 }"#),
            r#"{"":5,"A":4,"a":2,"aa":3,"b":1}"#
        );
        assert_eq!(canon(r#"{"a":1,"b":2,"a":3}"#), r#"{"a":3,"b":2}"#);
        assert_eq!(
            canon(r#"{"a":{"x":1},"a":{"y":2}}"#),
            r#"{"a":{"y":2}}"#,
            "the last duplicate wins whole, no merge"
        );
        // Bytewise UTF-8 order, not UTF-16 order: U+FF61 < U+1F600 in
        // UTF-8 but not in UTF-16 (surrogates sort below U+FF61).
        assert_eq!(
            canon("{\"\u{1F600}\":1,\"\u{FF61}\":2,\"\u{e9}\":3,\"z\":4}"),
            "{\"z\":4,\"\u{e9}\":3,\"\u{FF61}\":2,\"\u{1F600}\":1}"
        );
        // Escaped and raw spellings are the same key.
        assert_eq!(canon(r#"{"\u00e9":1,"é":2}"#), "{\"é\":2}");
    }

    #[test]
    fn nested_structures() {
        assert_eq!(canon("[]"), "[]");
        assert_eq!(canon("{}"), "{}");
        assert_eq!(canon("[ [ ] , { } ]"), "[[],{}]");
        assert_eq!(
            canon(
                r#"{"z": [1, 2.0, {"b": null, "a": [true, false, "x"]}],
                    "y": {"d": {"c": {}}}, "x": -0.0}"#
            ),
            r#"{"x":0,"y":{"d":{"c":{}}},"z":[1,2,{"a":[true,false,"x"],"b":null}]}"#
        );
        let deep = format!("{}1{}", "[".repeat(120), "]".repeat(120));
        assert_eq!(canon(&deep), deep);
    }

    #[test]
    fn canonical_text_is_a_fixed_point() {
        for json in [
            r#"{"b":[1.50,1E+2,"\u00e9\n"],"a":{"d":-0,"c":1e-7}}"#,
            r#"[0.000,12e0,"\ud83d\ude00"]"#,
        ] {
            let once = canon(json);
            assert_eq!(canon(&once), once);
        }
    }

    #[test]
    fn invalid_json_is_an_error() {
        for json in [
            "",
            "{",
            "[1,]",
            "{\"a\" 1}",
            "'a'",
            "\"\t\"",
            "1 2",
            "\u{feff}1",
            "nul",
        ] {
            let error = canonical_text(json).unwrap_err();
            assert!(
                matches!(error, CanonicalError::Json(_)),
                "{json:?}: {error}"
            );
            assert_eq!(single(json), Err(Stop::Syntax), "{json:?}");
            assert_eq!(fast(json), Err(error.to_string()), "{json:?}");
        }
        let too_deep = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(canonical_text(&too_deep).is_err());
        assert_eq!(single(&too_deep), Err(Stop::Syntax));
    }

    #[test]
    fn timestamps_have_six_fraction_digits_truncated() {
        let mut out = Vec::new();
        let at = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
            + chrono::Duration::nanoseconds(123_456_789);
        write_timestamp(at, &mut out);
        assert_eq!(out, b"\"2026-01-02T03:04:05.123456Z\"");

        out.clear();
        write_timestamp(Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(), &mut out);
        assert_eq!(out, b"\"0001-01-01T00:00:00.000000Z\"");

        out.clear();
        let before_epoch = Utc.with_ymd_and_hms(1969, 12, 31, 23, 59, 59).unwrap()
            + chrono::Duration::nanoseconds(999_999_999);
        write_timestamp(before_epoch, &mut out);
        assert_eq!(out, b"\"1969-12-31T23:59:59.999999Z\"");

        out.clear();
        write_timestamp(
            Utc.with_ymd_and_hms(12345, 6, 7, 8, 9, 10).unwrap(),
            &mut out,
        );
        assert_eq!(out, b"\"+12345-06-07T08:09:10.000000Z\"");

        out.clear();
        write_timestamp(Utc.with_ymd_and_hms(-44, 3, 15, 0, 0, 0).unwrap(), &mut out);
        assert_eq!(out, b"\"-0044-03-15T00:00:00.000000Z\"");
    }

    #[test]
    fn a_leap_second_encodes_as_the_next_second() {
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_micro_opt(23, 59, 59, 1_500_000)
            .unwrap()
            .and_utc();
        let mut out = Vec::new();
        write_timestamp(leap, &mut out);
        assert_eq!(out, b"\"2017-01-01T00:00:00.500000Z\"");
    }

    /// The worked example of docs/INTEGRITY.md.
    pub(super) fn golden_record<'a>(
        headers: &'a str,
        payload: &'a str,
        blind_index: &'a [String],
        content_hash: &'a [u8; 32],
    ) -> ChainRecord<'a> {
        ChainRecord {
            chain_id: "orders/0",
            position: 42,
            event_id: Uuid::parse_str("0192b9c4-7d3e-7a51-9f00-5a1b2c3d4e5f").unwrap(),
            event_type: "OrderPlaced",
            stream_id: "order-1001",
            stream_version: Some(3),
            occurred_at: Utc.with_ymd_and_hms(2026, 11, 27, 9, 30, 15).unwrap()
                + chrono::Duration::nanoseconds(123_456_789),
            ingested_at: Utc.with_ymd_and_hms(2026, 11, 27, 9, 30, 16).unwrap()
                + chrono::Duration::microseconds(5),
            source: Some("shop/checkout"),
            correlation_id: Some(Uuid::parse_str("11111111-2222-4333-8444-555555555555").unwrap()),
            causation_id: None,
            subject_id: None,
            kafka_topic: Some("orders"),
            kafka_partition: Some(0),
            kafka_offset: Some(1200),
            headers,
            metadata: None,
            payload,
            blind_index,
            content_hash,
        }
    }

    #[test]
    fn golden_record_encoding_and_hash() {
        let headers = canon(r#"[{"key":"trace","value":"abc"}]"#);
        let payload = canon(
            r#"{"total": 12.50, "currency": "EUR", "note": "Grüße \"VIP\"", "items": [{"sku": "A-1", "qty": 2}]}"#,
        );
        let blind_index = vec!["e3b0c442".to_string(), "98fc1c14".to_string()];
        let content_hash: [u8; 32] = std::array::from_fn(|i| i as u8);
        let record = golden_record(&headers, &payload, &blind_index, &content_hash);

        let mut out = Vec::new();
        record.encode(&mut out);
        let text = String::from_utf8(out.clone()).unwrap();
        let expected = concat!(
            r#"{"blind_index":["e3b0c442","98fc1c14"],"causation_id":null,"#,
            r#""chain_id":"orders/0","#,
            r#""content_hash":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f","#,
            r#""correlation_id":"11111111-2222-4333-8444-555555555555","#,
            r#""event_id":"0192b9c4-7d3e-7a51-9f00-5a1b2c3d4e5f","event_type":"OrderPlaced","#,
            r#""format":1,"headers":[{"key":"trace","value":"abc"}],"#,
            r#""ingested_at":"2026-11-27T09:30:16.000005Z","kafka_offset":12e2,"#,
            r#""kafka_partition":0,"kafka_topic":"orders","metadata":null,"#,
            r#""occurred_at":"2026-11-27T09:30:15.123456Z","#,
            r#""payload":{"currency":"EUR","items":[{"qty":2,"sku":"A-1"}],"note":"Grüße \"VIP\"","total":125e-1},"#,
            r#""position":42,"source":"shop/checkout","stream_id":"order-1001","#,
            r#""stream_version":3,"subject_id":null}"#
        );
        assert_eq!(text, expected);
        // The record is itself canonical JSON.
        assert_eq!(canon(&text), text);

        // Plain SHA-256 of the bytes, to tell encoding from chaining bugs.
        assert_eq!(
            hex::encode(Sha256::digest(&out)),
            "f22ad87d7ff43db4911b078daf9d89b7a1a8f7c915872d1cd5d06295bd5d7249"
        );
        assert_eq!(out.len(), 718);
        let first = chain_hash(&GENESIS, &out);
        assert_eq!(
            hex::encode(first),
            "77dcede6eb76ff3b717e94020522efe1361eda25dfb6f8ba8b3358116bf006b7",
            "the v1 encoding changed: stored chains would no longer verify"
        );

        // The next link: the same record at position 43, chained on the first.
        let mut next = record;
        next.position = 43;
        out.clear();
        next.encode(&mut out);
        assert_eq!(
            hex::encode(chain_hash(&first, &out)),
            "9c6b64183697032098a3acb12d59679e9fefc229fa1a8c6228434d733cc56e6e",
            "the v1 encoding changed: stored chains would no longer verify"
        );
    }

    #[test]
    fn encoding_while_canonicalizing_gives_the_same_bytes() {
        let headers = r#"[{"value": "abc", "key": "trace"}]"#;
        let payload = r#"{"total": 12.50, "currency": "EUR", "note": "Grüße \"VIP\"", "items": [{"sku": "A-1", "qty": 2}], "total": 1E+3}"#;
        let metadata = r#"{"b": [1.0, -0, 2e-3], "a": {"y": null, "x": "\u00e9"}}"#;
        let blind_index = vec!["e3b0c442".to_string()];
        let content_hash: [u8; 32] = std::array::from_fn(|i| 255 - i as u8);
        let (canon_headers, canon_payload, canon_metadata) =
            (canon(headers), canon(payload), canon(metadata));
        let mut scratch = Canonicalizer::new();
        for with_metadata in [false, true] {
            let mut expected =
                golden_record(&canon_headers, &canon_payload, &blind_index, &content_hash);
            let mut raw = golden_record(headers, payload, &blind_index, &content_hash);
            if with_metadata {
                expected.metadata = Some(&canon_metadata);
                raw.metadata = Some(metadata);
            }
            let mut want = Vec::new();
            expected.encode(&mut want);
            // Appends, like `encode`.
            let mut got = b"prefix".to_vec();
            raw.encode_canonicalizing(&mut scratch, &mut got).unwrap();
            assert_eq!(&got[6..], &want[..]);
        }
        let bad = golden_record(headers, "{\"a\":", &blind_index, &content_hash);
        let mut out = Vec::new();
        let (field, _) = bad
            .encode_canonicalizing(&mut scratch, &mut out)
            .unwrap_err();
        assert_eq!(field, JsonField::Payload);
    }

    #[test]
    fn encode_appends_and_escapes_text_fields() {
        let blind_index = vec!["a\"b".to_string()];
        let content_hash = [0xffu8; 32];
        let mut record = golden_record("[]", "{}", &blind_index, &content_hash);
        record.stream_id = "line\nbreak";
        record.kafka_topic = None;
        record.kafka_partition = Some(i32::MIN);
        record.kafka_offset = Some(i64::MAX);
        record.stream_version = None;
        record.position = u64::MAX;
        record.metadata = Some(r#"{"a":1}"#);
        let mut out = b"prefix".to_vec();
        record.encode(&mut out);
        let text = String::from_utf8(out).unwrap();
        let body = text.strip_prefix("prefix").unwrap();
        let value: Value = serde_json::from_str(body).unwrap();
        assert_eq!(value["blind_index"][0], "a\"b");
        assert_eq!(value["stream_id"], "line\nbreak");
        assert_eq!(value["kafka_topic"], Value::Null);
        assert_eq!(value["kafka_partition"].to_string(), "-2147483648");
        assert_eq!(value["kafka_offset"].to_string(), i64::MAX.to_string());
        assert_eq!(value["position"].to_string(), u64::MAX.to_string());
        assert_eq!(value["stream_version"], Value::Null);
        assert_eq!(value["metadata"]["a"].to_string(), "1");
        assert_eq!(value["content_hash"], "f".repeat(64));
        assert_eq!(value.as_object().unwrap().len(), 21);
        // Already canonical: sorted keys, no whitespace.
        assert_eq!(canon(body), body);
    }

    #[test]
    fn record_integers_are_canonical_numbers() {
        let cases: [(bool, u64); 12] = [
            (false, 0),
            (false, 1),
            (false, 10),
            (false, 1200),
            (false, 1001),
            (true, 1),
            (true, 500),
            (false, 10_000_000_000_000_000_000),
            (false, u64::MAX),
            (true, i64::MIN.unsigned_abs()),
            (false, i64::MAX as u64),
            (true, 2_147_483_648),
        ];
        for (negative, magnitude) in cases {
            let mut int = Vec::new();
            write_int(negative, magnitude, &mut int);
            let sign = if negative { "-" } else { "" };
            assert_eq!(
                String::from_utf8(int).unwrap(),
                number(&format!("{sign}{magnitude}")),
                "{sign}{magnitude}"
            );
        }
    }

    #[test]
    fn chain_hash_is_sha256_of_prev_then_record() {
        let expected: [u8; 32] = Sha256::digest([[7u8; 32].as_slice(), b"abc"].concat()).into();
        assert_eq!(chain_hash(&[7; 32], b"abc"), expected);
        assert_ne!(chain_hash(&GENESIS, b"abc"), chain_hash(&[1; 32], b"abc"));
    }

    #[test]
    fn find_special_matches_a_byte_by_byte_scan() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        const BYTES: &[u8] = b"\"\\\x00\x1f\x20\x21\x7f\x80\xff\xa2\xdc\x5b\x5d aZ";
        for _ in 0..20_000 {
            let len = rng.gen_range(0..40);
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.gen_bool(0.8) {
                        BYTES[rng.gen_range(0..BYTES.len())]
                    } else {
                        rng.gen()
                    }
                })
                .collect();
            let from = rng.gen_range(0..=len);
            let naive = (from..len)
                .find(|&i| bytes[i] < 0x20 || bytes[i] == b'"' || bytes[i] == b'\\')
                .unwrap_or(len);
            assert_eq!(find_special(&bytes, from), naive, "{bytes:?} from {from}");
        }
    }

    #[test]
    fn write_str_escapes_long_runs() {
        let s = format!(
            "{}\"{}\\\n{}é\u{1}",
            "a".repeat(17),
            "b".repeat(9),
            "c".repeat(8)
        );
        let mut out = Vec::new();
        write_str(&s, &mut out);
        let expected = format!(
            "\"{}\\\"{}\\\\\\u000a{}é\\u0001\"",
            "a".repeat(17),
            "b".repeat(9),
            "c".repeat(8)
        );
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn single_pass_handles_postgres_output() {
        // As jsonb prints it: shorter keys first, ", " and ": ".
        let pg = r#"{"note": "Grüße \"VIP\"\n\ttab", "items": [{"qty": 2, "sku": "A-1"}], "total": 12.50, "currency": "EUR"}"#;
        assert_eq!(
            canon(pg),
            r#"{"currency":"EUR","items":[{"qty":2,"sku":"A-1"}],"note":"Grüße \"VIP\"\u000a\u0009tab","total":125e-1}"#
        );
        // Keys already in order take the fast path; the same bytes either way.
        assert_eq!(
            canon(r#"{"a": 1, "b": {"c": [10, -0.0]}}"#),
            r#"{"a":1,"b":{"c":[1e1,0]}}"#
        );
    }

    #[test]
    fn escaped_keys_sort_by_their_decoded_bytes() {
        // `"` (0x22) sorts before `#`, though its escape starts with `\`.
        assert_eq!(canon(r##"{"#":1,"\"":2}"##), r##"{"\"":2,"#":1}"##);
        assert_eq!(canon(r#"{"\u0023":1,"\u0022":2}"#), r##"{"\"":2,"#":1}"##);
        assert_eq!(
            canon(r#"{"a\nb":1,"a":2,"a\u000A":3}"#),
            r#"{"a":2,"a\u000a":3,"a\u000ab":1}"#
        );
        assert_eq!(canon(r#"{"\ud83d\ude00":1,"😀":2}"#), "{\"😀\":2}");
    }

    #[test]
    fn a_dropped_duplicate_may_hold_a_number_without_canonical_form() {
        // canonical_text parses before it writes: the bad number is gone.
        assert_eq!(canon(r#"{"a":1e99999999999999999999,"a":1}"#), r#"{"a":1}"#);
        assert_eq!(
            canon(r#"{"b":0,"a":[1e-99999999999999999999],"a":{}}"#),
            r#"{"a":{},"b":0}"#
        );
        // The one that stays has none.
        for json in [
            r#"{"a":1,"a":1e99999999999999999999}"#,
            r#"{"b":0,"a":[1e99999999999999999999]}"#,
            r#"[1,{"x":1e99999999999999999999}]"#,
        ] {
            assert_eq!(single(json), Err(Stop::Range), "{json}");
            assert!(fast(json).is_err(), "{json}");
        }
    }

    #[test]
    fn nesting_limit_is_serde_jsons() {
        for depth in [126, 127, 128, 129] {
            let mut json = String::new();
            for level in 0..depth {
                json.push_str(if level % 3 == 0 { "{\"k\": " } else { "[ " });
            }
            json.push('0');
            for level in (0..depth).rev() {
                json.push_str(if level % 3 == 0 { "}" } else { "]" });
            }
            let reference = canonical_text(&json).map_err(|e| e.to_string());
            assert_eq!(reference.is_ok(), depth <= 127, "depth {depth}");
            assert_eq!(fast(&json), reference, "depth {depth}");
            assert_eq!(single(&json).is_ok(), depth <= 127, "depth {depth}");
        }
    }

    #[test]
    fn serde_json_private_keys_behave_as_in_canonical_text() {
        // With `arbitrary_precision` and `raw_value`, serde_json reads an
        // object whose *first* key is one of these as a number or as
        // embedded JSON text. The single pass hands such texts to
        // canonical_text, so the results stay identical.
        let number = r#"{"$serde_json::private::Number": "1.50"}"#;
        assert_eq!(single(number), Err(Stop::PrivateKey));
        assert_eq!(fast(number), Ok("15e-1".to_string()));
        assert_eq!(canonical_text(number).unwrap(), "15e-1");
        let raw = r#"[{"\u0024serde_json::private::RawValue": "{\"b\": 1, \"a\": 2}"}]"#;
        assert_eq!(single(raw), Err(Stop::PrivateKey));
        assert_eq!(fast(raw), Ok(r#"[{"a":2,"b":1}]"#.to_string()));
        // Not first: an ordinary key.
        assert_eq!(
            canon(r#"{"a": 1, "$serde_json::private::Number": "1.50"}"#),
            r#"{"$serde_json::private::Number":"1.50","a":1}"#
        );
    }

    #[test]
    fn canonicalizer_appends_and_leaves_out_alone_on_error() {
        let mut scratch = Canonicalizer::new();
        let mut out = b"head".to_vec();
        scratch
            .canonicalize(r#"{"b": [1, {"d": 2, "c": 3}], "a": null}"#, &mut out)
            .unwrap();
        assert_eq!(out, br#"head{"a":null,"b":[1,{"c":3,"d":2}]}"#);
        for bad in [
            r#"{"b": [1, {"d": 2, "c": 3}], "a": nul}"#,
            "[1e99999999999999999999]",
        ] {
            let error = scratch.canonicalize(bad, &mut out).unwrap_err();
            assert_eq!(
                error.to_string(),
                canonical_text(bad).unwrap_err().to_string()
            );
            assert_eq!(out, br#"head{"a":null,"b":[1,{"c":3,"d":2}]}"#);
        }
        out.clear();
        scratch
            .canonicalize(r#" {"z" :{}, "y": "\u00e9"} "#, &mut out)
            .unwrap();
        assert_eq!(out, "{\"y\":\"é\",\"z\":{}}".as_bytes());
    }

    /// The single pass against `canonical_text` on random texts, valid and
    /// not: the same bytes, or errors of the same kind.
    #[test]
    fn single_pass_equals_canonical_text_on_random_texts() {
        const DOCS: usize = 60_000;
        let mut generator = TextGenerator::new(0x5eed_2026);
        let mut scratch = Canonicalizer::new();
        let (mut same, mut syntax, mut range, mut private) = (0, 0, 0, 0);
        let mut max_len = 0;
        for n in 0..DOCS {
            let json = generator.document();
            max_len = max_len.max(json.len());
            let reference = canonical_text(&json);
            let mut raw = Vec::new();
            let pass = scratch.single_pass(&json, &mut raw);
            match (&reference, pass) {
                (_, Err(Stop::PrivateKey)) => {
                    assert!(generator.used_private_key, "document {n}: {json:?}");
                    private += 1;
                }
                (Ok(expected), Ok(())) => {
                    assert_eq!(
                        std::str::from_utf8(&raw).unwrap(),
                        expected,
                        "document {n}: {json:?}"
                    );
                    same += 1;
                }
                (Err(CanonicalError::Json(_)), Err(Stop::Syntax)) => syntax += 1,
                (Err(CanonicalError::ExponentOutOfRange { .. }), Err(Stop::Range)) => range += 1,
                (reference, pass) => {
                    panic!("document {n}: canonical_text {reference:?}, single pass {pass:?}\n{json:?}")
                }
            }
            // The public entry point: exactly canonical_text, appended.
            let mut out = b"prefix".to_vec();
            let result = scratch.canonicalize(&json, &mut out);
            match (&reference, result) {
                (Ok(expected), Ok(())) => assert_eq!(&out[6..], expected.as_bytes()),
                (Err(expected), Err(error)) => {
                    assert_eq!(error.to_string(), expected.to_string());
                    assert_eq!(out, b"prefix");
                }
                (reference, result) => {
                    panic!("document {n}: canonical_text {reference:?}, canonicalize {result:?}")
                }
            }
        }
        println!(
            "{DOCS} texts (up to {max_len} bytes): {same} canonical, {syntax} invalid, \
             {range} exponent out of range, {private} with serde_json's private keys"
        );
        assert!(same * 3 > DOCS, "enough valid texts: {same}");
        assert!(syntax * 5 > DOCS, "enough invalid texts: {syntax}");
        assert!(range * 200 > DOCS, "enough range errors: {range}");
        assert!(private > 20, "private keys covered: {private}");
    }

    /// Random JSON texts for the single pass: every escape, unicode, all
    /// number forms, duplicate keys, whitespace everywhere, nesting around
    /// the limit, serde_json's private keys, and corrupted texts.
    struct TextGenerator {
        rng: rand::rngs::StdRng,
        used_private_key: bool,
    }

    impl TextGenerator {
        fn new(seed: u64) -> Self {
            use rand::SeedableRng;
            Self {
                rng: rand::rngs::StdRng::seed_from_u64(seed),
                used_private_key: false,
            }
        }

        fn document(&mut self) -> String {
            use rand::Rng;
            self.used_private_key = false;
            let mut out = String::new();
            self.ws(&mut out);
            match self.rng.gen_range(0..100) {
                0..=5 => {
                    let depth = self.rng.gen_range(120..=130);
                    self.deep(depth, &mut out);
                }
                6..=59 => self.object(0, &mut out),
                60..=79 => self.array(0, &mut out),
                _ => self.value(3, &mut out),
            }
            self.ws(&mut out);
            if self.rng.gen_bool(0.3) {
                self.corrupt(&mut out);
            }
            out
        }

        /// One random edit that usually makes the text invalid.
        fn corrupt(&mut self, text: &mut String) {
            use rand::Rng;
            const INSERTS: &[&str] = &[
                ",", ":", "{", "}", "[", "]", "\"", "\\", "\\u", "\\ud800", "\\udc00", "0", "-",
                ".", "e", "+", "01", "1.", "tru", "nul", "\u{0}", "\u{1f}", "\u{feff}", "\u{a0}",
                "\u{b}", "\u{c}", " ", "x", "/", "//", "/*", "NaN", "é",
            ];
            let boundaries: Vec<usize> = text
                .char_indices()
                .map(|(i, _)| i)
                .chain([text.len()])
                .collect();
            let at = boundaries[self.rng.gen_range(0..boundaries.len())];
            match self.rng.gen_range(0..5) {
                0 => text.truncate(at),
                1 if at < text.len() => {
                    text.remove(at);
                }
                2 => text.insert_str(0, INSERTS[self.rng.gen_range(0..INSERTS.len())]),
                3 => text.push_str(INSERTS[self.rng.gen_range(0..INSERTS.len())]),
                _ => text.insert_str(at, INSERTS[self.rng.gen_range(0..INSERTS.len())]),
            }
        }

        fn deep(&mut self, depth: usize, out: &mut String) {
            use rand::Rng;
            let mut closers = Vec::with_capacity(depth);
            for _ in 0..depth {
                if self.rng.gen_bool(0.5) {
                    out.push('[');
                    self.ws(out);
                    if self.rng.gen_bool(0.2) {
                        self.value(4, out);
                        out.push(',');
                    }
                    closers.push(']');
                } else {
                    out.push('{');
                    if self.rng.gen_bool(0.2) {
                        self.string(out);
                        out.push(':');
                        self.value(4, out);
                        out.push(',');
                    }
                    self.string(out);
                    out.push(':');
                    closers.push('}');
                }
            }
            self.value(4, out);
            for closer in closers.into_iter().rev() {
                self.ws(out);
                out.push(closer);
            }
        }

        fn value(&mut self, depth: usize, out: &mut String) {
            use rand::Rng;
            let choice = if depth >= 4 {
                self.rng.gen_range(2..10)
            } else {
                self.rng.gen_range(0..10)
            };
            match choice {
                0 | 1 => self.object(depth + 1, out),
                2 => self.array(depth + 1, out),
                3 | 4 => self.string(out),
                5..=8 => self.number(out),
                _ => out.push_str(["true", "false", "null"][self.rng.gen_range(0..3)]),
            }
        }

        fn object(&mut self, depth: usize, out: &mut String) {
            use rand::Rng;
            out.push('{');
            self.ws(out);
            let members = self.rng.gen_range(0..8);
            let mut keys: Vec<String> = Vec::new();
            for i in 0..members {
                if i > 0 {
                    out.push(',');
                    self.ws(out);
                }
                if i == 0 && self.rng.gen_bool(0.01) {
                    self.private(out);
                    self.ws(out);
                    break;
                }
                let key = if !keys.is_empty() && self.rng.gen_bool(0.3) {
                    keys[self.rng.gen_range(0..keys.len())].clone()
                } else {
                    let key = self.key();
                    keys.push(key.clone());
                    key
                };
                self.spell(&key, out);
                self.ws(out);
                out.push(':');
                self.ws(out);
                self.value(depth, out);
                self.ws(out);
            }
            out.push('}');
        }

        /// A member with one of serde_json's private keys.
        fn private(&mut self, out: &mut String) {
            use rand::Rng;
            self.used_private_key = true;
            let key = if self.rng.gen_bool(0.5) {
                "$serde_json::private::Number"
            } else {
                "$serde_json::private::RawValue"
            };
            self.spell(key, out);
            out.push(':');
            let mut inner = String::new();
            match self.rng.gen_range(0..3) {
                0 => self.number(&mut inner),
                1 => self.value(3, &mut inner),
                _ => inner.push_str("not json"),
            }
            if self.rng.gen_bool(0.8) {
                self.spell(&inner, out);
            } else {
                out.push_str(&inner);
            }
            if self.rng.gen_bool(0.2) {
                out.push_str(",\"more\":1");
            }
        }

        fn array(&mut self, depth: usize, out: &mut String) {
            use rand::Rng;
            out.push('[');
            self.ws(out);
            let items = self.rng.gen_range(0..6);
            for i in 0..items {
                if i > 0 {
                    out.push(',');
                    self.ws(out);
                }
                self.value(depth, out);
                self.ws(out);
            }
            out.push(']');
        }

        fn key(&mut self) -> String {
            use rand::Rng;
            const POOL: &[&str] = &[
                "a",
                "b",
                "A",
                "aa",
                "ab",
                "",
                "é",
                "e\u{301}",
                "ß",
                "z",
                "k1",
                "k10",
                "k2",
                "\u{ff61}",
                "\u{1f600}",
                "\u{10000}",
                "id",
                "ID",
                "a b",
                "\"",
                "#",
                "!",
                "\\",
                "]",
                "\n",
                "\u{1}",
                "\u{7f}",
                "a\n",
                "a\u{0}",
                "$enc",
                "kid",
                "amount",
            ];
            if self.rng.gen_bool(0.7) {
                POOL[self.rng.gen_range(0..POOL.len())].to_string()
            } else {
                self.text()
            }
        }

        fn string(&mut self, out: &mut String) {
            use rand::Rng;
            if self.rng.gen_bool(0.02) {
                // Broken escapes and raw controls.
                const BAD: &[&str] = &[
                    "\"\\ud800\"",
                    "\"\\udc00\"",
                    "\"\\ud800\\u0041\"",
                    "\"\\ud800\\n\"",
                    "\"\\udbff\\ud800\"",
                    "\"\\u12\"",
                    "\"\\u12g4\"",
                    "\"\\x41\"",
                    "\"\\'\"",
                    "\"\t\"",
                    "\"a\nb\"",
                    "\"\\U0041\"",
                    "\"\\ud83d\\ude00\\ud83d\"",
                ];
                out.push_str(BAD[self.rng.gen_range(0..BAD.len())]);
                return;
            }
            let text = self.text();
            self.spell(&text, out);
        }

        fn text(&mut self) -> String {
            use rand::Rng;
            const OTHER: &[char] = &[
                'é',
                'ß',
                'Ω',
                '中',
                '\u{80}',
                '\u{a0}',
                '\u{2028}',
                '\u{feff}',
                '\u{fffd}',
                '\u{ffff}',
                '\u{d7ff}',
                '\u{e000}',
                '😀',
                '\u{10000}',
                '\u{10ffff}',
                '\u{7f}',
                '"',
                '\\',
                '/',
            ];
            let len = if self.rng.gen_bool(0.05) {
                self.rng.gen_range(20..200)
            } else {
                self.rng.gen_range(0..16)
            };
            (0..len)
                .map(|_| match self.rng.gen_range(0..10) {
                    0..=5 => char::from(self.rng.gen_range(0x20u8..0x7f)),
                    6 | 7 => OTHER[self.rng.gen_range(0..OTHER.len())],
                    _ => char::from(self.rng.gen_range(0u8..0x20)),
                })
                .collect()
        }

        /// `text` as a JSON string, each character raw or escaped at random.
        fn spell(&mut self, text: &str, out: &mut String) {
            use rand::Rng;
            out.push('"');
            for c in text.chars() {
                let short = match c {
                    '"' => Some("\\\""),
                    '\\' => Some("\\\\"),
                    '/' => Some("\\/"),
                    '\u{8}' => Some("\\b"),
                    '\u{c}' => Some("\\f"),
                    '\n' => Some("\\n"),
                    '\r' => Some("\\r"),
                    '\t' => Some("\\t"),
                    _ => None,
                };
                let must_escape = c < '\u{20}' || c == '"' || c == '\\';
                if !must_escape && self.rng.gen_bool(0.75) {
                    out.push(c);
                } else if let Some(short) = short.filter(|_| self.rng.gen_bool(0.5)) {
                    out.push_str(short);
                } else {
                    let upper = self.rng.gen_bool(0.5);
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        if upper {
                            out.push_str(&format!("\\u{unit:04X}"));
                        } else {
                            out.push_str(&format!("\\u{unit:04x}"));
                        }
                    }
                }
            }
            out.push('"');
        }

        fn number(&mut self, out: &mut String) {
            use rand::Rng;
            if self.rng.gen_bool(0.02) {
                const BAD: &[&str] = &[
                    "01", "-01", "1.", ".5", "+1", "1e", "1e+", "-", "1.e5", "--1", "0x1", "1E-",
                    "-.5", "00",
                ];
                out.push_str(BAD[self.rng.gen_range(0..BAD.len())]);
                return;
            }
            if self.rng.gen_bool(0.2) {
                out.push('-');
            }
            if self.rng.gen_bool(0.25) {
                out.push('0');
            } else {
                let len = if self.rng.gen_bool(0.05) {
                    self.rng.gen_range(20..60)
                } else {
                    self.rng.gen_range(1..8)
                };
                out.push(char::from(self.rng.gen_range(b'1'..=b'9')));
                self.digits(len - 1, out);
            }
            if self.rng.gen_bool(0.4) {
                out.push('.');
                let len = self.rng.gen_range(1..12);
                self.digits(len, out);
            }
            if self.rng.gen_bool(0.3) {
                out.push(if self.rng.gen_bool(0.5) { 'e' } else { 'E' });
                match self.rng.gen_range(0..3) {
                    0 => out.push('-'),
                    1 => out.push('+'),
                    _ => {}
                }
                out.push_str(&"0".repeat(self.rng.gen_range(0..3)));
                let exponent: u128 = match self.rng.gen_range(0..100) {
                    // Around and beyond the 64-bit limit.
                    0..=2 => self
                        .rng
                        .gen_range(9_223_372_036_854_775_790..9_223_372_036_854_775_830),
                    3 => self.rng.gen_range(0..u128::MAX),
                    4..=9 => self.rng.gen_range(40..100_000),
                    _ => self.rng.gen_range(0..40),
                };
                out.push_str(&exponent.to_string());
            }
        }

        fn digits(&mut self, len: usize, out: &mut String) {
            use rand::Rng;
            for _ in 0..len {
                let d = if self.rng.gen_bool(0.35) {
                    b'0'
                } else {
                    self.rng.gen_range(b'0'..=b'9')
                };
                out.push(char::from(d));
            }
        }

        fn ws(&mut self, out: &mut String) {
            use rand::Rng;
            const WS: &[&str] = &[" ", "\n", "\t", "\r", "\r\n", "  ", " \t\n "];
            if self.rng.gen_bool(0.3) {
                out.push_str(WS[self.rng.gen_range(0..WS.len())]);
            }
        }
    }
}
