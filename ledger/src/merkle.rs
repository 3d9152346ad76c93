//! RFC 9162 (Certificate Transparency v2) Merkle trees over a chain's events.
//!
//! A signed checkpoint commits to the Merkle root of the first `tree_size`
//! events of a chain. From that one hash a third party can check that a
//! given event is in the chain (an inclusion proof, §2.1.3) and that a later
//! checkpoint only appended to an earlier one (a consistency proof, §2.1.4),
//! without trusting us or reading the whole chain. We follow RFC 9162 to the
//! byte so that any Certificate Transparency verifier can check our proofs.
//!
//! Leaves are hashed as `SHA-256(0x00 || data)` and interior nodes as
//! `SHA-256(0x01 || left || right)`; the distinct prefixes stop a leaf from
//! being passed off as a subtree (second-preimage attacks). The root of the
//! empty tree is `SHA-256("")`.
//!
//! Generating a proof rehashes the subtrees it needs, O(n) for a tree of n
//! leaves; verifying one costs O(log n) hashes.

use sha2::{Digest, Sha256};

/// A SHA-256 digest: a leaf hash, an interior node hash or a root.
pub type Hash = [u8; 32];

const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;

/// The largest size a [`CompactRange`] accepts from storage. Appending one
/// leaf at a time cannot get from here to `u64::MAX`, so `push` never
/// overflows.
pub const MAX_TREE_SIZE: u64 = 1 << 63;

/// Why a Merkle operation or proof failed. Messages name the sizes, indices
/// and hashes involved so that a failed audit can be reproduced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    #[error("leaf index {index} is out of range for a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },

    #[error("inclusion proof has {got} hashes, expected {expected} for leaf {index} of {size}")]
    InclusionProofLength {
        got: usize,
        expected: usize,
        index: u64,
        size: u64,
    },

    #[error(
        "inclusion proof for leaf {index} of {size} leads to root {}, expected {}",
        hex::encode(.computed),
        hex::encode(.expected)
    )]
    InclusionRootMismatch {
        index: u64,
        size: u64,
        computed: Hash,
        expected: Hash,
    },

    #[error("old tree size {old_size} is larger than new tree size {new_size}")]
    OldSizeTooLarge { old_size: u64, new_size: u64 },

    #[error(
        "consistency proof has {got} hashes, expected {expected} from size {old_size} to {new_size}"
    )]
    ConsistencyProofLength {
        got: usize,
        expected: usize,
        old_size: u64,
        new_size: u64,
    },

    #[error(
        "trees of equal size {size} have different roots {} and {}",
        hex::encode(.old_root),
        hex::encode(.new_root)
    )]
    EqualSizeRootsDiffer {
        size: u64,
        old_root: Hash,
        new_root: Hash,
    },

    #[error(
        "the root of the empty tree is {}, got {}",
        hex::encode(empty_root()),
        hex::encode(.got)
    )]
    NotEmptyRoot { got: Hash },

    #[error(
        "consistency proof from size {old_size} to {new_size} leads to old root {}, expected {}",
        hex::encode(.computed),
        hex::encode(.expected)
    )]
    OldRootMismatch {
        old_size: u64,
        new_size: u64,
        computed: Hash,
        expected: Hash,
    },

    #[error(
        "consistency proof from size {old_size} to {new_size} leads to new root {}, expected {}",
        hex::encode(.computed),
        hex::encode(.expected)
    )]
    NewRootMismatch {
        old_size: u64,
        new_size: u64,
        computed: Hash,
        expected: Hash,
    },

    #[error(
        "compact range of size {size} must be {expected} bytes (one hash per set bit of the size), got {got}"
    )]
    CompactRangeLength {
        size: u64,
        expected: usize,
        got: usize,
    },

    #[error("compact range size {size} exceeds the maximum tree size {MAX_TREE_SIZE}")]
    CompactRangeTooLarge { size: u64 },
}

/// The root of the tree with no leaves (RFC 9162 §2.1.1).
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([LEAF_PREFIX]);
    hasher.update(data);
    hasher.finalize().into()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([NODE_PREFIX]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The Merkle Tree Hash (MTH) of a list of leaf hashes, RFC 9162 §2.1.1.
pub fn root(leaf_hashes: &[Hash]) -> Hash {
    if leaf_hashes.is_empty() {
        return empty_root();
    }
    subtree_root(leaf_hashes)
}

/// MTH of a non-empty list: split at the largest power of two below its length.
fn subtree_root(leaves: &[Hash]) -> Hash {
    if let [leaf] = leaves {
        return *leaf;
    }
    let (left, right) = leaves.split_at(split_point(leaves.len()));
    node_hash(&subtree_root(left), &subtree_root(right))
}

/// The largest power of two strictly smaller than `n`, for `n >= 2`.
fn split_point(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The roots of the perfect subtrees that make up a tree, one per set bit of
/// its size, largest first: everything needed to append leaves and compute
/// the root, in O(log n) space (RFC 9162 calls the idea a "compact range";
/// others call it a frontier).
///
/// This is how to check many checkpoints in one pass: a verifier streaming
/// a chain's events from the database pushes each leaf hash and compares
/// [`CompactRange::root`] with a checkpoint's root whenever `size()` reaches
/// that checkpoint's `tree_size`. Calling [`root`] per checkpoint would
/// rehash every leaf each time.
///
/// The state survives restarts through [`CompactRange::to_bytes`] and
/// [`CompactRange::from_bytes`], so an appender need not re-read old leaves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    /// Invariant: `hashes.len() == size.count_ones()`.
    hashes: Vec<Hash>,
}

impl CompactRange {
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of leaves appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn push(&mut self, leaf_hash: Hash) {
        // Like incrementing a binary counter: each trailing one bit of the
        // size is a perfect subtree as tall as `node`, so they merge.
        let mut node = leaf_hash;
        let mut size = self.size;
        while size & 1 == 1 {
            let left = self
                .hashes
                .pop()
                .expect("invariant: one hash per set bit of size");
            node = node_hash(&left, &node);
            size >>= 1;
        }
        self.hashes.push(node);
        self.size += 1;
    }

    /// The root of all leaves pushed so far, equal to [`root`] of them.
    pub fn root(&self) -> Hash {
        // The smallest subtrees hang off the right edge of the tree.
        let mut subtrees = self.hashes.iter().rev();
        let Some(mut acc) = subtrees.next().copied() else {
            return empty_root();
        };
        for left in subtrees {
            acc = node_hash(left, &acc);
        }
        acc
    }

    /// The subtree roots concatenated, largest first; store it next to the
    /// size, which it does not contain.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.hashes.concat()
    }

    pub fn from_bytes(size: u64, bytes: &[u8]) -> Result<Self, MerkleError> {
        if size > MAX_TREE_SIZE {
            return Err(MerkleError::CompactRangeTooLarge { size });
        }
        let expected = size.count_ones() as usize * 32;
        if bytes.len() != expected {
            return Err(MerkleError::CompactRangeLength {
                size,
                expected,
                got: bytes.len(),
            });
        }
        let hashes = bytes
            .chunks_exact(32)
            .map(|chunk| {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(chunk);
                hash
            })
            .collect();
        Ok(Self { size, hashes })
    }
}

/// The audit path of leaf `leaf_index` in the tree of `leaf_hashes`,
/// RFC 9162 §2.1.3.1: sibling hashes from the leaf up to the root.
pub fn inclusion_proof(leaf_index: u64, leaf_hashes: &[Hash]) -> Result<Vec<Hash>, MerkleError> {
    let size = leaf_hashes.len() as u64;
    let index = match usize::try_from(leaf_index) {
        Ok(index) if index < leaf_hashes.len() => index,
        _ => {
            return Err(MerkleError::IndexOutOfRange {
                index: leaf_index,
                size,
            })
        }
    };
    let mut proof = Vec::with_capacity(inclusion_proof_len(leaf_index, size));
    audit_path(index, leaf_hashes, &mut proof);
    Ok(proof)
}

/// PATH(m, D[n]); the recursion pushes the deepest sibling first.
fn audit_path(m: usize, leaves: &[Hash], out: &mut Vec<Hash>) {
    if leaves.len() <= 1 {
        return;
    }
    let k = split_point(leaves.len());
    let (left, right) = leaves.split_at(k);
    if m < k {
        audit_path(m, left, out);
        out.push(subtree_root(right));
    } else {
        audit_path(m - k, right, out);
        out.push(subtree_root(left));
    }
}

/// How many hashes the inclusion proof of `index` in a tree of `size` has:
/// the levels below the point where the leaf's path leaves the right edge
/// (`inner`), plus the left siblings above it (`border`).
fn inclusion_proof_len(index: u64, size: u64) -> usize {
    if index >= size {
        return 0;
    }
    let inner = u64::BITS - (index ^ (size - 1)).leading_zeros();
    let border = index.checked_shr(inner).unwrap_or(0).count_ones();
    (inner + border) as usize
}

/// Checks that `leaf_hash` is leaf `leaf_index` of the tree of `tree_size`
/// leaves whose root is `root`, with the algorithm of RFC 9162 §2.1.3.2.
///
/// A proof binds the leaf's position and the root; it binds the tree size
/// only through the proof's shape (leaf 0 has the same path shape in trees of
/// 5 and 6 leaves), which is why checkpoints sign the size with the root.
pub fn verify_inclusion(
    leaf_index: u64,
    tree_size: u64,
    leaf_hash: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), MerkleError> {
    // Step 1.
    if leaf_index >= tree_size {
        return Err(MerkleError::IndexOutOfRange {
            index: leaf_index,
            size: tree_size,
        });
    }
    let wrong_length = || MerkleError::InclusionProofLength {
        got: proof.len(),
        expected: inclusion_proof_len(leaf_index, tree_size),
        index: leaf_index,
        size: tree_size,
    };
    // Step 2 and 3.
    let mut f_n = leaf_index;
    let mut s_n = tree_size - 1;
    let mut r = *leaf_hash;
    // Step 4.
    for p in proof {
        if s_n == 0 {
            return Err(wrong_length());
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    // Step 5.
    if s_n != 0 {
        return Err(wrong_length());
    }
    if r != *root {
        return Err(MerkleError::InclusionRootMismatch {
            index: leaf_index,
            size: tree_size,
            computed: r,
            expected: *root,
        });
    }
    Ok(())
}

/// The proof that the tree of the first `old_size` of `leaf_hashes` is a
/// prefix of the tree of all of them, RFC 9162 §2.1.4.1. It is empty when
/// `old_size` is 0 or the whole list: there is nothing to prove.
pub fn consistency_proof(old_size: u64, leaf_hashes: &[Hash]) -> Result<Vec<Hash>, MerkleError> {
    let new_size = leaf_hashes.len() as u64;
    let m = match usize::try_from(old_size) {
        Ok(m) if m <= leaf_hashes.len() => m,
        _ => return Err(MerkleError::OldSizeTooLarge { old_size, new_size }),
    };
    let mut proof = Vec::with_capacity(consistency_proof_len(old_size, new_size));
    if m > 0 {
        subproof(m, leaf_hashes, true, &mut proof);
    }
    Ok(proof)
}

/// SUBPROOF(m, D[n], b) for `0 < m <= n`; `complete` is b: whether the old
/// tree's root is exactly this subtree, in which case the verifier has it.
fn subproof(m: usize, leaves: &[Hash], complete: bool, out: &mut Vec<Hash>) {
    if m == leaves.len() {
        if !complete {
            out.push(subtree_root(leaves));
        }
        return;
    }
    // Here 0 < m < n, so n >= 2.
    let k = split_point(leaves.len());
    let (left, right) = leaves.split_at(k);
    if m <= k {
        subproof(m, left, complete, out);
        out.push(subtree_root(right));
    } else {
        subproof(m - k, right, false, out);
        out.push(subtree_root(left));
    }
}

/// How many hashes the consistency proof from `old_size` to `new_size` has.
fn consistency_proof_len(old_size: u64, new_size: u64) -> usize {
    if old_size == 0 || old_size >= new_size {
        return 0;
    }
    // The inclusion path of the old tree's last leaf, minus the levels inside
    // the largest perfect subtree it ends with, plus that subtree's root
    // unless it is the whole old tree (then the verifier has it already).
    let last = old_size - 1;
    let inner = u64::BITS - (last ^ (new_size - 1)).leading_zeros();
    let border = last.checked_shr(inner).unwrap_or(0).count_ones();
    let shift = old_size.trailing_zeros();
    let seed = if old_size.is_power_of_two() { 0 } else { 1 };
    (seed + inner - shift + border) as usize
}

/// Checks that the tree of `new_size` leaves with root `new_root` extends
/// the tree of `old_size` leaves with root `old_root`, with the algorithm of
/// RFC 9162 §2.1.4.2 for `0 < old_size < new_size`.
///
/// The RFC leaves the other cases out; we accept them only with an empty
/// proof: equal sizes need equal roots, and an empty old tree needs the
/// empty root (it is a prefix of every tree).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), MerkleError> {
    if old_size > new_size {
        return Err(MerkleError::OldSizeTooLarge { old_size, new_size });
    }
    let wrong_length = || MerkleError::ConsistencyProofLength {
        got: proof.len(),
        expected: consistency_proof_len(old_size, new_size),
        old_size,
        new_size,
    };
    if old_size == new_size || old_size == 0 {
        if !proof.is_empty() {
            return Err(wrong_length());
        }
        if old_size == 0 && *old_root != empty_root() {
            return Err(MerkleError::NotEmptyRoot { got: *old_root });
        }
        if old_size == new_size && old_root != new_root {
            return Err(MerkleError::EqualSizeRootsDiffer {
                size: old_size,
                old_root: *old_root,
                new_root: *new_root,
            });
        }
        return Ok(());
    }

    // Step 1.
    let Some((first_hash, rest)) = proof.split_first() else {
        return Err(wrong_length());
    };
    // Step 2: prepending old_root means it seeds the walk and the whole
    // proof follows it.
    let (seed, path) = if old_size.is_power_of_two() {
        (old_root, proof)
    } else {
        (first_hash, rest)
    };
    // Step 3.
    let mut f_n = old_size - 1;
    let mut s_n = new_size - 1;
    // Step 4.
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    // Step 5.
    let mut fr = *seed;
    let mut sr = *seed;
    // Step 6.
    for c in path {
        if s_n == 0 {
            return Err(wrong_length());
        }
        if f_n & 1 == 1 || f_n == s_n {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    // Step 7.
    if s_n != 0 {
        return Err(wrong_length());
    }
    if fr != *old_root {
        return Err(MerkleError::OldRootMismatch {
            old_size,
            new_size,
            computed: fr,
            expected: *old_root,
        });
    }
    if sr != *new_root {
        return Err(MerkleError::NewRootMismatch {
            old_size,
            new_size,
            computed: sr,
            expected: *new_root,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn h(hex_str: &str) -> Hash {
        let bytes = hex::decode(hex_str).unwrap();
        bytes.try_into().unwrap()
    }

    fn hs(hex_strs: &[&str]) -> Vec<Hash> {
        hex_strs.iter().map(|s| h(s)).collect()
    }

    // The inputs of the RFC 6962 reference tests (Certificate Transparency
    // C++ merkle_tree_test.cc, trillian merkle/rfc6962 and merkle/proof).
    const LEAF_INPUTS: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];

    const LEAF_HASHES: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ];

    /// ROOTS[n] is the root of the first n leaves.
    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    const H01: &str = "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125";
    const H23: &str = "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e";
    const H45: &str = "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a";
    const H67: &str = "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0";
    const H0123: &str = "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7";
    const H4567: &str = "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4";

    /// (leaf index, tree size, proof); trillian numbers leaves from 1.
    fn inclusion_vectors() -> Vec<(u64, u64, Vec<Hash>)> {
        vec![
            (0, 1, vec![]),
            (0, 8, hs(&[LEAF_HASHES[1], H23, H4567])),
            (5, 8, hs(&[LEAF_HASHES[4], H67, H0123])),
            (2, 3, hs(&[H01])),
            (1, 5, hs(&[LEAF_HASHES[0], H23, LEAF_HASHES[4]])),
        ]
    }

    /// (old size, new size, proof).
    fn consistency_vectors() -> Vec<(u64, u64, Vec<Hash>)> {
        vec![
            (1, 1, vec![]),
            (1, 8, hs(&[LEAF_HASHES[1], H23, H4567])),
            (6, 8, hs(&[H45, H67, H0123])),
            (2, 5, hs(&[H23, LEAF_HASHES[4]])),
            (2, 8, hs(&[H23, H4567])),
        ]
    }

    fn reference_leaves() -> Vec<Hash> {
        LEAF_INPUTS
            .iter()
            .map(|input| leaf_hash(&hex::decode(input).unwrap()))
            .collect()
    }

    fn random_leaves(count: usize, seed: u64) -> Vec<Hash> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..count).map(|_| rng.gen()).collect()
    }

    fn flip_bit(hash: &Hash, bit: usize) -> Hash {
        let mut flipped = *hash;
        flipped[bit / 8] ^= 1 << (bit % 8);
        flipped
    }

    #[test]
    fn leaf_and_node_hashes_match_rfc6962() {
        let leaves = reference_leaves();
        assert_eq!(leaves, hs(&LEAF_HASHES));
        assert_eq!(node_hash(&leaves[0], &leaves[1]), h(H01));
        assert_eq!(node_hash(&leaves[4], &leaves[5]), h(H45));
        assert_eq!(node_hash(&h(H01), &h(H23)), h(H0123));
        assert_eq!(node_hash(&h(H45), &h(H67)), h(H4567));
        assert_eq!(node_hash(&h(H0123), &h(H4567)), h(ROOTS[8]));
    }

    #[test]
    fn empty_root_is_sha256_of_nothing() {
        assert_eq!(empty_root(), h(ROOTS[0]));
        assert_eq!(root(&[]), h(ROOTS[0]));
        assert_eq!(CompactRange::new().root(), h(ROOTS[0]));
    }

    #[test]
    fn roots_match_rfc6962_for_every_prefix() {
        let leaves = reference_leaves();
        let mut range = CompactRange::new();
        for n in 0..=leaves.len() {
            assert_eq!(root(&leaves[..n]), h(ROOTS[n]), "root of {n} leaves");
            assert_eq!(range.size(), n as u64);
            assert_eq!(
                range.root(),
                h(ROOTS[n]),
                "compact range root of {n} leaves"
            );
            if let Some(leaf) = leaves.get(n) {
                range.push(*leaf);
            }
        }
    }

    #[test]
    fn inclusion_proofs_match_rfc6962() {
        let leaves = reference_leaves();
        for (index, size, want) in inclusion_vectors() {
            let tree = &leaves[..size as usize];
            let proof = inclusion_proof(index, tree).unwrap();
            assert_eq!(proof, want, "proof for leaf {index} of {size}");
            let root = h(ROOTS[size as usize]);
            verify_inclusion(index, size, &leaves[index as usize], &proof, &root).unwrap();
            for probe in corrupt_inclusion(index, size, &leaves[index as usize], &proof, &root) {
                assert!(
                    verify_inclusion(
                        probe.index,
                        probe.size,
                        &probe.leaf,
                        &probe.proof,
                        &probe.root
                    )
                    .is_err(),
                    "leaf {index} of {size}: {} verified",
                    probe.desc
                );
            }
        }
    }

    #[test]
    fn consistency_proofs_match_rfc6962() {
        let leaves = reference_leaves();
        for (old_size, new_size, want) in consistency_vectors() {
            let proof = consistency_proof(old_size, &leaves[..new_size as usize]).unwrap();
            assert_eq!(proof, want, "proof from {old_size} to {new_size}");
            let (old_root, new_root) = (h(ROOTS[old_size as usize]), h(ROOTS[new_size as usize]));
            verify_consistency(old_size, new_size, &old_root, &new_root, &proof).unwrap();
            if proof.is_empty() {
                continue;
            }
            for probe in corrupt_consistency(old_size, new_size, &old_root, &new_root, &proof) {
                assert!(
                    verify_consistency(
                        probe.old_size,
                        probe.new_size,
                        &probe.old_root,
                        &probe.new_root,
                        &probe.proof
                    )
                    .is_err(),
                    "{old_size} -> {new_size}: {} verified",
                    probe.desc
                );
            }
        }
    }

    #[test]
    fn every_flipped_bit_of_a_reference_proof_fails() {
        let leaves = reference_leaves();
        let root = h(ROOTS[8]);
        let proof = inclusion_proof(5, &leaves).unwrap();
        for element in 0..proof.len() {
            for bit in 0..256 {
                let mut bad = proof.clone();
                bad[element] = flip_bit(&bad[element], bit);
                assert!(verify_inclusion(5, 8, &leaves[5], &bad, &root).is_err());
            }
        }
        for bit in 0..256 {
            let bad_leaf = flip_bit(&leaves[5], bit);
            assert!(verify_inclusion(5, 8, &bad_leaf, &proof, &root).is_err());
            let bad_root = flip_bit(&root, bit);
            assert!(verify_inclusion(5, 8, &leaves[5], &proof, &bad_root).is_err());
        }

        let old_root = h(ROOTS[6]);
        let proof = consistency_proof(6, &leaves).unwrap();
        for element in 0..proof.len() {
            for bit in 0..256 {
                let mut bad = proof.clone();
                bad[element] = flip_bit(&bad[element], bit);
                assert!(verify_consistency(6, 8, &old_root, &root, &bad).is_err());
            }
        }
        for bit in 0..256 {
            let bad_old = flip_bit(&old_root, bit);
            assert!(verify_consistency(6, 8, &bad_old, &root, &proof).is_err());
            let bad_new = flip_bit(&root, bit);
            assert!(verify_consistency(6, 8, &old_root, &bad_new, &proof).is_err());
        }
    }

    struct InclusionProbe {
        index: u64,
        size: u64,
        leaf: Hash,
        proof: Vec<Hash>,
        root: Hash,
        desc: String,
    }

    /// Trillian's corruptInclusionProof, plus one flipped bit per hash.
    fn corrupt_inclusion(
        index: u64,
        size: u64,
        leaf: &Hash,
        proof: &[Hash],
        root: &Hash,
    ) -> Vec<InclusionProbe> {
        let probe =
            |index: u64, size: u64, leaf: Hash, proof: Vec<Hash>, root: Hash, desc: &str| {
                InclusionProbe {
                    index,
                    size,
                    leaf,
                    proof,
                    root,
                    desc: desc.to_string(),
                }
            };
        let some_hash = h("abacaba000000000000000000000000000000000000000000060061e00123456");
        let with = |front: Option<Hash>, back: Option<Hash>| -> Vec<Hash> {
            front
                .into_iter()
                .chain(proof.iter().copied())
                .chain(back)
                .collect()
        };
        let mut probes = vec![
            probe(
                index.wrapping_sub(1),
                size,
                *leaf,
                proof.to_vec(),
                *root,
                "index - 1",
            ),
            probe(index + 1, size, *leaf, proof.to_vec(), *root, "index + 1"),
            probe(index ^ 2, size, *leaf, proof.to_vec(), *root, "index ^ 2"),
            probe(index, size * 2, *leaf, proof.to_vec(), *root, "size * 2"),
            probe(index, size / 2, *leaf, proof.to_vec(), *root, "size / 2"),
            probe(
                index,
                size,
                leaf_hash(b"WrongLeaf"),
                proof.to_vec(),
                *root,
                "wrong leaf",
            ),
            probe(
                index,
                size,
                *leaf,
                proof.to_vec(),
                empty_root(),
                "empty root",
            ),
            probe(index, size, *leaf, proof.to_vec(), some_hash, "random root"),
            probe(
                index,
                size,
                *leaf,
                with(None, Some([0; 32])),
                *root,
                "trailing zeros",
            ),
            probe(
                index,
                size,
                *leaf,
                with(None, Some(*root)),
                *root,
                "trailing root",
            ),
            probe(
                index,
                size,
                *leaf,
                with(Some([0; 32]), None),
                *root,
                "preceding zeros",
            ),
            probe(
                index,
                size,
                *leaf,
                with(Some(*root), None),
                *root,
                "preceding root",
            ),
        ];
        for i in 0..proof.len() {
            let mut bad = proof.to_vec();
            bad[i] = flip_bit(&bad[i], 3);
            probes.push(probe(
                index,
                size,
                *leaf,
                bad,
                *root,
                &format!("proof[{i}] bit 3"),
            ));
        }
        if let Some((_, shorter)) = proof.split_last() {
            probes.push(probe(
                index,
                size,
                *leaf,
                shorter.to_vec(),
                *root,
                "removed last",
            ));
        }
        if proof.len() > 1 {
            let mut inserted = proof.to_vec();
            inserted.insert(1, some_hash);
            probes.push(probe(
                index,
                size,
                *leaf,
                inserted,
                *root,
                "inserted component",
            ));
            let mut swapped = proof.to_vec();
            swapped.swap(0, 1);
            probes.push(probe(
                index,
                size,
                *leaf,
                swapped,
                *root,
                "swapped first two",
            ));
        }
        probes
    }

    struct ConsistencyProbe {
        old_size: u64,
        new_size: u64,
        old_root: Hash,
        new_root: Hash,
        proof: Vec<Hash>,
        desc: String,
    }

    /// Trillian's corruptConsistencyProof, plus one flipped bit per hash.
    fn corrupt_consistency(
        old_size: u64,
        new_size: u64,
        old_root: &Hash,
        new_root: &Hash,
        proof: &[Hash],
    ) -> Vec<ConsistencyProbe> {
        let probe = |old_size: u64,
                     new_size: u64,
                     old_root: Hash,
                     new_root: Hash,
                     proof: Vec<Hash>,
                     desc: &str| {
            ConsistencyProbe {
                old_size,
                new_size,
                old_root,
                new_root,
                proof,
                desc: desc.to_string(),
            }
        };
        let wrong_root = leaf_hash(b"WrongRoot");
        let with = |front: Option<Hash>, back: Option<Hash>| -> Vec<Hash> {
            front
                .into_iter()
                .chain(proof.iter().copied())
                .chain(back)
                .collect()
        };
        let (o, n, or, nr) = (old_size, new_size, *old_root, *new_root);
        let mut probes = vec![
            probe(o - 1, n, or, nr, proof.to_vec(), "old size - 1"),
            probe(o + 1, n, or, nr, proof.to_vec(), "old size + 1"),
            probe(o ^ 2, n, or, nr, proof.to_vec(), "old size ^ 2"),
            probe(o, n * 2, or, nr, proof.to_vec(), "new size * 2"),
            probe(o, n / 2, or, nr, proof.to_vec(), "new size / 2"),
            probe(o, n, wrong_root, nr, proof.to_vec(), "wrong old root"),
            probe(o, n, or, wrong_root, proof.to_vec(), "wrong new root"),
            probe(o, n, nr, or, proof.to_vec(), "swapped roots"),
            probe(o, n, or, nr, vec![], "empty proof"),
            probe(o, n, or, nr, with(None, Some([0; 32])), "trailing zeros"),
            probe(o, n, or, nr, with(None, Some(or)), "trailing old root"),
            probe(o, n, or, nr, with(None, Some(nr)), "trailing new root"),
            probe(o, n, or, nr, with(Some([0; 32]), None), "preceding zeros"),
            probe(o, n, or, nr, with(Some(or), None), "preceding old root"),
            probe(o, n, or, nr, with(Some(nr), None), "preceding new root"),
            probe(
                o,
                n,
                or,
                nr,
                with(Some(proof[0]), None),
                "preceding proof[0]",
            ),
        ];
        if let Some((_, shorter)) = proof.split_last() {
            probes.push(probe(o, n, or, nr, shorter.to_vec(), "truncated"));
        }
        for i in 0..proof.len() {
            let mut bad = proof.to_vec();
            bad[i] = flip_bit(&bad[i], 4);
            probes.push(probe(o, n, or, nr, bad, &format!("proof[{i}] bit 4")));
        }
        if proof.len() > 1 {
            let mut swapped = proof.to_vec();
            swapped.swap(0, 1);
            probes.push(probe(o, n, or, nr, swapped, "swapped first two"));
        }
        probes
    }

    const GENERATED_MAX: usize = 70;

    #[test]
    fn generated_inclusion_proofs_verify_and_tampering_fails() {
        let leaves = random_leaves(GENERATED_MAX, 0x5eed_0001);
        let mut rng = StdRng::seed_from_u64(0x5eed_0002);
        for size in 1..=GENERATED_MAX {
            let tree = &leaves[..size];
            let size = size as u64;
            let root = root(tree);
            for index in 0..size {
                let leaf = &tree[index as usize];
                let proof = inclusion_proof(index, tree).unwrap();
                assert_eq!(proof.len(), inclusion_proof_len(index, size));
                verify_inclusion(index, size, leaf, &proof, &root)
                    .unwrap_or_else(|e| panic!("leaf {index} of {size}: {e}"));

                for probe in corrupt_inclusion(index, size, leaf, &proof, &root) {
                    assert!(
                        verify_inclusion(
                            probe.index,
                            probe.size,
                            &probe.leaf,
                            &probe.proof,
                            &probe.root
                        )
                        .is_err(),
                        "leaf {index} of {size}: {} verified",
                        probe.desc
                    );
                }
                for i in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[i] = flip_bit(&bad[i], rng.gen_range(0..256));
                    assert!(verify_inclusion(index, size, leaf, &bad, &root).is_err());
                }
                let bad_leaf = flip_bit(leaf, rng.gen_range(0..256));
                assert!(verify_inclusion(index, size, &bad_leaf, &proof, &root).is_err());
                let bad_root = flip_bit(&root, rng.gen_range(0..256));
                assert!(verify_inclusion(index, size, leaf, &proof, &bad_root).is_err());
                // Every other position: the path's directions identify the leaf.
                for other in (0..size).filter(|&other| other != index) {
                    assert!(verify_inclusion(other, size, leaf, &proof, &root).is_err());
                }
            }
        }
    }

    #[test]
    fn generated_consistency_proofs_verify_and_tampering_fails() {
        let leaves = random_leaves(GENERATED_MAX, 0x5eed_0003);
        let mut rng = StdRng::seed_from_u64(0x5eed_0004);
        let roots: Vec<Hash> = (0..=GENERATED_MAX).map(|n| root(&leaves[..n])).collect();
        for new_size in 0..=GENERATED_MAX {
            let tree = &leaves[..new_size];
            for old_size in 0..=new_size {
                let (o, n) = (old_size as u64, new_size as u64);
                let (old_root, new_root) = (&roots[old_size], &roots[new_size]);
                let proof = consistency_proof(o, tree).unwrap();
                assert_eq!(proof.len(), consistency_proof_len(o, n));
                verify_consistency(o, n, old_root, new_root, &proof)
                    .unwrap_or_else(|e| panic!("{o} -> {n}: {e}"));
                if proof.is_empty() {
                    continue;
                }

                for probe in corrupt_consistency(o, n, old_root, new_root, &proof) {
                    assert!(
                        verify_consistency(
                            probe.old_size,
                            probe.new_size,
                            &probe.old_root,
                            &probe.new_root,
                            &probe.proof
                        )
                        .is_err(),
                        "{o} -> {n}: {} verified",
                        probe.desc
                    );
                }
                for i in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[i] = flip_bit(&bad[i], rng.gen_range(0..256));
                    assert!(verify_consistency(o, n, old_root, new_root, &bad).is_err());
                }
                let bad_old = flip_bit(old_root, rng.gen_range(0..256));
                assert!(verify_consistency(o, n, &bad_old, new_root, &proof).is_err());
                let bad_new = flip_bit(new_root, rng.gen_range(0..256));
                assert!(verify_consistency(o, n, old_root, &bad_new, &proof).is_err());
                // Claiming the proof is for any other old size fails.
                for other in (1..n).filter(|&other| other != o) {
                    assert!(
                        verify_consistency(other, n, old_root, new_root, &proof).is_err(),
                        "{o} -> {n} verified as {other} -> {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn compact_range_matches_root_for_every_size_and_survives_storage() {
        let leaves = random_leaves(GENERATED_MAX, 0x5eed_0005);
        let mut range = CompactRange::new();
        for (n, leaf) in leaves.iter().enumerate() {
            assert_eq!(range.root(), root(&leaves[..n]), "size {n}");
            let bytes = range.to_bytes();
            assert_eq!(bytes.len(), 32 * range.size().count_ones() as usize);
            let mut restored = CompactRange::from_bytes(range.size(), &bytes).unwrap();
            assert_eq!(restored, range);

            range.push(*leaf);
            restored.push(*leaf);
            assert_eq!(
                restored, range,
                "a restored range keeps appending the same way"
            );
        }
        assert_eq!(range.root(), root(&leaves));
    }

    #[test]
    fn compact_range_from_bytes_refuses_bad_lengths() {
        let err = CompactRange::from_bytes(5, &[0; 32]).unwrap_err();
        assert_eq!(
            err,
            MerkleError::CompactRangeLength {
                size: 5,
                expected: 64,
                got: 32
            }
        );
        assert_eq!(
            err.to_string(),
            "compact range of size 5 must be 64 bytes (one hash per set bit of the size), got 32"
        );
        assert!(CompactRange::from_bytes(0, &[0; 1]).is_err());
        assert!(CompactRange::from_bytes(4, &[0; 33]).is_err());
        assert_eq!(
            CompactRange::from_bytes(0, &[]).unwrap(),
            CompactRange::new()
        );
        assert!(matches!(
            CompactRange::from_bytes(u64::MAX, &[0; 64 * 32]),
            Err(MerkleError::CompactRangeTooLarge { .. })
        ));
    }

    #[test]
    fn inclusion_errors_say_what_is_wrong() {
        let leaves = random_leaves(9, 7);
        let root = root(&leaves);
        let proof = inclusion_proof(4, &leaves).unwrap();
        assert_eq!(proof.len(), 4);

        let err = verify_inclusion(4, 9, &leaves[4], &proof[..3], &root).unwrap_err();
        assert_eq!(
            err.to_string(),
            "inclusion proof has 3 hashes, expected 4 for leaf 4 of 9"
        );
        let long = [proof.clone(), vec![[0; 32]]].concat();
        let err = verify_inclusion(4, 9, &leaves[4], &long, &root).unwrap_err();
        assert_eq!(
            err.to_string(),
            "inclusion proof has 5 hashes, expected 4 for leaf 4 of 9"
        );

        let err = verify_inclusion(4, 9, &leaves[5], &proof, &root).unwrap_err();
        assert!(matches!(
            err,
            MerkleError::InclusionRootMismatch {
                index: 4,
                size: 9,
                ..
            }
        ));
        assert!(err.to_string().contains(&hex::encode(root)), "{err}");

        let err = verify_inclusion(9, 9, &leaves[4], &proof, &root).unwrap_err();
        assert_eq!(
            err.to_string(),
            "leaf index 9 is out of range for a tree of size 9"
        );
    }

    #[test]
    fn inclusion_edge_cases_never_panic() {
        let leaves = random_leaves(3, 8);
        assert_eq!(
            inclusion_proof(0, &[]),
            Err(MerkleError::IndexOutOfRange { index: 0, size: 0 })
        );
        assert!(inclusion_proof(3, &leaves).is_err());
        assert!(inclusion_proof(u64::MAX, &leaves).is_err());
        assert_eq!(
            inclusion_proof(0, &leaves[..1]).unwrap(),
            Vec::<Hash>::new()
        );

        let some = leaves[0];
        assert!(verify_inclusion(0, 0, &some, &[], &empty_root()).is_err());
        assert!(verify_inclusion(u64::MAX, u64::MAX, &some, &[], &some).is_err());
        assert!(verify_inclusion(u64::MAX - 1, u64::MAX, &some, &[some; 3], &some).is_err());
        assert!(verify_inclusion(0, u64::MAX, &some, &[some; 70], &some).is_err());
        // A one-leaf tree's root is its leaf and the proof is empty.
        verify_inclusion(0, 1, &some, &[], &some).unwrap();
        assert!(verify_inclusion(0, 1, &some, &[some], &some).is_err());
        assert!(verify_inclusion(0, 1, &some, &[], &leaves[1]).is_err());
    }

    #[test]
    fn inclusion_proof_does_not_bind_tree_size_alone() {
        // Leaf 0's path has the same shape in trees of 5 and 6 leaves, so the
        // size-5 proof "verifies" against the size-5 root claimed for size 6.
        // Only a signed (size, root) pair rules this out.
        let leaves = random_leaves(6, 9);
        let proof = inclusion_proof(0, &leaves[..5]).unwrap();
        let root5 = root(&leaves[..5]);
        verify_inclusion(0, 6, &leaves[0], &proof, &root5).unwrap();
        assert!(verify_inclusion(0, 6, &leaves[0], &proof, &root(&leaves)).is_err());
    }

    #[test]
    fn consistency_edge_cases() {
        let leaves = random_leaves(8, 10);
        let r = |n: usize| root(&leaves[..n]);

        assert_eq!(
            consistency_proof(9, &leaves),
            Err(MerkleError::OldSizeTooLarge {
                old_size: 9,
                new_size: 8
            })
        );
        assert!(consistency_proof(u64::MAX, &leaves).is_err());
        assert!(consistency_proof(0, &leaves).unwrap().is_empty());
        assert!(consistency_proof(8, &leaves).unwrap().is_empty());
        assert!(consistency_proof(0, &[]).unwrap().is_empty());

        // Equal sizes: the roots must match and the proof must be empty.
        verify_consistency(5, 5, &r(5), &r(5), &[]).unwrap();
        assert!(matches!(
            verify_consistency(5, 5, &r(5), &r(6), &[]),
            Err(MerkleError::EqualSizeRootsDiffer { size: 5, .. })
        ));
        assert!(verify_consistency(5, 5, &r(5), &r(5), &[r(5)]).is_err());

        // The empty tree is a prefix of everything, with the empty root only.
        verify_consistency(0, 0, &empty_root(), &empty_root(), &[]).unwrap();
        verify_consistency(0, 8, &empty_root(), &r(8), &[]).unwrap();
        assert_eq!(
            verify_consistency(0, 8, &r(1), &r(8), &[]),
            Err(MerkleError::NotEmptyRoot { got: r(1) })
        );
        assert!(verify_consistency(0, 8, &empty_root(), &r(8), &[r(8)]).is_err());

        // Time travel.
        let err = verify_consistency(8, 6, &r(8), &r(6), &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "old tree size 8 is larger than new tree size 6"
        );

        let proof = consistency_proof(6, &leaves).unwrap();
        let err = verify_consistency(6, 8, &r(6), &r(8), &proof[..2]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "consistency proof has 2 hashes, expected 3 from size 6 to 8"
        );
        let err = verify_consistency(6, 8, &r(6), &r(8), &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "consistency proof has 0 hashes, expected 3 from size 6 to 8"
        );
        let err = verify_consistency(6, 8, &r(5), &r(8), &proof).unwrap_err();
        assert!(matches!(
            err,
            MerkleError::OldRootMismatch {
                old_size: 6,
                new_size: 8,
                ..
            }
        ));
        let err = verify_consistency(6, 8, &r(6), &r(7), &proof).unwrap_err();
        assert!(matches!(
            err,
            MerkleError::NewRootMismatch {
                old_size: 6,
                new_size: 8,
                ..
            }
        ));

        // Huge sizes are rejected, not overflowed.
        let some = leaves[0];
        assert!(verify_consistency(u64::MAX - 1, u64::MAX, &some, &some, &[some; 3]).is_err());
        assert!(verify_consistency(1, u64::MAX, &some, &some, &[some; 64]).is_err());
        assert!(verify_consistency(1 << 63, u64::MAX, &some, &some, &[some; 63]).is_err());
    }
}
