//! Delta objects (issue 12, "scattered small writes"): a chunk given as a
//! full base chunk plus patches, so a chunk of which changed-block tracking
//! says only small parts changed costs those parts, not 4 MiB.
//!
//! A delta is stored like a chunk (object kind 3, under `chunks/` or in a
//! pack, named by the keyed digest of its payload), so everything that
//! moves, lists, seals, verifies and collects chunks handles it unchanged;
//! only the disk index entry (index version 3) says that the object is a
//! delta and which base it needs. The depth is always 1: the base is a full
//! chunk, never another delta, so a chunk restores from at most two
//! objects. The encoding is canonical (patches sorted, apart, non-empty,
//! inside the chunk, nothing after them), so equal deltas have one name.

use crate::error::{Error, Result};
use crate::ChunkId;

/// The 4 bytes a delta payload starts with.
pub const DELTA_MAGIC: [u8; 4] = *b"VDLT";
/// The delta payload version this build reads and writes.
pub const DELTA_VERSION: u32 = 1;
/// The largest chunk a delta may describe (the largest chunk size).
pub const MAX_DELTA_CHUNK: u32 = 64 << 20;
/// Bytes before the patch table: magic, version, base id, chunk length,
/// patch count.
const PREFIX_LEN: usize = 4 + 4 + 32 + 4 + 4;
/// Bytes of one patch table entry: offset (u32), length (u32).
const PATCH_LEN: usize = 8;

/// A chunk given as its full base chunk with some byte ranges replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The full chunk the patches apply to.
    pub base: ChunkId,
    /// Length of the chunk (the base's length, and the result's).
    pub chunk_len: u32,
    /// `(offset, bytes)` in increasing order, apart (a gap of at least
    /// one byte between two patches), non-empty and inside the chunk.
    patches: Vec<(u32, Vec<u8>)>,
}

impl Delta {
    /// A delta from its patches `(offset, bytes)` in any order. Touching
    /// or overlapping patches are merged, later ones winning; empty ones
    /// are dropped. Fails (an internal error) on a chunk longer than
    /// [`MAX_DELTA_CHUNK`] or a patch past its end.
    pub fn new(base: ChunkId, chunk_len: u32, patches: Vec<(u32, Vec<u8>)>) -> Result<Self> {
        if chunk_len > MAX_DELTA_CHUNK {
            return Err(Error::internal("a delta of a chunk over 64 MiB"));
        }
        if patches
            .iter()
            .any(|(at, b)| u64::from(*at) + b.len() as u64 > u64::from(chunk_len))
        {
            return Err(Error::internal("a delta patch past the chunk's end"));
        }
        let mut out = union_of(&patches);
        for (offset, bytes) in patches.iter().filter(|(_, b)| !b.is_empty()) {
            let at = out.partition_point(|(start, _)| start <= offset) - 1;
            let (start, range) = &mut out[at];
            let from = (offset - *start) as usize;
            range[from..from + bytes.len()].copy_from_slice(bytes);
        }
        Ok(Self {
            base,
            chunk_len,
            patches: out,
        })
    }

    /// The patches, in chunk order.
    pub fn patches(&self) -> &[(u32, Vec<u8>)] {
        &self.patches
    }

    /// The byte ranges `(offset, length)` the patches replace.
    pub fn ranges(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.patches.iter().map(|(at, b)| (*at, b.len() as u32))
    }

    /// Bytes of patch data (what the delta replaces of its base).
    pub fn patched_bytes(&self) -> u64 {
        self.patches.iter().map(|(_, b)| b.len() as u64).sum()
    }

    /// Applies the patches to the base chunk's plaintext, giving the
    /// chunk. Fails as damage of `key` when the base is not as long as the
    /// delta says.
    pub fn apply(&self, key: &str, base: &[u8]) -> Result<Vec<u8>> {
        if base.len() as u64 != u64::from(self.chunk_len) {
            return Err(Error::corrupt(
                key,
                format!(
                    "delta of a {} byte chunk on a {} byte base",
                    self.chunk_len,
                    base.len()
                ),
            ));
        }
        let mut chunk = base.to_vec();
        for (at, bytes) in &self.patches {
            let at = *at as usize;
            chunk[at..at + bytes.len()].copy_from_slice(bytes);
        }
        Ok(chunk)
    }

    /// Encodes the payload: magic, version, base id, chunk length, patch
    /// count, the patch table (offset, length), then the patch bytes in
    /// the same order. Integers are little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let table = self.patches.len() * PATCH_LEN;
        let mut out = Vec::with_capacity(PREFIX_LEN + table + self.patched_bytes() as usize);
        out.extend_from_slice(&DELTA_MAGIC);
        out.extend_from_slice(&DELTA_VERSION.to_le_bytes());
        out.extend_from_slice(&self.base.0);
        out.extend_from_slice(&self.chunk_len.to_le_bytes());
        out.extend_from_slice(&(self.patches.len() as u32).to_le_bytes());
        for (at, bytes) in &self.patches {
            out.extend_from_slice(&at.to_le_bytes());
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        }
        self.patches
            .iter()
            .for_each(|(_, bytes)| out.extend_from_slice(bytes));
        out
    }

    /// Decodes and validates a payload (untrusted bytes, named `key` in
    /// errors): nothing is allocated beyond the payload's length, and only
    /// the canonical encoding is accepted.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let bad = |what: &str| Error::corrupt(key, format!("delta {what}"));
        if bytes.len() < PREFIX_LEN || bytes[..4] != DELTA_MAGIC {
            return Err(bad("too short or without its magic"));
        }
        let version = le_u32(&bytes[4..8]);
        if version != DELTA_VERSION {
            return Err(Error::UnsupportedVersion {
                what: format!("delta '{key}'"),
                found: version,
                supported: DELTA_VERSION,
            });
        }
        let base = ChunkId(bytes[8..40].try_into().unwrap_or([0; 32]));
        let chunk_len = le_u32(&bytes[40..44]);
        let count = le_u32(&bytes[44..48]) as usize;
        if chunk_len > MAX_DELTA_CHUNK {
            return Err(bad("of a chunk over 64 MiB"));
        }
        let rest = &bytes[PREFIX_LEN..];
        if count > rest.len() / (PATCH_LEN + 1) {
            return Err(bad("patch count exceeds the payload"));
        }
        let (table, mut data) = rest.split_at(count * PATCH_LEN);
        let mut patches = Vec::with_capacity(count);
        let mut free = 0u64;
        for entry in table.chunks_exact(PATCH_LEN) {
            let (at, len) = (le_u32(&entry[..4]), le_u32(&entry[4..]) as usize);
            let end = u64::from(at) + len as u64;
            let after_gap = patches.is_empty() || u64::from(at) > free;
            if len == 0 || end > u64::from(chunk_len) || !after_gap || len > data.len() {
                return Err(bad(
                    "patch is empty, past the chunk, unordered or truncated",
                ));
            }
            let (patch, tail) = data.split_at(len);
            patches.push((at, patch.to_vec()));
            data = tail;
            free = end;
        }
        if !data.is_empty() {
            return Err(bad("has bytes after its patches"));
        }
        Ok(Self {
            base,
            chunk_len,
            patches,
        })
    }
}

/// The union of the non-empty patches' ranges, as zero-filled buffers
/// `(offset, bytes)` in order, touching ranges merged.
fn union_of(patches: &[(u32, Vec<u8>)]) -> Vec<(u32, Vec<u8>)> {
    let mut ranges: Vec<(u32, u32)> = patches
        .iter()
        .filter(|(_, b)| !b.is_empty())
        .map(|(at, b)| (*at, at + b.len() as u32))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some((_, last)) if *last >= start => *last = (*last).max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
        .into_iter()
        .map(|(start, end)| (start, vec![0u8; (end - start) as usize]))
        .collect()
}

fn le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().unwrap_or([0; 4]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BASE: ChunkId = ChunkId([7; 32]);

    #[test]
    fn patches_merge_later_ones_winning_and_apply() {
        let delta = Delta::new(
            BASE,
            16,
            vec![
                (4, vec![1, 1, 1]),
                (6, vec![2, 2]),
                (0, vec![]),
                (12, vec![3]),
            ],
        )
        .unwrap();
        assert_eq!(delta.patches(), &[(4, vec![1, 1, 2, 2]), (12, vec![3])]);
        assert_eq!(delta.patched_bytes(), 5);
        let chunk = delta.apply("d", &[0u8; 16]).unwrap();
        assert_eq!(chunk, [0, 0, 0, 0, 1, 1, 2, 2, 0, 0, 0, 0, 3, 0, 0, 0]);
        assert!(
            delta.apply("d", &[0u8; 15]).is_err(),
            "a base of another length"
        );
        assert!(Delta::new(BASE, 16, vec![(15, vec![1, 1])]).is_err());
    }

    #[test]
    fn non_canonical_payloads_are_refused() {
        let good = Delta::new(BASE, 64, vec![(2, vec![9; 3]), (10, vec![8; 2])])
            .unwrap()
            .encode();
        Delta::decode("d", &good).unwrap();
        let table = PREFIX_LEN;
        let mut touching = good.clone();
        touching[table + 8..table + 12].copy_from_slice(&5u32.to_le_bytes());
        let mut past_end = good.clone();
        past_end[table + 8..table + 12].copy_from_slice(&63u32.to_le_bytes());
        let mut empty = good.clone();
        empty[table + 4..table + 8].copy_from_slice(&0u32.to_le_bytes());
        let mut trailing = good.clone();
        trailing.push(0);
        let mut magic = good.clone();
        magic[0] = b'X';
        for (what, bytes) in [
            ("touching", touching),
            ("past the end", past_end),
            ("empty", empty),
            ("trailing", trailing),
            ("magic", magic),
            ("truncated", good[..good.len() - 1].to_vec()),
        ] {
            let err = Delta::decode("d", &bytes).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{what}: {err}");
        }
        let mut newer = good;
        newer[4] = 2;
        let err = Delta::decode("d", &newer).unwrap_err();
        assert!(matches!(err, Error::UnsupportedVersion { found: 2, .. }));
    }

    proptest! {
        #[test]
        fn delta_round_trip_and_apply(
            len in 1u32..5000,
            raw in proptest::collection::vec((any::<u32>(), 0usize..300, any::<u8>()), 0..40),
        ) {
            let patches: Vec<(u32, Vec<u8>)> = raw
                .iter()
                .map(|(at, n, b)| {
                    let at = at % len;
                    let n = (*n).min((len - at) as usize);
                    (at, vec![*b; n])
                })
                .collect();
            let mut expected = vec![0u8; len as usize];
            for (at, bytes) in &patches {
                expected[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
            }
            let delta = Delta::new(BASE, len, patches).unwrap();
            let bytes = delta.encode();
            let decoded = Delta::decode("d", &bytes).unwrap();
            prop_assert_eq!(&decoded, &delta);
            prop_assert_eq!(decoded.apply("d", &vec![0u8; len as usize]).unwrap(), expected);
        }

        #[test]
        fn hostile_delta_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = DELTA_MAGIC.to_vec();
            bytes.extend_from_slice(&1u32.to_le_bytes());
            bytes.extend_from_slice(&tail);
            if let Ok(delta) = Delta::decode("d", &bytes) {
                prop_assert_eq!(delta.encode(), bytes);
            }
        }
    }
}
