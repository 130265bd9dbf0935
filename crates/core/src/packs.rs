//! Where each chunk is stored, writing packs, and reading chunks with as
//! few requests as their layout allows.
//!
//! A chunk is either *loose* (its own object `chunks/xx/<id>`, the only
//! layout of version 1 repositories) or a *blob* in a pack (see
//! [`crate::format::pack`] for the bytes). [`ChunkMap`] is the answer to
//! "which chunks are stored, and where", loaded from a listing of the loose
//! chunks, the pack indexes and, for packs no index names, their trailers.
//! [`PackWriter`] gathers a backup's new chunks into packs; [`plan_reads`]
//! and [`read_unit`] turn a list of wanted chunks into ranged reads that
//! fetch neighbouring blobs of a pack together.

use std::collections::HashMap;
use std::sync::Mutex;

use vbackup_storage::ObjectInfo;

use crate::error::{Error, Result};
use crate::format::pack::{
    self, decode_footer, decode_pack_index, decode_trailer, encode_footer, encode_pack_index,
    encode_trailer, PackEntry, PackInfo, FOOTER_LEN, TRAILER_NAME,
};
use crate::format::{open_object_owned, seal_object, ObjectKind};
use crate::repo::CHUNKS_PREFIX;
use crate::{ChunkId, Repository};

/// Folder of pack objects.
pub const PACKS_PREFIX: &str = "packs/";
/// Folder of pack indexes.
pub const PACK_INDEXES_PREFIX: &str = "packindex/";
/// Default target size of a pack: large enough that a GiB of data costs
/// a few dozen requests, small enough that a backup's workers can each
/// hold one in memory.
pub const DEFAULT_PACK_SIZE: u32 = 16 << 20;
/// Smallest pack size `init` accepts.
pub const MIN_PACK_SIZE: u32 = 1 << 20;
/// Largest pack size `init` accepts.
pub const MAX_PACK_SIZE: u32 = 512 << 20;
/// Pack entries per pack index object at most (about 2.8 MiB).
const ENTRIES_PER_PACK_INDEX: usize = 65_536;
/// Bytes read from the end of an orphan pack in the first request: the
/// footer and, almost always, the whole trailer.
const TRAILER_PROBE: u64 = 64 << 10;
/// Upper bound for a decoded pack index or trailer.
const MAX_PACK_METADATA: usize = 256 << 20;
/// Pack indexes or trailers read at once.
const METADATA_READERS: usize = 8;

/// The object name of the pack with hash `digest`.
pub fn pack_key(digest: &[u8; 32]) -> String {
    let hex = hex::encode(digest);
    format!("{PACKS_PREFIX}{}/{hex}", &hex[..2])
}

/// The hash in a pack object name, if it is one.
pub fn pack_digest(key: &str) -> Option<[u8; 32]> {
    let hex = key.strip_prefix(PACKS_PREFIX)?.rsplit('/').next()?;
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex, &mut digest).ok()?;
    Some(digest)
}

/// Where a stored chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// Its own object, of `size` bytes.
    Loose {
        /// Stored bytes.
        size: u64,
    },
    /// A blob in the pack at position `pack` of [`ChunkMap::packs`].
    Packed {
        /// Position in [`ChunkMap::packs`].
        pack: u32,
        /// Offset of the blob in the pack.
        offset: u64,
        /// Length of the blob.
        length: u32,
    },
}

impl Location {
    /// Stored bytes of the chunk.
    pub fn stored_size(&self) -> u64 {
        match *self {
            Location::Loose { size } => size,
            Location::Packed { length, .. } => u64::from(length),
        }
    }
}

/// A stored pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPack {
    /// Its hash (name).
    pub digest: [u8; 32],
    /// Its length.
    pub size: u64,
    /// Whether a readable pack index names it; else its chunks were
    /// recovered from its trailer (an *orphan*: a backup was stopped after
    /// uploading it, or its index was lost).
    pub indexed: bool,
    /// Blobs of this pack known to the map (duplicates of chunks stored
    /// elsewhere are not counted).
    pub blobs: u32,
}

/// Which chunks are stored, and where.
#[derive(Debug, Default)]
pub struct ChunkMap {
    /// Every stored chunk (a chunk stored twice has one location: the
    /// first found, loose chunks first).
    pub chunks: HashMap<ChunkId, Location>,
    /// Every pack listed.
    pub packs: Vec<StoredPack>,
    /// The pack indexes read.
    pub pack_indexes: Vec<ObjectInfo>,
    /// Whether this map was loaded again after a pack went missing (reads
    /// through it do not look a third time).
    pub reloaded: bool,
    /// Pack indexes and orphan trailers that could not be read (damage; the
    /// packs an unreadable index names are recovered from their trailers),
    /// and packs whose size differs from their index's.
    pub problems: Vec<Error>,
    /// In a repository with packs: loose chunk objects, which no vbackup
    /// writes there. They are never read nor taken as stored (a backup
    /// token could otherwise shadow packed chunks with junk), and prune
    /// deletes them.
    pub stray_loose: Vec<ObjectInfo>,
    /// Second copies of chunks located elsewhere: blobs of other packs
    /// naming a chunk already in the map. Prune deletes or repacks the pack
    /// of such a copy only after the copy it keeps has authenticated
    /// ([`ChunkMap::settle_duplicates`]).
    pub duplicates: Vec<(ChunkId, Location)>,
}

impl ChunkMap {
    /// Loads the map: lists the loose chunks and, in a repository with
    /// packs, the pack indexes (first, so every pack they name is in the
    /// pack listing that follows), then reads them and the trailers of
    /// orphan packs. Storage errors fail; damaged pack metadata is recorded
    /// in [`ChunkMap::problems`].
    pub fn load(repo: &Repository) -> Result<Self> {
        let mut map = ChunkMap::default();
        let packed = repo.config().packs();
        repo.backend().list_each(CHUNKS_PREFIX, &mut |o| {
            if packed {
                map.stray_loose.push(o.clone());
            } else if let Some(id) = o.key.rsplit('/').next().and_then(ChunkId::from_hex) {
                map.chunks.insert(id, Location::Loose { size: o.size });
            }
        })?;
        if !packed {
            return Ok(map);
        }
        map.pack_indexes = repo.backend().list(PACK_INDEXES_PREFIX)?;
        let mut positions = HashMap::new();
        repo.backend().list_each(PACKS_PREFIX, &mut |o| {
            if let Some(digest) = pack_digest(&o.key) {
                positions.insert(digest, map.packs.len());
                map.packs.push(StoredPack {
                    digest,
                    size: o.size,
                    indexed: false,
                    blobs: 0,
                });
            }
        })?;
        let keys: Vec<String> = map.pack_indexes.iter().map(|o| o.key.clone()).collect();
        for read in crate::parallel_map(&keys, METADATA_READERS, |k| read_pack_index(repo, k)) {
            match read {
                Ok(packs) => map.add_indexed(&positions, packs),
                // Replaced since the listing (prune, repair): the packs it
                // named are in a newer index, or found as orphans.
                Err(e) if e.is_not_found() => {}
                Err(e) if e.is_damage() => map.problems.push(e),
                Err(e) => return Err(e),
            }
        }
        let orphans: Vec<usize> = (0..map.packs.len())
            .filter(|i| !map.packs[*i].indexed)
            .collect();
        let trailers = crate::parallel_map(&orphans, METADATA_READERS, |i| {
            let pack = &map.packs[*i];
            read_trailer(repo, &pack.digest, pack.size)
        });
        for (i, read) in orphans.into_iter().zip(trailers) {
            match read {
                Ok(entries) => map.add_entries(i, &entries),
                // Deleted since the listing by a prune: nothing to find.
                Err(e) if e.is_not_found() => {}
                Err(e) if e.is_damage() => map.problems.push(e),
                Err(e) => return Err(e),
            }
        }
        Ok(map)
    }

    fn add_indexed(&mut self, positions: &HashMap<[u8; 32], usize>, packs: Vec<PackInfo>) {
        for info in packs {
            // A pack that is gone (deleted by a prune after this index was
            // listed) or listed with another size is not trusted.
            let Some(&i) = positions.get(&info.digest) else {
                continue;
            };
            // Its entries still say where its chunks were: reads of those
            // past the end fail, naming the pack.
            if self.packs[i].size != info.size {
                self.problems.push(Error::corrupt(
                    &pack_key(&info.digest),
                    format!(
                        "{} bytes stored, {} in its pack index (truncated or replaced)",
                        self.packs[i].size, info.size
                    ),
                ));
            }
            self.packs[i].indexed = true;
            self.add_entries(i, &info.entries);
        }
    }

    fn add_entries(&mut self, pack: usize, entries: &[PackEntry]) {
        for e in entries {
            let location = Location::Packed {
                pack: pack as u32,
                offset: e.offset,
                length: e.length,
            };
            match self.chunks.get(&e.id) {
                Some(existing) if *existing == location => {}
                Some(_) => self.duplicates.push((e.id, location)),
                None => {
                    self.chunks.insert(e.id, location);
                    self.packs[pack].blobs += 1;
                }
            }
        }
    }

    /// Makes sure that, for every chunk `wanted` says must be kept and that
    /// has a second copy, the copy the map locates authenticates; if it
    /// does not and the second one does, the map locates the good one
    /// instead. Prune calls this before deciding which packs to delete, so
    /// it never drops a good copy in favour of a bad one. Returns how many
    /// chunks moved to their other copy.
    pub fn settle_duplicates(
        &mut self,
        repo: &Repository,
        wanted: impl Fn(&ChunkId) -> bool,
    ) -> Result<usize> {
        let doubtful: Vec<(ChunkId, Location)> = self
            .duplicates
            .iter()
            .filter(|(id, _)| wanted(id))
            .copied()
            .collect();
        let mut moved = 0;
        for (id, other) in doubtful {
            let Some(current) = self.chunks.get(&id).copied() else {
                continue;
            };
            if self.authenticates(repo, &id, current)? {
                continue;
            }
            if self.authenticates(repo, &id, other)? {
                self.relocate(id, current, other);
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Whether the copy of `id` at `location` reads and authenticates.
    /// Storage failures other than a missing object stop the caller.
    fn authenticates(&self, repo: &Repository, id: &ChunkId, location: Location) -> Result<bool> {
        let read = match location {
            Location::Loose { .. } => repo.read_chunk(id).map(drop),
            Location::Packed {
                pack,
                offset,
                length,
            } => {
                let key = pack_key(&self.packs[pack as usize].digest);
                get_exact(repo, &key, offset, u64::from(length))
                    .and_then(|bytes| repo.decode_chunk(id, bytes))
                    .map(drop)
            }
        };
        crate::error::authenticated(read)
    }

    fn relocate(&mut self, id: ChunkId, from: Location, to: Location) {
        if let Location::Packed { pack, .. } = from {
            self.packs[pack as usize].blobs -= 1;
        }
        if let Location::Packed { pack, .. } = to {
            self.packs[pack as usize].blobs += 1;
        }
        self.chunks.insert(id, to);
        self.duplicates.retain(|(d, l)| !(*d == id && *l == to));
        self.duplicates.push((id, from));
    }

    /// Stored size of every chunk.
    pub fn sizes(&self) -> HashMap<ChunkId, u64> {
        self.chunks
            .iter()
            .map(|(id, loc)| (*id, loc.stored_size()))
            .collect()
    }

    /// The object holding chunk `id`, for messages (`chunks/…` or
    /// `packs/…`); the loose name when it is not stored.
    pub fn object_of(&self, id: &ChunkId) -> String {
        match self.chunks.get(id) {
            Some(Location::Packed { pack, .. }) => {
                format!(
                    "{} (chunk {})",
                    pack_key(&self.packs[*pack as usize].digest),
                    id.to_hex()
                )
            }
            _ => Repository::chunk_key(id),
        }
    }

    /// Every pack's blobs known to the map, in pack order.
    pub fn entries_by_pack(&self) -> Vec<Vec<PackEntry>> {
        let mut by_pack: Vec<Vec<PackEntry>> = vec![Vec::new(); self.packs.len()];
        for (id, location) in &self.chunks {
            if let Location::Packed {
                pack,
                offset,
                length,
            } = *location
            {
                by_pack[pack as usize].push(PackEntry {
                    id: *id,
                    offset,
                    length,
                });
            }
        }
        for entries in &mut by_pack {
            entries.sort_unstable_by_key(|e| e.offset);
        }
        by_pack
    }
}

/// Reads and decodes one pack index.
pub fn read_pack_index(repo: &Repository, key: &str) -> Result<Vec<PackInfo>> {
    let bytes = repo.backend().get(key)?;
    let payload = open_object_owned(
        repo.crypto(),
        ObjectKind::PackIndex,
        key,
        bytes,
        MAX_PACK_METADATA,
    )?;
    decode_pack_index(key, &payload)
}

/// Writes pack indexes describing `packs` (several objects when they hold
/// many entries) and returns their names. A pack index is named by the MAC
/// of its payload, so writing the same content twice stores it once.
pub fn write_pack_indexes(repo: &Repository, packs: &[PackInfo]) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let mut start = 0;
    while start < packs.len() {
        let mut end = start;
        let mut entries = 0;
        while end < packs.len() && (end == start || entries < ENTRIES_PER_PACK_INDEX) {
            entries += packs[end].entries.len();
            end += 1;
        }
        let payload = encode_pack_index(&packs[start..end]);
        let key = format!(
            "{PACK_INDEXES_PREFIX}{}",
            hex::encode(repo.crypto().mac(&payload))
        );
        repo.put_sealed(ObjectKind::PackIndex, &key, &payload)?;
        names.push(key);
        start = end;
    }
    Ok(names)
}

/// Reads the entries of a pack from its trailer: the footer and trailer
/// from the end of the pack, in one ranged read when the trailer is small.
pub fn read_trailer(repo: &Repository, digest: &[u8; 32], size: u64) -> Result<Vec<PackEntry>> {
    let key = pack_key(digest);
    if size < FOOTER_LEN as u64 || size > pack::MAX_PACK_LEN {
        return Err(Error::corrupt(
            &key,
            format!("{size} bytes is not the size of a pack"),
        ));
    }
    let probe = TRAILER_PROBE.min(size);
    let tail = get_exact(repo, &key, size - probe, probe)?;
    let trailer_len = decode_footer(&key, &tail[tail.len() - FOOTER_LEN..], size)?;
    let wanted = u64::from(trailer_len) + FOOTER_LEN as u64;
    let trailer = if wanted <= probe {
        tail[(probe - wanted) as usize..tail.len() - FOOTER_LEN].to_vec()
    } else {
        get_exact(repo, &key, size - wanted, u64::from(trailer_len))?
    };
    let payload = open_object_owned(
        repo.crypto(),
        ObjectKind::PackTrailer,
        TRAILER_NAME,
        trailer,
        MAX_PACK_METADATA,
    )
    .map_err(|e| Error::corrupt(&key, format!("its trailer cannot be read: {e}")))?;
    decode_trailer(&key, &payload, size - wanted)
}

/// A ranged read that must return exactly `length` bytes.
fn get_exact(repo: &Repository, key: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
    let bytes = repo.backend().get_range(key, offset, length)?;
    if bytes.len() as u64 != length {
        return Err(Error::corrupt(
            key,
            format!(
                "returned {} bytes for the {length} at offset {offset} (truncated?)",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// A pack being filled.
#[derive(Default)]
struct OpenPack {
    bytes: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl OpenPack {
    /// Seals the trailer, appends it and the footer, and returns the pack's
    /// description and bytes.
    fn finish(mut self, repo: &Repository) -> Result<(PackInfo, Vec<u8>)> {
        let trailer = seal_object(
            repo.crypto(),
            ObjectKind::PackTrailer,
            TRAILER_NAME,
            &encode_trailer(&self.entries),
            Some(3),
        )?;
        let trailer_len = u32::try_from(trailer.len())
            .map_err(|_| Error::internal("a pack's trailer is too large"))?;
        self.bytes.extend_from_slice(&trailer);
        self.bytes.extend_from_slice(&encode_footer(trailer_len));
        let digest = *blake3::hash(&self.bytes).as_bytes();
        let info = PackInfo {
            digest,
            size: self.bytes.len() as u64,
            entries: self.entries,
        };
        Ok((info, self.bytes))
    }
}

/// Gathers encoded chunks into packs of about the repository's pack size
/// and uploads each pack as it fills, on the thread that filled it (so at
/// most one pack per worker is in flight). The packs' index is written by
/// the caller, from [`PackWriter::finish`], before anything references
/// their chunks.
pub struct PackWriter<'a> {
    repo: &'a Repository,
    target: usize,
    open: Mutex<OpenPack>,
    written: Mutex<Vec<PackInfo>>,
    /// Buffers of uploaded packs, kept for the next packs.
    spare: Mutex<Vec<Vec<u8>>>,
}

/// Buffers of uploaded packs kept for reuse.
const SPARE_BUFFERS: usize = 2;

impl<'a> PackWriter<'a> {
    /// A writer for the repository's pack size.
    pub fn new(repo: &'a Repository) -> Self {
        Self::with_target(repo, repo.config().pack_size as usize)
    }

    /// A writer for packs of about `target` bytes.
    pub fn with_target(repo: &'a Repository, target: usize) -> Self {
        Self {
            repo,
            target: target.max(1),
            open: Mutex::new(OpenPack::default()),
            written: Mutex::new(Vec::new()),
            spare: Mutex::new(Vec::new()),
        }
    }

    /// Appends an encoded chunk; uploads the pack when it reached its size.
    pub fn add(&self, id: &ChunkId, encoded: &[u8]) -> Result<()> {
        let full = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let length = u32::try_from(encoded.len())
                .map_err(|_| Error::internal("an encoded chunk is too large"))?;
            if open.bytes.capacity() == 0 {
                // A buffer an uploaded pack left, or room for the pack, its
                // last chunk and the trailer: no doubling of a 16 MiB
                // buffer to 32 MiB, and no new large allocation per pack
                // (the allocator would keep the old ones).
                let reused = self.spare.lock().unwrap_or_else(|p| p.into_inner()).pop();
                let mut bytes = reused.unwrap_or_default();
                let room = self.target + encoded.len() + (64 << 10);
                bytes.reserve_exact(room);
                open.bytes = bytes;
            }
            let offset = open.bytes.len() as u64;
            open.entries.push(PackEntry {
                id: *id,
                offset,
                length,
            });
            open.bytes.extend_from_slice(encoded);
            match open.bytes.len() >= self.target {
                true => Some(std::mem::take(&mut *open)),
                false => None,
            }
        };
        match full {
            Some(pack) => self.upload(pack),
            None => Ok(()),
        }
    }

    fn upload(&self, pack: OpenPack) -> Result<()> {
        let (info, mut bytes) = pack.finish(self.repo)?;
        self.repo.backend().put(&pack_key(&info.digest), &bytes)?;
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(info);
        bytes.clear();
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < SPARE_BUFFERS {
            spare.push(bytes);
        }
        Ok(())
    }

    /// The packs uploaded so far (without the open one), taken out of the
    /// writer.
    pub fn take_uploaded(&self) -> Vec<PackInfo> {
        std::mem::take(&mut *self.written.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Uploads the last, partly filled pack and returns every pack written.
    pub fn finish(&self) -> Result<Vec<PackInfo>> {
        let last = std::mem::take(&mut *self.open.lock().unwrap_or_else(|p| p.into_inner()));
        if !last.entries.is_empty() {
            self.upload(last)?;
        }
        Ok(std::mem::take(
            &mut *self.written.lock().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

/// Chunks to fetch with one request: one loose chunk, or neighbouring
/// blobs of one pack read as a single range.
#[derive(Debug)]
pub struct ReadUnit<T> {
    /// The pack, or `None` for a loose chunk.
    pub pack: Option<u32>,
    /// First byte of the range.
    pub start: u64,
    /// First byte after the range.
    pub end: u64,
    /// What to read: the caller's tag, the chunk, its location.
    pub items: Vec<(T, ChunkId, Location)>,
}

/// Sorts chunks to read by where they are stored (loose ones first, then
/// pack by pack, by offset), so [`plan_reads`] can join neighbours.
pub fn sort_by_location<T>(map: &ChunkMap, items: &mut [(T, ChunkId)]) {
    items.sort_by_cached_key(|(_, id)| match map.chunks.get(id) {
        None => (0, 0, id.0),
        Some(Location::Loose { .. }) => (1, 0, id.0),
        Some(Location::Packed { pack, offset, .. }) => (u64::from(*pack) + 2, *offset, [0; 32]),
    });
}

/// Groups `wanted` chunks, in the order given, into read units: runs of
/// chunks in the same pack whose blobs lie within `span_limit` bytes of
/// each other, with at most a quarter of the range not wanted. Chunks not
/// in the map are returned apart.
pub fn plan_reads<T>(
    map: &ChunkMap,
    wanted: impl IntoIterator<Item = (T, ChunkId)>,
    span_limit: u64,
) -> (Vec<ReadUnit<T>>, Vec<(T, ChunkId)>) {
    let mut units: Vec<ReadUnit<T>> = Vec::new();
    let mut missing = Vec::new();
    let mut wanted_bytes = 0u64;
    for (tag, id) in wanted {
        let Some(location) = map.chunks.get(&id).copied() else {
            missing.push((tag, id));
            continue;
        };
        let Location::Packed {
            pack,
            offset,
            length,
        } = location
        else {
            units.push(ReadUnit {
                pack: None,
                start: 0,
                end: location.stored_size(),
                items: vec![(tag, id, location)],
            });
            continue;
        };
        let end = offset + u64::from(length);
        if let Some(unit) = units.last_mut().filter(|u| u.pack == Some(pack)) {
            let start = unit.start.min(offset);
            let stop = unit.end.max(end);
            let span = stop - start;
            let useful = wanted_bytes + u64::from(length);
            if span <= span_limit && span - span.min(useful) <= span / 4 {
                unit.start = start;
                unit.end = stop;
                unit.items.push((tag, id, location));
                wanted_bytes = useful;
                continue;
            }
        }
        wanted_bytes = u64::from(length);
        units.push(ReadUnit {
            pack: Some(pack),
            start: offset,
            end,
            items: vec![(tag, id, location)],
        });
    }
    (units, missing)
}

/// Receives each chunk of a [`ReadUnit`]: its tag, id, and plaintext or
/// error; an error it returns stops the read.
pub type ChunkSink<'a, T> = dyn FnMut(&T, &ChunkId, Result<Vec<u8>>) -> Result<()> + 'a;

/// Reads one unit and hands each chunk, checked and decoded, or its error,
/// to `each` (in the unit's order). A failed request fails every chunk of
/// the unit with the same error.
pub fn read_unit<T>(
    repo: &Repository,
    map: &ChunkMap,
    unit: &ReadUnit<T>,
    each: &mut ChunkSink<'_, T>,
) -> Result<()> {
    let Some(pack) = unit.pack else {
        for (tag, id, _) in &unit.items {
            each(tag, id, repo.read_chunk(id))?;
        }
        return Ok(());
    };
    let key = pack_key(&map.packs[pack as usize].digest);
    let range = match get_exact(repo, &key, unit.start, unit.end - unit.start) {
        Ok(range) => range,
        // A prune may have moved the chunks to new packs since the map was
        // loaded (it writes them and their index before deleting the old
        // pack): look again, once.
        Err(error) if error.is_not_found() && !map.reloaded => {
            return read_moved(repo, unit, each);
        }
        Err(error) => {
            for (tag, id, _) in &unit.items {
                each(tag, id, Err(clone_error(&error)))?;
            }
            return Ok(());
        }
    };
    for (tag, id, location) in &unit.items {
        let Location::Packed { offset, length, .. } = *location else {
            continue;
        };
        let from = (offset - unit.start) as usize;
        let blob = range[from..from + length as usize].to_vec();
        let decoded = repo
            .decode_chunk(id, blob)
            .map_err(|e| Error::corrupt(&key, format!("chunk {}: {e}", id.to_hex())));
        each(tag, id, decoded)?;
    }
    Ok(())
}

/// Reads the chunks of `unit` through a freshly loaded map, each alone.
fn read_moved<T>(repo: &Repository, unit: &ReadUnit<T>, each: &mut ChunkSink<'_, T>) -> Result<()> {
    let mut fresh = ChunkMap::load(repo)?;
    fresh.reloaded = true;
    for (tag, id, _) in &unit.items {
        let (units, missing) = plan_reads(&fresh, [(0u8, *id)], 0);
        if !missing.is_empty() {
            let gone = vbackup_storage::StorageError::new(
                vbackup_storage::ErrorKind::NotFound,
                &Repository::chunk_key(id),
                "not stored (no longer in any pack)",
            );
            each(tag, id, Err(Error::Storage(gone)))?;
        }
        for single in &units {
            read_unit(repo, &fresh, single, &mut |_, id, read| each(tag, id, read))?;
        }
    }
    Ok(())
}

/// A copy of an error for each chunk a failed request was to return: the
/// kind (missing, damaged, storage) is kept, since callers act on it.
fn clone_error(error: &Error) -> Error {
    match error {
        Error::Storage(e) => Error::Storage(vbackup_storage::StorageError::new(
            e.kind(),
            e.key(),
            e.to_string(),
        )),
        Error::Corrupt { key, reason } => Error::Corrupt {
            key: key.clone(),
            reason: reason.clone(),
        },
        other => Error::Refused(other.to_string()),
    }
}

/// Takes damaged chunks out of the pack indexes (repair's quarantine for
/// chunks in packs, which cannot be moved one by one): every pack index
/// naming a pack where `map` locates one of `damaged` is written again
/// without that entry, then the old one is removed; an orphan pack holding
/// one gets an index of its other chunks. The damaged bytes stay in their
/// pack until a prune repacks it; the chunk counts as not stored, so the
/// next backup whose disk still holds the data stores it again (which heals
/// every snapshot needing it), and a good second copy in another pack, if
/// any, becomes the one read. Returns the `packs/… (chunk …)` names dropped.
pub fn drop_damaged_blobs(
    repo: &Repository,
    map: &ChunkMap,
    damaged: &std::collections::HashSet<ChunkId>,
    dry_run: bool,
) -> Result<Vec<String>> {
    let doomed: std::collections::HashSet<([u8; 32], ChunkId)> = damaged
        .iter()
        .filter_map(|id| match map.chunks.get(id) {
            Some(Location::Packed { pack, .. }) => Some((map.packs[*pack as usize].digest, *id)),
            _ => None,
        })
        .collect();
    let mut dropped: Vec<String> = doomed.iter().map(|(_, id)| map.object_of(id)).collect();
    dropped.sort();
    if doomed.is_empty() || dry_run {
        return Ok(dropped);
    }
    let keep = |pack: &PackInfo| -> PackInfo {
        PackInfo {
            entries: pack
                .entries
                .iter()
                .filter(|e| !doomed.contains(&(pack.digest, e.id)))
                .copied()
                .collect(),
            ..pack.clone()
        }
    };
    for index in &map.pack_indexes {
        let Ok(packs) = read_pack_index(repo, &index.key) else {
            continue;
        };
        let touched = packs
            .iter()
            .any(|p| p.entries.iter().any(|e| doomed.contains(&(p.digest, e.id))));
        if !touched {
            continue;
        }
        let rewritten: Vec<PackInfo> = packs.iter().map(keep).collect();
        let names = write_pack_indexes(repo, &rewritten)?;
        if !names.contains(&index.key) {
            repo.backend().delete(&index.key)?;
        }
    }
    let orphans: Vec<PackInfo> = map
        .packs
        .iter()
        .filter(|p| !p.indexed && doomed.iter().any(|(d, _)| *d == p.digest))
        .map(|p| -> Result<PackInfo> {
            let entries = read_trailer(repo, &p.digest, p.size)?;
            Ok(keep(&PackInfo {
                digest: p.digest,
                size: p.size,
                entries,
            }))
        })
        .collect::<Result<_>>()?;
    write_pack_indexes(repo, &orphans)?;
    Ok(dropped)
}

/// Reads the chunk object `id` wherever `map` (in a repository with packs)
/// or the loose layout (`None`) puts it: authenticated and digest-checked;
/// a chunk not stored is a "not found" storage error on its name.
pub fn read_located(repo: &Repository, map: Option<&ChunkMap>, id: &ChunkId) -> Result<Vec<u8>> {
    let Some(map) = map else {
        return repo.read_chunk(id);
    };
    let mut data = Err(Error::Storage(vbackup_storage::StorageError::new(
        vbackup_storage::ErrorKind::NotFound,
        &Repository::chunk_key(id),
        "not stored",
    )));
    let (units, _) = plan_reads(map, [((), *id)], 0);
    for unit in &units {
        read_unit(repo, map, unit, &mut |_, _, read| {
            data = read;
            Ok(())
        })?;
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_with(blobs: &[(u8, u32, u64, u32)]) -> ChunkMap {
        let mut map = ChunkMap::default();
        for pack in 0..2 {
            map.packs.push(StoredPack {
                digest: [pack; 32],
                size: 1 << 30,
                indexed: true,
                blobs: 0,
            });
        }
        for (id, pack, offset, length) in blobs {
            map.chunks.insert(
                ChunkId([*id; 32]),
                Location::Packed {
                    pack: *pack,
                    offset: *offset,
                    length: *length,
                },
            );
        }
        map.chunks
            .insert(ChunkId([99; 32]), Location::Loose { size: 7 });
        map
    }

    fn ids(unit: &ReadUnit<u32>) -> Vec<u32> {
        unit.items.iter().map(|(tag, _, _)| *tag).collect()
    }

    #[test]
    fn neighbouring_blobs_of_a_pack_are_read_together() {
        // Blobs 1..=3 back to back in pack 0 (2 stored before 1), blob 4
        // far away in pack 0, blob 5 in pack 1.
        let map = map_with(&[
            (1, 0, 100, 100),
            (2, 0, 0, 100),
            (3, 0, 200, 100),
            (4, 0, 10_000, 100),
            (5, 1, 0, 100),
        ]);
        let wanted = [1u8, 2, 3, 4, 5, 99, 42]
            .iter()
            .map(|n| (u32::from(*n), ChunkId([*n; 32])));
        let (units, missing) = plan_reads(&map, wanted, 1000);
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].0, 42);
        let groups: Vec<Vec<u32>> = units.iter().map(ids).collect();
        assert_eq!(groups, vec![vec![1, 2, 3], vec![4], vec![5], vec![99]]);
        assert_eq!((units[0].start, units[0].end), (0, 300));
        assert_eq!(units[3].pack, None);
    }

    #[test]
    fn ranges_stay_within_the_span_and_mostly_wanted() {
        let blobs: Vec<(u8, u32, u64, u32)> =
            (0..10).map(|i| (i, 0, u64::from(i) * 100, 100)).collect();
        let map = map_with(&blobs);
        let all = (0..10u8).map(|n| (u32::from(n), ChunkId([n; 32])));
        let (units, _) = plan_reads(&map, all, 450);
        assert!(units.iter().all(|u| u.end - u.start <= 450));
        assert_eq!(units.len(), 3);
        // Every other blob: half of any joint range would be unwanted.
        let sparse = (0..10u8)
            .step_by(2)
            .map(|n| (u32::from(n), ChunkId([n; 32])));
        let (units, _) = plan_reads(&map, sparse, 10_000);
        assert_eq!(units.len(), 5);
    }
}
