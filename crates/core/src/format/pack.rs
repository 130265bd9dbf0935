//! Pack objects and pack indexes: many chunks in one stored object.
//!
//! On object storage every object is a request, so storing each 4 MiB chunk
//! as its own object costs about 270 requests per GiB (the layout, and the
//! weak spot, of Proxmox Backup Server on S3). A repository made with a
//! pack size stores new chunks in *packs* instead:
//!
//! ```text
//! pack    := blob* trailer footer
//! blob    := a sealed chunk object, byte for byte as `chunks/xx/<id>` would be
//! trailer := sealed object of kind PackTrailer named "pack-trailer",
//!            payload = entries
//! footer  := trailer length (u32 LE) || "VPAK"
//! entries := version (u32 = 1) || count (u32) || count × entry
//! entry   := chunk id (32) || offset in the pack (u64) || blob length (u32)
//! ```
//!
//! A pack is named `packs/<2 hex>/<64 hex>` by the BLAKE3 hash of its
//! bytes, so `check` can tell a damaged pack from its name alone. Each blob
//! keeps the authenticated data of the loose chunk object it would have
//! been, so a blob opens only as the chunk it claims to be, wherever it is.
//!
//! *Pack indexes* (`packindex/<64 hex>`, sealed, named by the keyed MAC of
//! their payload) say which chunks each pack holds, so a client learns the
//! whole repository's content from a few objects instead of reading every
//! pack:
//!
//! ```text
//! payload := version (u32 = 1) || pack count (u32) || pack*
//! pack    := pack digest (32) || pack size (u64) || entry count (u32) || entry*
//! ```
//!
//! The trailer repeats the pack's entries so that a pack whose index was
//! never written (a backup killed after uploading it) or was lost can still
//! be read: readers recover such *orphan* packs from their trailers.

use crate::error::{Error, Result};
use crate::ChunkId;

/// The last four bytes of every pack.
pub const PACK_MAGIC: [u8; 4] = *b"VPAK";
/// Length of the footer: trailer length and magic.
pub const FOOTER_LEN: usize = 8;
/// The name every pack trailer is sealed under (its authenticated data).
pub const TRAILER_NAME: &str = "pack-trailer";
/// Version of the entry list of trailers.
pub const TRAILER_VERSION: u32 = 1;
/// Version of pack index payloads.
pub const PACK_INDEX_VERSION: u32 = 1;
/// Bytes of one entry.
pub const ENTRY_LEN: usize = 32 + 8 + 4;
/// Largest pack a reader accepts (bounds trailer and range sizes).
pub const MAX_PACK_LEN: u64 = 4 << 30;

/// Where one chunk's blob lies in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    /// The chunk.
    pub id: ChunkId,
    /// Offset of the blob from the start of the pack.
    pub offset: u64,
    /// Length of the blob (the sealed chunk object).
    pub length: u32,
}

impl PackEntry {
    /// The first byte after the blob.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.length))
    }
}

/// One pack as a pack index describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackInfo {
    /// BLAKE3 hash of the pack's bytes (its name).
    pub digest: [u8; 32],
    /// The pack's length in bytes.
    pub size: u64,
    /// Its blobs, in pack order.
    pub entries: Vec<PackEntry>,
}

/// A little-endian reader over untrusted bytes that names `key` in errors.
struct Cursor<'a> {
    key: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(key: &'a str, bytes: &'a [u8]) -> Self {
        Self { key, bytes, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len());
        let end = end.ok_or_else(|| Error::corrupt(self.key, "truncated pack entry list"))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn digest(&mut self) -> Result<[u8; 32]> {
        let mut d = [0u8; 32];
        d.copy_from_slice(self.take(32)?);
        Ok(d)
    }

    /// A count of items of `item_len` bytes each, refused when the rest of
    /// the input cannot hold them (so hostile counts allocate nothing).
    fn count(&mut self, item_len: usize) -> Result<usize> {
        let count = self.u32()? as usize;
        let left = self.bytes.len() - self.pos;
        if count.saturating_mul(item_len) > left {
            return Err(Error::corrupt(
                self.key,
                format!("claims {count} entries, more than its {left} bytes hold"),
            ));
        }
        Ok(count)
    }

    /// Reads a version number; refuses any but `supported` (naming `what`).
    fn version(&mut self, supported: u32, what: impl FnOnce() -> String) -> Result<()> {
        let found = self.u32()?;
        match found == supported {
            true => Ok(()),
            false => Err(Error::UnsupportedVersion {
                what: what(),
                found,
                supported,
            }),
        }
    }

    fn finish(&self) -> Result<()> {
        match self.pos == self.bytes.len() {
            true => Ok(()),
            false => Err(Error::corrupt(self.key, "trailing bytes after the entries")),
        }
    }
}

fn put_entries(out: &mut Vec<u8>, entries: &[PackEntry]) {
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.length.to_le_bytes());
    }
}

/// Reads `count` entries and checks that they lie, in order and without
/// overlapping, inside the first `limit` bytes of the pack.
fn take_entries(cursor: &mut Cursor<'_>, limit: u64) -> Result<Vec<PackEntry>> {
    let count = cursor.count(ENTRY_LEN)?;
    let mut entries = Vec::with_capacity(count);
    let mut covered = 0u64;
    for _ in 0..count {
        let entry = PackEntry {
            id: ChunkId(cursor.digest()?),
            offset: cursor.u64()?,
            length: cursor.u32()?,
        };
        if entry.offset < covered || entry.offset.saturating_add(u64::from(entry.length)) > limit {
            return Err(Error::corrupt(
                cursor.key,
                format!(
                    "entry at offset {} overlaps another or lies outside the pack",
                    entry.offset
                ),
            ));
        }
        covered = entry.end();
        entries.push(entry);
    }
    Ok(entries)
}

/// Encodes a trailer's payload (before sealing).
pub fn encode_trailer(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + entries.len() * ENTRY_LEN);
    out.extend_from_slice(&TRAILER_VERSION.to_le_bytes());
    put_entries(&mut out, entries);
    out
}

/// Decodes a trailer's payload of the pack `key`, whose blobs end at
/// `blobs_end` (where the trailer starts).
pub fn decode_trailer(key: &str, payload: &[u8], blobs_end: u64) -> Result<Vec<PackEntry>> {
    let mut cursor = Cursor::new(key, payload);
    cursor.version(TRAILER_VERSION, || format!("the trailer of pack '{key}'"))?;
    let entries = take_entries(&mut cursor, blobs_end)?;
    cursor.finish()?;
    Ok(entries)
}

/// The 8-byte footer that ends a pack whose trailer is `trailer_len` bytes.
pub fn encode_footer(trailer_len: u32) -> [u8; FOOTER_LEN] {
    let mut footer = [0u8; FOOTER_LEN];
    footer[..4].copy_from_slice(&trailer_len.to_le_bytes());
    footer[4..].copy_from_slice(&PACK_MAGIC);
    footer
}

/// Parses a pack's footer; returns the trailer's length, checked against
/// the pack's `pack_len`.
pub fn decode_footer(key: &str, footer: &[u8], pack_len: u64) -> Result<u32> {
    if footer.len() != FOOTER_LEN || footer[4..] != PACK_MAGIC {
        return Err(Error::corrupt(key, "not a vbackup pack (bad footer)"));
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&footer[..4]);
    let trailer_len = u32::from_le_bytes(len);
    if u64::from(trailer_len) + FOOTER_LEN as u64 > pack_len {
        return Err(Error::corrupt(key, "its trailer is longer than the pack"));
    }
    Ok(trailer_len)
}

/// Encodes a pack index's payload (before sealing).
pub fn encode_pack_index(packs: &[PackInfo]) -> Vec<u8> {
    let entries: usize = packs.iter().map(|p| p.entries.len()).sum();
    let mut out = Vec::with_capacity(8 + packs.len() * 44 + entries * ENTRY_LEN);
    out.extend_from_slice(&PACK_INDEX_VERSION.to_le_bytes());
    out.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for pack in packs {
        out.extend_from_slice(&pack.digest);
        out.extend_from_slice(&pack.size.to_le_bytes());
        put_entries(&mut out, &pack.entries);
    }
    out
}

/// Decodes the payload of the pack index `key`.
pub fn decode_pack_index(key: &str, payload: &[u8]) -> Result<Vec<PackInfo>> {
    let mut cursor = Cursor::new(key, payload);
    cursor.version(PACK_INDEX_VERSION, || format!("pack index '{key}'"))?;
    let count = cursor.count(32 + 8 + 4)?;
    let mut packs = Vec::with_capacity(count);
    for _ in 0..count {
        let digest = cursor.digest()?;
        let size = cursor.u64()?;
        if size > MAX_PACK_LEN {
            return Err(Error::corrupt(key, format!("names a pack of {size} bytes")));
        }
        let entries = take_entries(&mut cursor, size)?;
        packs.push(PackInfo {
            digest,
            size,
            entries,
        });
    }
    cursor.finish()?;
    Ok(packs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any list of back-to-back blobs survives a trip through a pack
        /// index, and no prefix of the encoding decodes.
        #[test]
        fn pack_indexes_round_trip(lengths in proptest::collection::vec(1u32..1 << 20, 0..40), seed in any::<u8>()) {
            let mut offset = 0;
            let entries: Vec<PackEntry> = lengths.iter().enumerate().map(|(i, length)| {
                let e = entry(seed.wrapping_add(i as u8), offset, *length);
                offset += u64::from(*length);
                e
            }).collect();
            let packs = vec![PackInfo { digest: [seed; 32], size: offset + 100, entries }];
            let payload = encode_pack_index(&packs);
            prop_assert_eq!(decode_pack_index("i", &payload).unwrap(), packs);
            prop_assert!(decode_pack_index("i", &payload[..payload.len() - 1]).is_err());
        }

        /// Arbitrary bytes never panic the decoders.
        #[test]
        fn arbitrary_bytes_are_refused_or_decoded(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_trailer("p", &bytes, 1 << 20);
            let _ = decode_pack_index("i", &bytes);
        }
    }

    fn entry(n: u8, offset: u64, length: u32) -> PackEntry {
        PackEntry {
            id: ChunkId([n; 32]),
            offset,
            length,
        }
    }

    #[test]
    fn trailer_round_trips() {
        let entries = vec![entry(1, 0, 10), entry(2, 10, 20), entry(3, 40, 5)];
        let payload = encode_trailer(&entries);
        assert_eq!(decode_trailer("p", &payload, 45).unwrap(), entries);
    }

    #[test]
    fn trailer_refuses_entries_outside_or_overlapping() {
        let outside = encode_trailer(&[entry(1, 0, 10), entry(2, 10, 20)]);
        assert!(decode_trailer("p", &outside, 29).is_err());
        let overlapping = encode_trailer(&[entry(1, 0, 10), entry(2, 9, 20)]);
        assert!(decode_trailer("p", &overlapping, 100).is_err());
        let huge = encode_trailer(&[entry(1, u64::MAX, 10)]);
        assert!(decode_trailer("p", &huge, 100).is_err());
    }

    #[test]
    fn hostile_counts_are_refused_before_allocating() {
        let mut payload = TRAILER_VERSION.to_le_bytes().to_vec();
        payload.extend_from_slice(&u32::MAX.to_le_bytes());
        let error = decode_trailer("p", &payload, 100).unwrap_err();
        assert!(error.to_string().contains("claims"), "{error}");
        let mut index = PACK_INDEX_VERSION.to_le_bytes().to_vec();
        index.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_pack_index("i", &index).is_err());
    }

    #[test]
    fn pack_index_round_trips_and_refuses_truncation() {
        let packs = vec![
            PackInfo {
                digest: [7; 32],
                size: 100,
                entries: vec![entry(1, 0, 10), entry(2, 10, 20)],
            },
            PackInfo {
                digest: [8; 32],
                size: 50,
                entries: vec![entry(3, 0, 42)],
            },
        ];
        let payload = encode_pack_index(&packs);
        assert_eq!(decode_pack_index("i", &payload).unwrap(), packs);
        for cut in [0, 4, 9, payload.len() - 1] {
            assert!(
                decode_pack_index("i", &payload[..cut]).is_err(),
                "cut {cut}"
            );
        }
        let mut longer = payload.clone();
        longer.push(0);
        assert!(decode_pack_index("i", &longer).is_err());
    }

    #[test]
    fn newer_versions_are_refused_by_name() {
        let mut payload = encode_trailer(&[]);
        payload[0] = 2;
        let error = decode_trailer("packs/ab/cd", &payload, 0).unwrap_err();
        assert!(matches!(error, Error::UnsupportedVersion { .. }), "{error}");
    }

    #[test]
    fn footer_is_checked() {
        let footer = encode_footer(30);
        assert_eq!(decode_footer("p", &footer, 100).unwrap(), 30);
        assert!(decode_footer("p", &footer, 37).is_err());
        assert!(decode_footer("p", b"12345678", 100).is_err());
    }
}
