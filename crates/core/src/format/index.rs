//! Disk indexes: which chunk holds each chunk-sized piece of a disk.
//!
//! Version 1 stores 32 bytes for every chunk of the disk, holes included
//! (8 MiB for a 1 TiB disk, 128 MiB for 16 TiB, whatever it holds).
//! Version 2 stores runs of data chunks only, so an index costs in
//! proportion to the disk's data, not its virtual size. Both are read;
//! new indexes are written in version 2, and an index read in version 1
//! is written back in version 1 (see [`DiskIndex::version`]), so reusing
//! an unchanged disk's index keeps its object name.
//!
//! Version 3 (issue 12, scattered small writes) is version 2 followed by
//! a table of the data chunks that are *deltas* (see
//! [`crate::format::delta`]) with the full base chunk each needs. It is
//! written only for indexes that hold deltas, and only in version 3
//! repositories, whose older builds refuse it as a newer version.
//!
//! In memory an index is the sorted list of its data chunks: holes cost
//! nothing there either.

use crate::error::{Error, Result};
use crate::ChunkId;

/// The index payload version this build writes for new indexes.
pub const INDEX_VERSION: u32 = 2;
/// The first index version: one 32-byte entry per chunk, zeros for holes.
pub const LEGACY_INDEX_VERSION: u32 = 1;
/// The index version of indexes that hold deltas: version 2's runs, then
/// the delta table.
pub const DELTA_INDEX_VERSION: u32 = 3;
/// Bytes of one delta table entry: chunk number (u64), base id (32).
const DELTA_ENTRY_LEN: usize = 8 + 32;

/// Bytes before the entries of a version 1 payload, and before the run
/// count of a version 2 payload.
const PREFIX_LEN: usize = 4 + 8 + 4 + 8;
/// Bytes of a version 2 run header: first chunk (u64), length (u64).
const RUN_HEADER_LEN: usize = 16;
/// The digest that marks a hole in version 1 (never a chunk's name).
const HOLE: [u8; 32] = [0u8; 32];

/// The chunk list of one disk: every chunk not listed is a hole (reads as
/// zeros). Data chunks are kept sorted by chunk number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskIndex {
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Chunk size.
    pub chunk_size: u32,
    /// `(chunk number, id)` of every data chunk, sorted, unique, each
    /// below the chunk count.
    data: Vec<(u64, ChunkId)>,
    /// `(chunk number, base id)` of the data chunks that are deltas,
    /// sorted, unique, each a data chunk whose id is not its base.
    deltas: Vec<(u64, ChunkId)>,
    /// The payload version [`DiskIndex::encode`] writes.
    version: u32,
}

impl DiskIndex {
    /// Number of chunks a disk of this size has.
    pub fn chunk_count(virtual_size: u64, chunk_size: u32) -> u64 {
        virtual_size.div_ceil(u64::from(chunk_size))
    }

    /// An index of a disk that holds nothing (all holes), written in the
    /// current version.
    pub fn empty(virtual_size: u64, chunk_size: u32) -> Self {
        Self {
            virtual_size,
            chunk_size,
            data: Vec::new(),
            deltas: Vec::new(),
            version: INDEX_VERSION,
        }
    }

    /// An index from its data chunks `(chunk number, id)` in any order.
    /// Fails (an internal error: callers build these from what they read)
    /// on a zero chunk size, a chunk past the disk's end, a chunk listed
    /// twice or the reserved all-zero id.
    pub fn from_data(
        virtual_size: u64,
        chunk_size: u32,
        mut data: Vec<(u64, ChunkId)>,
    ) -> Result<Self> {
        data.sort_unstable_by_key(|(i, _)| *i);
        let count = match chunk_size {
            0 => return Err(Error::internal("an index with chunk size 0")),
            size => Self::chunk_count(virtual_size, size),
        };
        let sorted = data.windows(2).all(|w| w[0].0 < w[1].0);
        let inside = data.last().is_none_or(|(i, _)| *i < count);
        if !sorted || !inside || data.iter().any(|(_, id)| id.0 == HOLE) {
            return Err(Error::internal(
                "an index with a chunk listed twice, past the disk's end, or with the hole marker",
            ));
        }
        Ok(Self {
            virtual_size,
            chunk_size,
            data,
            deltas: Vec::new(),
            version: INDEX_VERSION,
        })
    }

    /// An index from one entry per chunk (`None` for a hole), as version 1
    /// stores it. Fails like [`DiskIndex::from_data`], and when the list
    /// is longer than the disk.
    pub fn from_chunks(
        virtual_size: u64,
        chunk_size: u32,
        chunks: impl IntoIterator<Item = Option<ChunkId>>,
    ) -> Result<Self> {
        let data = (0u64..)
            .zip(chunks)
            .filter_map(|(i, id)| id.map(|id| (i, id)))
            .collect();
        Self::from_data(virtual_size, chunk_size, data)
    }

    /// The same index, encoded as `version` by [`DiskIndex::encode`]: 1
    /// (one entry per chunk) or 2 (runs of data chunks) for an index
    /// without deltas, 3 for one with deltas.
    pub fn in_version(mut self, version: u32) -> Result<Self> {
        let wanted = match self.deltas.is_empty() {
            true => LEGACY_INDEX_VERSION..=INDEX_VERSION,
            false => DELTA_INDEX_VERSION..=DELTA_INDEX_VERSION,
        };
        if !wanted.contains(&version) {
            return Err(Error::internal(format!(
                "index version {version} for an index with {} deltas",
                self.deltas.len()
            )));
        }
        self.version = version;
        Ok(self)
    }

    /// The same index with the data chunks in `deltas` `(chunk number,
    /// base id)` marked as deltas on those bases; written in version 3
    /// when there is any. Fails (an internal error) on a chunk that is not
    /// a data chunk, listed twice, or its own base.
    pub fn with_deltas(mut self, mut deltas: Vec<(u64, ChunkId)>) -> Result<Self> {
        deltas.sort_unstable_by_key(|(i, _)| *i);
        let unique = deltas.windows(2).all(|w| w[0].0 < w[1].0);
        let valid = deltas
            .iter()
            .all(|(i, base)| base.0 != HOLE && self.get(*i).is_some_and(|id| id != *base));
        if !unique || !valid {
            return Err(Error::internal(
                "a delta that is not a data chunk, is listed twice, or is its own base",
            ));
        }
        self.version = match deltas.is_empty() {
            true => self.version.min(INDEX_VERSION),
            false => DELTA_INDEX_VERSION,
        };
        self.deltas = deltas;
        Ok(self)
    }

    /// The `(chunk number, base id)` of the chunks that are deltas.
    pub fn deltas(&self) -> &[(u64, ChunkId)] {
        &self.deltas
    }

    /// The base of chunk `i` when it is a delta.
    pub fn base_of(&self, i: u64) -> Option<ChunkId> {
        self.deltas
            .binary_search_by_key(&i, |(n, _)| *n)
            .ok()
            .map(|at| self.deltas[at].1)
    }

    /// The payload version this index was read in (or is written in):
    /// rewriting a reused index in its own version keeps its name, which
    /// the unchanged-disk and changed-block-tracking checks compare.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Number of chunks of the disk, holes included.
    pub fn count(&self) -> u64 {
        Self::chunk_count(self.virtual_size, self.chunk_size)
    }

    /// The data chunks `(chunk number, id)`, in disk order.
    pub fn data(&self) -> &[(u64, ChunkId)] {
        &self.data
    }

    /// Every chunk object the index needs, with repeats: the ids of the
    /// data chunks in disk order, then the bases of the deltas (what a
    /// prune keeps and a check expects stored).
    pub fn ids(&self) -> impl Iterator<Item = &ChunkId> + '_ {
        let bases = self.deltas.iter().map(|(_, base)| base);
        self.data.iter().map(|(_, id)| id).chain(bases)
    }

    /// Number of data chunks (not holes).
    pub fn data_chunks(&self) -> u64 {
        self.data.len() as u64
    }

    /// The id of chunk `i`; `None` for a hole (or past the end).
    pub fn get(&self, i: u64) -> Option<ChunkId> {
        self.data
            .binary_search_by_key(&i, |(n, _)| *n)
            .ok()
            .map(|at| self.data[at].1)
    }

    /// The data chunks with numbers in `[first, end)`, in disk order.
    pub fn data_in(&self, first: u64, end: u64) -> &[(u64, ChunkId)] {
        let from = self.data.partition_point(|(i, _)| *i < first);
        let to = self.data.partition_point(|(i, _)| *i < end);
        &self.data[from..to.max(from)]
    }

    /// The runs of holes, as `(first chunk, number of chunks)`, in disk
    /// order: at most one more than the data chunks, whatever the size.
    pub fn hole_runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let ends = self.data.iter().map(|(i, _)| *i).chain([self.count()]);
        let starts = [0].into_iter().chain(self.data.iter().map(|(i, _)| i + 1));
        starts
            .zip(ends)
            .filter(|(start, end)| end > start)
            .map(|(start, end)| (start, end - start))
    }

    /// The byte range `(offset, length)` of chunk `i`.
    pub fn chunk_range(&self, i: u64) -> (u64, usize) {
        let offset = i * u64::from(self.chunk_size);
        let length = (self.virtual_size - offset).min(u64::from(self.chunk_size));
        (offset, length as usize)
    }

    /// The byte range `(offset, length)` of `count` chunks from `first`.
    pub fn chunks_range(&self, first: u64, count: u64) -> (u64, u64) {
        let offset = first * u64::from(self.chunk_size);
        let end = (first + count)
            .saturating_mul(u64::from(self.chunk_size))
            .min(self.virtual_size);
        (offset, end.saturating_sub(offset))
    }

    /// Encodes the payload in [`DiskIndex::version`]: version, size, chunk
    /// size, count, then (version 1) 32 bytes per chunk, all-zero for a
    /// hole, or (version 2) the runs of consecutive data chunks. Integers
    /// are little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PREFIX_LEN + 8 + self.data.len() * 32);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.virtual_size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.count().to_le_bytes());
        match self.version {
            LEGACY_INDEX_VERSION => self.encode_entries(&mut out),
            INDEX_VERSION => self.encode_runs(&mut out),
            _ => {
                self.encode_runs(&mut out);
                self.encode_deltas(&mut out);
            }
        }
        out
    }

    /// Version 1: an entry for every chunk.
    fn encode_entries(&self, out: &mut Vec<u8>) {
        let mut next = 0;
        for (i, id) in &self.data {
            (next..*i).for_each(|_| out.extend_from_slice(&HOLE));
            out.extend_from_slice(&id.0);
            next = i + 1;
        }
        (next..self.count()).for_each(|_| out.extend_from_slice(&HOLE));
    }

    /// Version 2: the number of runs, then each run's first chunk, length
    /// and digests.
    fn encode_runs(&self, out: &mut Vec<u8>) {
        let runs = self.runs();
        out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
        for run in runs {
            let first = run[0].0;
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&(run.len() as u64).to_le_bytes());
            run.iter().for_each(|(_, id)| out.extend_from_slice(&id.0));
        }
    }

    /// Version 3's delta table: the count, then each delta's chunk number
    /// and base id.
    fn encode_deltas(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.deltas.len() as u64).to_le_bytes());
        for (i, base) in &self.deltas {
            out.extend_from_slice(&i.to_le_bytes());
            out.extend_from_slice(&base.0);
        }
    }

    /// The data chunks cut into runs of consecutive chunk numbers.
    fn runs(&self) -> Vec<&[(u64, ChunkId)]> {
        let mut runs = Vec::new();
        let mut start = 0;
        for at in 1..=self.data.len() {
            if at == self.data.len() || self.data[at].0 != self.data[at - 1].0 + 1 {
                runs.push(&self.data[start..at]);
                start = at;
            }
        }
        runs
    }

    /// Decodes and validates a payload of either version. Untrusted bytes:
    /// nothing is allocated beyond what the payload's length justifies,
    /// and a version 2 payload must be canonical (runs in order, separated
    /// by at least one hole, none empty, no hole marker inside), so one
    /// index has one encoding and one name.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let mut reader = Reader { key, bytes, at: 0 };
        let version = reader.u32()?;
        if version > DELTA_INDEX_VERSION || version == 0 {
            return Err(Error::UnsupportedVersion {
                what: format!("index '{key}'"),
                found: version,
                supported: DELTA_INDEX_VERSION,
            });
        }
        let virtual_size = reader.u64()?;
        let chunk_size = reader.u32()?;
        let count = reader.u64()?;
        if chunk_size == 0 || count != Self::chunk_count(virtual_size, chunk_size) {
            return Err(Error::corrupt(
                key,
                "index chunk count does not match the disk size",
            ));
        }
        let data = match version {
            LEGACY_INDEX_VERSION => decode_entries(&reader, count)?,
            _ => decode_runs(&mut reader, count)?,
        };
        let deltas = match version {
            DELTA_INDEX_VERSION => decode_deltas(&mut reader, &data)?,
            _ => Vec::new(),
        };
        if version != LEGACY_INDEX_VERSION && !reader.rest().is_empty() {
            return Err(Error::corrupt(key, "index has bytes after its runs"));
        }
        Ok(Self {
            virtual_size,
            chunk_size,
            data,
            deltas,
            version,
        })
    }
}

/// Version 1 entries: exactly `count` digests after the prefix.
fn decode_entries(reader: &Reader<'_>, count: u64) -> Result<Vec<(u64, ChunkId)>> {
    let entries = reader.rest();
    if entries.len() as u64 != count.saturating_mul(32) {
        return Err(Error::corrupt(
            reader.key,
            "index length does not match its chunk count",
        ));
    }
    Ok((0u64..)
        .zip(entries.chunks_exact(32))
        .filter_map(|(i, e)| {
            let id: [u8; 32] = e.try_into().unwrap_or(HOLE);
            (id != HOLE).then_some((i, ChunkId(id)))
        })
        .collect())
}

/// Version 2 runs, checked to be canonical and inside the disk.
fn decode_runs(reader: &mut Reader<'_>, count: u64) -> Result<Vec<(u64, ChunkId)>> {
    let runs = reader.u64()?;
    let key = reader.key;
    let bad = |what: &str| Error::corrupt(key, format!("index run {what}"));
    // Each run takes at least a header and one digest.
    if runs > (reader.rest().len() / (RUN_HEADER_LEN + 32)) as u64 {
        return Err(bad("count exceeds the payload"));
    }
    let mut data = Vec::with_capacity(reader.rest().len() / 32);
    let mut next_free = 0u64;
    for _ in 0..runs {
        let first = reader.u64()?;
        let length = reader.u64()?;
        let end = first.checked_add(length).ok_or_else(|| bad("overflows"))?;
        if length == 0 || end > count {
            return Err(bad("is empty or past the disk's end"));
        }
        if first < next_free || (first == next_free && !data.is_empty()) {
            return Err(bad("overlaps or touches the one before"));
        }
        let digests = reader.take(length.saturating_mul(32))?;
        for (i, e) in (first..).zip(digests.chunks_exact(32)) {
            let id: [u8; 32] = e.try_into().unwrap_or(HOLE);
            if id == HOLE {
                return Err(bad("holds the hole marker"));
            }
            data.push((i, ChunkId(id)));
        }
        next_free = end;
    }
    Ok(data)
}

/// Version 3's delta table: at least one entry, in increasing chunk order,
/// each naming a data chunk and a base that is neither the hole marker nor
/// the chunk's own id.
fn decode_deltas(reader: &mut Reader<'_>, data: &[(u64, ChunkId)]) -> Result<Vec<(u64, ChunkId)>> {
    let count = reader.u64()?;
    let key = reader.key;
    let bad = |what: &str| Error::corrupt(key, format!("index delta table {what}"));
    if count == 0 || count > (reader.rest().len() / DELTA_ENTRY_LEN) as u64 {
        return Err(bad("is empty or exceeds the payload"));
    }
    let mut deltas: Vec<(u64, ChunkId)> = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let i = reader.u64()?;
        let base = ChunkId(reader.take(32)?.try_into().unwrap_or(HOLE));
        let own = data
            .binary_search_by_key(&i, |(n, _)| *n)
            .ok()
            .map(|at| data[at].1);
        let ordered = deltas.last().is_none_or(|(prev, _)| *prev < i);
        if !ordered || base.0 == HOLE || own.is_none_or(|own| own == base) {
            return Err(bad(
                "names a hole, is unordered, or a chunk that is its own base",
            ));
        }
        deltas.push((i, base));
    }
    Ok(deltas)
}

/// Little-endian fields read from the front of a payload.
struct Reader<'a> {
    key: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, length: u64) -> Result<&'a [u8]> {
        let end = usize::try_from(length)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| Error::corrupt(self.key, "index truncated"))?;
        let field = &self.bytes[self.at..end];
        self.at = end;
        Ok(field)
    }

    fn u32(&mut self) -> Result<u32> {
        let field = self.take(4)?;
        Ok(u32::from_le_bytes(field.try_into().unwrap_or([0; 4])))
    }

    fn u64(&mut self) -> Result<u64> {
        let field = self.take(8)?;
        Ok(u64::from_le_bytes(field.try_into().unwrap_or([0; 8])))
    }

    fn rest(&self) -> &'a [u8] {
        &self.bytes[self.at..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u64) -> ChunkId {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&n.to_le_bytes());
        id[31] = 1;
        ChunkId(id)
    }

    /// A 1 TiB disk of 4 MiB chunks holding data in 64 places.
    fn sparse_tib() -> DiskIndex {
        let data = (0..64).map(|k| (k * 4096 + 7, id(k))).collect();
        DiskIndex::from_data(1 << 40, 4 << 20, data).unwrap()
    }

    #[test]
    fn a_sparse_index_costs_in_proportion_to_its_data() {
        let index = sparse_tib();
        let payload = index.encode();
        assert_eq!(payload.len(), PREFIX_LEN + 8 + 64 * (RUN_HEADER_LEN + 32));
        let legacy = index.clone().in_version(1).unwrap().encode();
        assert_eq!(
            legacy.len(),
            PREFIX_LEN + 262_144 * 32,
            "8 MiB in version 1"
        );
        assert_eq!(index.hole_runs().count(), 65);
        assert_eq!(index.hole_runs().map(|(_, n)| n).sum::<u64>(), 262_144 - 64);
    }

    #[test]
    fn version_1_indexes_still_read_and_are_written_back_as_read() {
        let chunks = [Some(id(1)), None, None, Some(id(2)), Some(id(3))];
        let v1 = DiskIndex::from_chunks(5 << 20, 1 << 20, chunks)
            .unwrap()
            .in_version(1)
            .unwrap();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&(5u64 << 20).to_le_bytes());
        bytes.extend_from_slice(&(1u32 << 20).to_le_bytes());
        bytes.extend_from_slice(&5u64.to_le_bytes());
        for c in chunks {
            bytes.extend_from_slice(&c.map_or(HOLE, |c| c.0));
        }
        let read = DiskIndex::decode("i", &bytes).unwrap();
        assert_eq!(read, v1);
        assert_eq!(read.version(), 1);
        assert_eq!(read.encode(), bytes, "the same bytes, so the same name");
        assert_eq!(read.get(0), Some(id(1)));
        assert_eq!(read.get(1), None);
        assert_eq!(read.get(4), Some(id(3)));
        assert_eq!(read.hole_runs().collect::<Vec<_>>(), vec![(1, 2)]);
        let v2 = read.in_version(2).unwrap();
        assert_eq!(DiskIndex::decode("i", &v2.encode()).unwrap(), v2);
    }

    #[test]
    fn non_canonical_runs_are_refused() {
        let index = DiskIndex::from_data(10 << 20, 1 << 20, vec![(2, id(2)), (5, id(5))]).unwrap();
        let good = index.encode();
        DiskIndex::decode("i", &good).unwrap();
        let run_at = |k: usize| PREFIX_LEN + 8 + k * (RUN_HEADER_LEN + 32);
        let mut touching = good.clone();
        touching[run_at(1)..run_at(1) + 8].copy_from_slice(&3u64.to_le_bytes());
        let mut overlapping = good.clone();
        overlapping[run_at(1)..run_at(1) + 8].copy_from_slice(&2u64.to_le_bytes());
        let mut past_end = good.clone();
        past_end[run_at(1)..run_at(1) + 8].copy_from_slice(&10u64.to_le_bytes());
        let mut hole = good.clone();
        hole[run_at(0) + RUN_HEADER_LEN..run_at(1)].fill(0);
        let mut trailing = good.clone();
        trailing.push(0);
        let mut empty_run = good.clone();
        empty_run[run_at(0) + 8..run_at(0) + 16].copy_from_slice(&0u64.to_le_bytes());
        for (what, bytes) in [
            ("touching", touching),
            ("overlapping", overlapping),
            ("past the end", past_end),
            ("hole marker", hole),
            ("trailing byte", trailing),
            ("empty run", empty_run),
        ] {
            let err = DiskIndex::decode("i", &bytes).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{what}: {err}");
        }
    }

    #[test]
    fn newer_index_versions_are_refused() {
        let mut bytes = sparse_tib().encode();
        bytes[0] = 4;
        let err = DiskIndex::decode("i", &bytes).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedVersion { found: 4, .. }),
            "{err}"
        );
    }

    #[test]
    fn bad_data_lists_are_refused() {
        assert!(DiskIndex::from_data(4, 1, vec![(1, id(1)), (1, id(2))]).is_err());
        assert!(DiskIndex::from_data(4, 1, vec![(4, id(1))]).is_err());
        assert!(DiskIndex::from_data(4, 1, vec![(0, ChunkId(HOLE))]).is_err());
        assert!(DiskIndex::from_data(4, 0, vec![]).is_err());
        let index = DiskIndex::from_data(4, 1, vec![(3, id(3)), (0, id(0))]).unwrap();
        assert_eq!(index.data(), &[(0, id(0)), (3, id(3))]);
        assert_eq!(index.data_in(1, 4), &[(3, id(3))]);
        assert_eq!(index.hole_runs().collect::<Vec<_>>(), vec![(1, 2)]);
        assert_eq!(DiskIndex::empty(0, 1).hole_runs().count(), 0);
    }

    #[test]
    fn delta_indexes_round_trip_and_keep_their_bases() {
        let index = DiskIndex::from_data(10 << 20, 1 << 20, vec![(2, id(2)), (5, id(5))]).unwrap();
        let plain = index.encode();
        let with = index.clone().with_deltas(vec![(5, id(9))]).unwrap();
        assert_eq!(with.version(), DELTA_INDEX_VERSION);
        assert_eq!(with.base_of(5), Some(id(9)));
        assert_eq!(with.base_of(2), None);
        assert_eq!(
            with.ids().copied().collect::<Vec<_>>(),
            vec![id(2), id(5), id(9)]
        );
        let bytes = with.encode();
        assert_eq!(bytes.len(), plain.len() + 8 + DELTA_ENTRY_LEN);
        assert_eq!(DiskIndex::decode("i", &bytes).unwrap(), with);
        assert!(with.clone().in_version(2).is_err(), "deltas need version 3");
        assert!(
            index.clone().with_deltas(vec![(3, id(9))]).is_err(),
            "a hole"
        );
        assert!(
            index.clone().with_deltas(vec![(5, id(5))]).is_err(),
            "its own base"
        );
        let none = index.with_deltas(vec![]).unwrap();
        assert_eq!(none.encode(), plain, "no deltas: version 2 as before");
        let mut empty_table = plain.clone();
        empty_table[0] = 3;
        empty_table.extend_from_slice(&0u64.to_le_bytes());
        let mut hole_delta = bytes.clone();
        let at = bytes.len() - DELTA_ENTRY_LEN;
        hole_delta[at..at + 8].copy_from_slice(&3u64.to_le_bytes());
        let mut trailing = bytes.clone();
        trailing.push(0);
        for (what, bytes) in [
            ("empty table", empty_table),
            ("hole", hole_delta),
            ("trailing", trailing),
        ] {
            let err = DiskIndex::decode("i", &bytes).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{what}: {err}");
        }
    }

    proptest! {
        #[test]
        fn index_round_trip(
            size in 1u64..1 << 44,
            shift in 12u32..24,
            picks in proptest::collection::vec((any::<u64>(), any::<u8>()), 0..300),
            version in 1u32..=2,
        ) {
            let chunk_size = 1u32 << shift;
            let count = DiskIndex::chunk_count(size, chunk_size);
            // Version 1 is dense: keep those disks small.
            let count = if version == 1 { count.min(3000) } else { count };
            let size = size.min(count * u64::from(chunk_size));
            let mut data: Vec<(u64, ChunkId)> =
                picks.iter().map(|(at, fill)| (at % count, ChunkId([*fill | 1; 32]))).collect();
            data.sort_by_key(|(i, _)| *i);
            data.dedup_by_key(|(i, _)| *i);
            let index = DiskIndex::from_data(size, chunk_size, data.clone())
                .unwrap()
                .in_version(version)
                .unwrap();
            let decoded = DiskIndex::decode("i", &index.encode()).unwrap();
            prop_assert_eq!(&decoded, &index);
            prop_assert_eq!(decoded.data(), &data[..]);
            let holes: u64 = index.hole_runs().map(|(_, n)| n).sum();
            prop_assert_eq!(holes + index.data_chunks(), index.count());
            for (i, id) in &data {
                prop_assert_eq!(index.get(*i), Some(*id));
            }
        }

        #[test]
        fn hostile_index_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = DiskIndex::decode("i", &bytes);
        }

        #[test]
        fn hostile_version_2_payloads_never_panic(
            head in (1u64..1 << 50, 12u32..24),
            tail in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let (size, shift) = head;
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&2u32.to_le_bytes());
            bytes.extend_from_slice(&size.to_le_bytes());
            bytes.extend_from_slice(&(1u32 << shift).to_le_bytes());
            bytes.extend_from_slice(&DiskIndex::chunk_count(size, 1 << shift).to_le_bytes());
            bytes.extend_from_slice(&tail);
            if let Ok(index) = DiskIndex::decode("i", &bytes) {
                prop_assert_eq!(index.encode(), bytes);
            }
        }
    }
}
