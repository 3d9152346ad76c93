//! The pieces of protecting a payload straight from its text
//! ([`crate::protect::text`]), on top of the single pass:
//!
//! - [`Canonicalizer::scan`] canonicalises a text and records where the
//!   values at some paths ended up in the output, following them through
//!   key sorting and duplicate keys (a value in a dropped duplicate is
//!   marked dead);
//! - [`Canonicalizer::compact`] writes one value of a text as serde_json's
//!   `to_writer` writes the parsed [`serde_json::Value`], with some nested
//!   values replaced by given bytes.

use std::ops::Range;

use super::{Canonicalizer, Hooks, Member, Pass, Stop, OFF_PATH};

/// Paths into a JSON value (RFC 6901 pointers, as tokens), as a trie whose
/// marked nodes are the values a scan records.
#[derive(Debug, Clone, Default)]
pub(crate) struct PathTrie {
    /// The root first; empty when there is no path.
    nodes: Vec<PathNode>,
}

#[derive(Debug, Clone)]
struct PathNode {
    /// The member key this node stands for (unescaped).
    token: Box<[u8]>,
    /// The array index it stands for, if the token is one.
    index: Option<usize>,
    children: Vec<u32>,
    recorded: bool,
}

impl PathTrie {
    pub(crate) const fn new() -> Self {
        Self { nodes: Vec::new() }
    }

    /// Adds a path, given as its tokens and, for each, the array index it
    /// denotes (if any), and marks its node as recorded. Returns the node.
    pub(crate) fn insert<'t>(
        &mut self,
        tokens: impl IntoIterator<Item = (&'t str, Option<usize>)>,
    ) -> u32 {
        if self.nodes.is_empty() {
            self.nodes.push(PathNode {
                token: Box::default(),
                index: None,
                children: Vec::new(),
                recorded: false,
            });
        }
        let mut node = 0;
        for (token, index) in tokens {
            node = match self.child(node, token.as_bytes()) {
                OFF_PATH => {
                    let child = self.nodes.len() as u32;
                    self.nodes.push(PathNode {
                        token: token.as_bytes().into(),
                        index,
                        children: Vec::new(),
                        recorded: false,
                    });
                    self.nodes[node as usize].children.push(child);
                    child
                }
                child => child,
            };
        }
        self.nodes[node as usize].recorded = true;
        node
    }

    /// How many nodes there are (node ids are below this).
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    fn root(&self) -> u32 {
        if self.nodes.is_empty() {
            OFF_PATH
        } else {
            0
        }
    }

    fn child(&self, node: u32, key: &[u8]) -> u32 {
        let children = &self.nodes[node as usize].children;
        children
            .iter()
            .copied()
            .find(|&c| *self.nodes[c as usize].token == *key)
            .unwrap_or(OFF_PATH)
    }

    fn element(&self, node: u32, index: usize) -> u32 {
        let children = &self.nodes[node as usize].children;
        children
            .iter()
            .copied()
            .find(|&c| self.nodes[c as usize].index == Some(index))
            .unwrap_or(OFF_PATH)
    }
}

/// A recorded value.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    /// Its node in the [`PathTrie`].
    pub node: u32,
    /// False when it is in a member dropped for a later duplicate key: it
    /// is not part of the value.
    pub alive: bool,
    /// Where it is in the text.
    pub src: Range<usize>,
    /// Where its canonical form is in the output (if alive).
    pub out: Range<usize>,
}

/// Bytes [`Canonicalizer::compact`] writes instead of the value at `src`.
#[derive(Debug, Clone)]
pub(crate) struct Substitute {
    pub src: Range<usize>,
    /// A range of the substitutes' bytes.
    pub bytes: Range<usize>,
}

impl Canonicalizer {
    /// Appends the canonical form of `json` to `out`, as [`Self::canonicalize`]
    /// without its fallback, and appends to `slots` the values found at the
    /// recorded paths of `paths`. Stops at an object with the key `refuse`.
    /// Leaves garbage in `out` and `slots` on error.
    pub(crate) fn scan(
        &mut self,
        json: &str,
        paths: &PathTrie,
        refuse: Option<&[u8]>,
        out: &mut Vec<u8>,
        slots: &mut Vec<Slot>,
    ) -> Result<(), Stop> {
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
            hooks: ScanHooks {
                paths,
                refuse,
                slots,
                moves: &mut self.moves,
            },
        };
        pass.skip_ws();
        let root = paths.root();
        let result = pass.value(0, root).and_then(|poisoned| {
            pass.skip_ws();
            if pass.pos != pass.src.len() {
                return Err(Stop::Syntax);
            }
            if poisoned {
                return Err(Stop::Range);
            }
            Ok(())
        });
        self.release_large_scratch();
        result
    }

    /// Appends serde_json's compact form of the value at `src` of `json`
    /// (as `serde_json::to_writer` writes it once parsed into a `Value`),
    /// writing `bytes[s.bytes]` instead of the value at `s.src` for each of
    /// `substitutes`. For a text [`Self::scan`] accepted.
    pub(crate) fn compact(
        &mut self,
        json: &str,
        src: Range<usize>,
        substitutes: &[Substitute],
        bytes: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Stop> {
        self.members.clear();
        self.keys.clear();
        let mut pass = Pass {
            text: json,
            src: json.as_bytes(),
            pos: src.start,
            members: &mut self.members,
            keys: &mut self.keys,
            moved: &mut self.moved,
            out,
            hooks: CompactHooks { substitutes, bytes },
        };
        let result = pass.value(0, OFF_PATH);
        let end = pass.pos;
        self.release_large_scratch();
        result?;
        if end != src.end {
            return Err(Stop::Syntax);
        }
        Ok(())
    }
}

/// Marks an object member dropped by [`ScanHooks::member_moved`].
const DROPPED: usize = usize::MAX;

struct ScanHooks<'h> {
    paths: &'h PathTrie,
    refuse: Option<&'h [u8]>,
    slots: &'h mut Vec<Slot>,
    /// The new start of each member of the object being sorted, in key
    /// order, or `DROPPED`.
    moves: &'h mut Vec<usize>,
}

impl Hooks for ScanHooks<'_> {
    const PATHS: bool = true;

    #[inline]
    fn member(&mut self, node: u32, key: &[u8]) -> Result<u32, Stop> {
        if self.refuse == Some(key) {
            return Err(Stop::RefusedKey);
        }
        if node == OFF_PATH {
            return Ok(OFF_PATH);
        }
        Ok(self.paths.child(node, key))
    }

    #[inline]
    fn element(&self, node: u32, index: usize) -> u32 {
        self.paths.element(node, index)
    }

    #[inline]
    fn records(&self, node: u32) -> bool {
        self.paths.nodes[node as usize].recorded
    }

    fn record(&mut self, node: u32, src: Range<usize>, out: Range<usize>) {
        self.slots.push(Slot {
            node,
            alive: true,
            src,
            out,
        });
    }

    #[inline]
    fn recorded(&self) -> usize {
        self.slots.len()
    }

    fn begin_moves(&mut self) {
        self.moves.clear();
    }

    fn member_moved(&mut self, to: Option<usize>) {
        self.moves.push(to.unwrap_or(DROPPED));
    }

    fn apply_moves(&mut self, from: usize, members: &[Member]) {
        for slot in &mut self.slots[from..] {
            if !slot.alive {
                continue;
            }
            // Every value recorded since the object opened is in one of its
            // members, after the key. A number without canonical form wrote
            // nothing: its value is empty, at the very end of its member.
            let Some(i) = members
                .iter()
                .position(|m| m.start < slot.out.start && slot.out.start <= m.end)
            else {
                continue;
            };
            match self.moves[i] {
                DROPPED => slot.alive = false,
                to => {
                    let start = to + (slot.out.start - members[i].start);
                    slot.out = start..start + slot.out.len();
                }
            }
        }
    }
}

struct CompactHooks<'h> {
    substitutes: &'h [Substitute],
    bytes: &'h [u8],
}

impl Hooks for CompactHooks<'_> {
    const COMPACT: bool = true;

    #[inline]
    fn substitute(&self, pos: usize) -> Option<(&[u8], usize)> {
        let found = self.substitutes.iter().find(|s| s.src.start == pos)?;
        Some((&self.bytes[found.bytes.clone()], found.src.end))
    }
}
