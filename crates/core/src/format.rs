//! The on-disk formats: the object envelope, the config, key objects,
//! snapshot manifests and disk indexes. `docs/format.md` describes the same
//! bytes for people who want to write another reader.
//!
//! Every object starts with an 8-byte header: the magic `VBAK`, the envelope
//! version, the object kind, the compression and the cipher. Readers refuse
//! versions they do not know instead of guessing.

use serde::{Deserialize, Serialize};

use crate::crypto::{kdf::KdfParams, CipherKind, Crypto, DigestKind, SALT_LEN, TAG_LEN};
use crate::error::{Error, Result};

pub mod delta;
mod index;
pub mod lifecycle;
pub mod pack;

pub use index::{DiskIndex, DELTA_INDEX_VERSION, INDEX_VERSION, LEGACY_INDEX_VERSION};

/// The four bytes every vbackup object starts with.
pub const MAGIC: [u8; 4] = *b"VBAK";
/// The envelope version this build writes and the newest it reads.
pub const ENVELOPE_VERSION: u8 = 1;
/// The newest repository format version this build reads, and the one it
/// gives new repositories: 3, whose disk indexes may be of index version
/// 2 (runs of data chunks; see [`DiskIndex`]) and whose chunks are in packs
/// or loose as `pack-size` says. Versions 1 (loose chunks) and 2 (packs)
/// are read and written as they are, with index version 1 only, so older
/// builds sharing such a repository keep reading every index; builds that
/// know only versions 1 and 2 refuse a version 3 repository as a whole,
/// by its version, rather than misjudge its indexes.
pub const REPOSITORY_VERSION: u32 = 3;
/// The repository format version of repositories without packs made by
/// builds before version 3.
pub const LOOSE_REPOSITORY_VERSION: u32 = 1;
/// The repository format version of repositories with packs made by
/// builds before version 3.
pub const PACKS_REPOSITORY_VERSION: u32 = 2;
/// Length of the object header.
pub const HEADER_LEN: usize = 8;

/// What an object holds; part of the header and of the authenticated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// The repository config (plaintext JSON).
    Config = 1,
    /// A key object (plaintext JSON holding the wrapped master secret).
    Key = 2,
    /// A chunk of disk data.
    Chunk = 3,
    /// A disk index: the chunk list of one disk in one snapshot.
    Index = 4,
    /// A snapshot manifest.
    Snapshot = 5,
    /// A lock or backup lease (`locks/`).
    Lock = 6,
    /// A prune list: pending deletions or a deletion log (`prune/`).
    PruneList = 7,
    /// The stored retention policy (`policy`).
    Policy = 8,
    /// A damage marker written by `repair` (`damaged/`).
    DamageMarker = 9,
    /// The entry list at the end of a pack (`packs/`).
    PackTrailer = 10,
    /// A pack index: which chunks which packs hold (`packindex/`).
    PackIndex = 11,
    /// A boot verification's result (`verified/`).
    BootReport = 12,
}

impl ObjectKind {
    fn from_code(code: u8) -> Option<Self> {
        [
            Self::Config,
            Self::Key,
            Self::Chunk,
            Self::Index,
            Self::Snapshot,
            Self::Lock,
            Self::PruneList,
            Self::Policy,
            Self::DamageMarker,
            Self::PackTrailer,
            Self::PackIndex,
            Self::BootReport,
        ]
        .into_iter()
        .find(|k| *k as u8 == code)
    }
}

/// Compression of an object's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is (compression did not pay, or metadata kept plain).
    None = 0,
    /// Zstandard.
    Zstd = 1,
}

/// A parsed object header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the object holds.
    pub kind: ObjectKind,
    /// How the payload is compressed.
    pub compression: Compression,
    /// How the payload is sealed.
    pub cipher: CipherKind,
}

impl Header {
    /// The header's 8 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let m = MAGIC;
        [
            m[0],
            m[1],
            m[2],
            m[3],
            ENVELOPE_VERSION,
            self.kind as u8,
            self.compression as u8,
            self.cipher.code(),
        ]
    }

    /// Parses and checks the first bytes of an object named `key`.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::corrupt(
                key,
                format!("only {} bytes, shorter than the header", bytes.len()),
            ));
        }
        if bytes[..4] != MAGIC {
            return Err(Error::corrupt(key, "not a vbackup object (bad magic)"));
        }
        if bytes[4] > ENVELOPE_VERSION || bytes[4] == 0 {
            return Err(Error::UnsupportedVersion {
                what: format!("object '{key}'"),
                found: u32::from(bytes[4]),
                supported: u32::from(ENVELOPE_VERSION),
            });
        }
        let kind = ObjectKind::from_code(bytes[5])
            .ok_or_else(|| Error::corrupt(key, "unknown object kind"))?;
        let compression = match bytes[6] {
            0 => Compression::None,
            1 => Compression::Zstd,
            _ => return Err(Error::corrupt(key, "unknown compression")),
        };
        let cipher =
            CipherKind::from_code(bytes[7]).ok_or_else(|| Error::corrupt(key, "unknown cipher"))?;
        Ok(Self {
            kind,
            compression,
            cipher,
        })
    }
}

/// Builds the authenticated data of an object: its header and its name, so
/// an object moved to another name or kind fails to open.
fn aad(header: &[u8; HEADER_LEN], key: &str) -> Vec<u8> {
    let mut aad = header.to_vec();
    aad.extend_from_slice(key.as_bytes());
    aad
}

/// Compresses, seals and frames a payload as the object `key`.
///
/// With `level` set, the payload is zstd-compressed and kept compressed only
/// when that saves at least 1/32 of its size.
pub fn seal_object(
    crypto: &Crypto,
    kind: ObjectKind,
    key: &str,
    payload: &[u8],
    level: Option<i32>,
) -> Result<Vec<u8>> {
    let compressed = match level {
        Some(level) => crate::compress::compress(payload, level)
            .filter(|c| c.len() < payload.len() - payload.len() / 32),
        None => None,
    };
    let (compression, body) = match &compressed {
        Some(c) => (Compression::Zstd, c.as_slice()),
        None => (Compression::None, payload),
    };
    let header = Header {
        kind,
        compression,
        cipher: crypto.cipher(),
    }
    .encode();
    let mut out = Vec::with_capacity(HEADER_LEN + SALT_LEN + body.len() + TAG_LEN + 32);
    out.extend_from_slice(&header);
    crypto.seal_append(&mut out, &aad(&header, key), body)?;
    Ok(out)
}

/// Reverses [`seal_object`]: checks the header, authenticates, decompresses
/// (never to more than `max_len` bytes) and returns the payload.
pub fn open_object(
    crypto: &Crypto,
    kind: ObjectKind,
    key: &str,
    bytes: &[u8],
    max_len: usize,
) -> Result<Vec<u8>> {
    open_object_owned(crypto, kind, key, bytes.to_vec(), max_len)
}

/// [`open_object`] taking the object's bytes, which it decrypts in place.
pub fn open_object_owned(
    crypto: &Crypto,
    kind: ObjectKind,
    key: &str,
    mut bytes: Vec<u8>,
    max_len: usize,
) -> Result<Vec<u8>> {
    let header = Header::decode(key, &bytes)?;
    if header.kind != kind {
        return Err(Error::corrupt(
            key,
            format!("expected a {kind:?} object, found a {:?}", header.kind),
        ));
    }
    if header.cipher != crypto.cipher() {
        return Err(Error::corrupt(
            key,
            "sealed with a different cipher than the repository uses",
        ));
    }
    let aad = aad(&header.encode(), key);
    let body = crypto.open_in_place(key, &aad, &mut bytes[HEADER_LEN..])?;
    match header.compression {
        Compression::None if body.len() > max_len => {
            Err(Error::corrupt(key, "payload larger than allowed"))
        }
        Compression::None => Ok(body.to_vec()),
        Compression::Zstd => crate::compress::decompress(key, body, max_len),
    }
}

/// Frames a plaintext JSON object (config, key objects).
pub fn plain_json_object<T: Serialize>(kind: ObjectKind, value: &T) -> Result<Vec<u8>> {
    let header = Header {
        kind,
        compression: Compression::None,
        cipher: CipherKind::None,
    }
    .encode();
    let json = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::internal(format!("cannot encode {kind:?} as JSON: {e}")))?;
    let mut out = header.to_vec();
    out.extend_from_slice(&json);
    Ok(out)
}

/// Parses a plaintext JSON object framed by [`plain_json_object`].
pub fn parse_plain_json<T: for<'de> Deserialize<'de>>(
    kind: ObjectKind,
    key: &str,
    bytes: &[u8],
) -> Result<T> {
    let header = Header::decode(key, bytes)?;
    if header.kind != kind
        || header.cipher != CipherKind::None
        || header.compression != Compression::None
    {
        return Err(Error::corrupt(
            key,
            format!("expected a plain {kind:?} object"),
        ));
    }
    serde_json::from_slice(&bytes[HEADER_LEN..])
        .map_err(|e| Error::corrupt(key, format!("invalid JSON: {e}")))
}

/// The repository config: fixed at `init`, readable without a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// Repository format version ([`REPOSITORY_VERSION`]).
    pub version: u32,
    /// Random repository id (hex).
    pub id: String,
    /// Chunk size in bytes for new disks (a power of two).
    pub chunk_size: u32,
    /// How chunks are named.
    pub digest: DigestKind,
    /// How objects are sealed.
    pub cipher: CipherKind,
    /// zstd level for chunks.
    pub compression_level: i32,
    /// Target size of pack objects in bytes; 0 (absent) stores each chunk
    /// as its own object. Set only in version 2 repositories.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pack_size: u32,
    /// Keyed digest of the fields above under the config key (hex); empty
    /// without encryption. Stops someone without the key from changing them.
    #[serde(default)]
    pub mac: String,
}

impl Config {
    /// The bytes the MAC covers: every field but the MAC itself.
    pub fn mac_input(&self) -> Vec<u8> {
        let mut input = format!(
            "{}|{}|{}|{:?}|{:?}|{}",
            self.version,
            self.id,
            self.chunk_size,
            self.digest,
            self.cipher,
            self.compression_level
        );
        if self.version >= 2 {
            input.push_str(&format!("|{}", self.pack_size));
        }
        input.into_bytes()
    }

    /// Whether new chunks go into packs.
    pub fn packs(&self) -> bool {
        self.pack_size > 0
    }

    /// The newest disk index version this repository may hold: 3 in
    /// version 3 repositories (builds that read only versions 1 and 2
    /// refuse version 3 indexes as newer, never as damage; indexes without
    /// deltas are still written in version 2), 1 in older ones (which
    /// builds that cannot read index version 2 may share).
    pub fn index_version(&self) -> u32 {
        match self.version >= REPOSITORY_VERSION {
            true => DELTA_INDEX_VERSION,
            false => LEGACY_INDEX_VERSION,
        }
    }

    /// Whether backups may store chunks as deltas (see [`delta`]): only in
    /// version 3 repositories, whose every reader either reads index
    /// version 3 or refuses it as a newer version.
    pub fn deltas(&self) -> bool {
        self.index_version() >= DELTA_INDEX_VERSION
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A key object: the master secret wrapped under a passphrase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct KeyFile {
    /// Key object format version.
    pub version: u32,
    /// When the key was added (RFC 3339).
    pub created: String,
    /// Host that added it.
    pub host: String,
    /// User that added it.
    pub user: String,
    /// Argon2id parameters.
    pub kdf: KdfParams,
    /// Argon2id salt (hex).
    pub salt: String,
    /// The master secret sealed with AES-256-GCM under the derived key (hex).
    pub wrapped: String,
}

/// Statistics of one backup run, stored in its snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackupStats {
    /// Bytes read from the sources (holes are not read).
    pub bytes_read: u64,
    /// Plaintext bytes of chunks that were new to the repository, counted
    /// whole: a partly allocated chunk counts its unread (unallocated)
    /// parts as the zeros it stores, so this can exceed `bytes_read`.
    pub bytes_new: u64,
    /// Bytes written to the repository for those chunks (compressed, sealed).
    pub bytes_stored: u64,
    /// Chunks written.
    pub chunks_new: u64,
    /// Chunks that were already in the repository.
    pub chunks_reused: u64,
    /// Chunks recorded as holes (unallocated or all zeros).
    pub chunks_hole: u64,
    /// Disks not read because their source was unchanged since the VM's
    /// previous snapshot.
    #[serde(default)]
    pub disks_unchanged: u64,
    /// Chunks not read because a dirty bitmap said they had not changed
    /// (their digests come from the base snapshot).
    #[serde(default)]
    pub chunks_unchanged: u64,
    /// Wall time in seconds.
    pub duration_secs: f64,
}

/// One disk of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskRecord {
    /// Name of the disk within the VM (file name of the image, or device).
    pub name: String,
    /// Where it was read from.
    pub source: String,
    /// Source image format (raw, qcow2, ...).
    pub format: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Name of the index object (`indexes/<hex>`).
    pub index: String,
    /// Number of chunks holding data (not holes).
    pub data_chunks: u64,
    /// The source's fingerprint at backup time (see `DiskSource::identity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
    /// Set when the disk was not read because its fingerprint matched the
    /// previous snapshot's: the id of the snapshot whose index was reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unchanged_since: Option<String>,
    /// How much of the disk was read.
    #[serde(default)]
    pub read: ReadScope,
    /// With `read: changed`, the snapshot whose index supplied the chunks
    /// the dirty bitmap reported unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_snapshot: Option<String>,
    /// Why the whole disk was read although changed-block tracking was
    /// asked for (missing or inconsistent bitmap, resized disk, damaged
    /// base...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
    /// The dirty bitmaps that track this disk from this snapshot on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<Tracking>,
}

/// How much of a disk a backup read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadScope {
    /// Every allocated byte (a full backup, or a fallback).
    #[default]
    All,
    /// Only the chunks a dirty bitmap marked (incremental, differential).
    Changed,
    /// Nothing: the source was unchanged since the previous snapshot.
    None,
}

/// Names of the persistent dirty bitmaps that track a disk after a
/// snapshot. Random tokens in the names tie them to this VM's snapshots: a
/// bitmap of the same name can only have been made by vbackup for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Tracking {
    /// Where the bitmaps live: `qcow2` (in the image file, offline) or
    /// `qmp` (on a node of a running QEMU / qemu-storage-daemon).
    pub method: String,
    /// Records every write since this snapshot's instant: the base of the
    /// next incremental.
    pub incremental_bitmap: String,
    /// Records every write since the last full backup's instant: the base of
    /// differentials.
    pub full_bitmap: String,
    /// The full snapshot `full_bitmap` started at (this one, for a full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_snapshot: Option<String>,
}

/// The kind of backup, as asked for or as done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupType {
    /// Read everything (and start tracking).
    #[default]
    Full,
    /// Read what changed since the VM's previous snapshot.
    Incremental,
    /// Read what changed since the VM's last full snapshot.
    Differential,
}

impl std::fmt::Display for BackupType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackupType::Full => "full",
            BackupType::Incremental => "incremental",
            BackupType::Differential => "differential",
        })
    }
}

/// What a running VM looked like at backup time, and its configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmDefinition {
    /// What QMP reported (block devices and nodes, machine, CPUs...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp: Option<serde_json::Value>,
    /// A configuration file given with `--config` (libvirt domain XML, a
    /// QEMU command line): its file name and content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_file: Option<ConfigFile>,
}

/// A VM configuration file stored in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ConfigFile {
    /// File name (no directories).
    pub name: String,
    /// Its text.
    pub content: String,
}

/// A snapshot manifest: one backup of one VM, all its disks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotManifest {
    /// Manifest format version.
    pub version: u32,
    /// The VM's name.
    pub vm: String,
    /// Host the backup ran on.
    pub host: String,
    /// Start time (RFC 3339, UTC).
    pub time: String,
    /// User tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The disks.
    pub disks: Vec<DiskRecord>,
    /// Statistics of the run.
    pub stats: BackupStats,
    /// Version of vbackup that wrote it.
    pub program_version: String,
    /// The type of backup this snapshot is (a requested incremental whose
    /// every disk fell back to a full read is recorded as full).
    #[serde(default)]
    pub backup_type: BackupType,
    /// `offline` (images not in use), `crash-consistent` (a running VM at
    /// one instant) or `application-consistent` (filesystems frozen by the
    /// guest agent for that instant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
    /// Why a running VM's snapshot is only crash-consistent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency_note: Option<String>,
    /// The VM's definition, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<VmDefinition>,
    /// The token written into the guest just before the point in time
    /// (live backups with a guest agent): boot verification reads it back
    /// to prove the booted disk is this snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
}

/// A snapshot's canary: a file in the guest holding a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Canary {
    /// The file's path in the guest.
    pub path: String,
    /// The token it holds (32 hex digits).
    pub token: String,
}

/// Parses a snapshot manifest's JSON payload and checks its version.
pub fn parse_snapshot_manifest(key: &str, json: &[u8]) -> Result<SnapshotManifest> {
    let manifest: SnapshotManifest = serde_json::from_slice(json)
        .map_err(|e| Error::corrupt(key, format!("invalid manifest: {e}")))?;
    if manifest.version > SNAPSHOT_VERSION || manifest.version == 0 {
        return Err(Error::UnsupportedVersion {
            what: format!("snapshot '{key}'"),
            found: manifest.version,
            supported: SNAPSHOT_VERSION,
        });
    }
    check_manifest_names(&manifest).map_err(|reason| Error::corrupt(key, reason))?;
    Ok(manifest)
}

/// The longest disk or configuration file name, in bytes: restore appends
/// an extension (`.qcow2`) and the result must stay within a file system's
/// 255-byte name limit.
pub const MAX_FILE_NAME_LEN: usize = 200;

/// Checks that `name` can be used as one file name inside a folder: one
/// plain path component (no `/`, not `.` or `..`, not empty), no NUL or
/// other control character, at most [`MAX_FILE_NAME_LEN`] bytes. Disk
/// names and configuration file names become file names at restore, so a
/// manifest that breaks this could make a restore write outside its
/// target folder; the reason says what is wrong.
pub fn check_file_name(what: &str, name: &str) -> std::result::Result<(), String> {
    let problem = if name.is_empty() {
        "is empty"
    } else if name == "." || name == ".." {
        "is a relative folder reference"
    } else if name.contains('/') {
        "contains '/'"
    } else if name.chars().any(char::is_control) {
        "contains a control character"
    } else if name.len() > MAX_FILE_NAME_LEN {
        "is longer than 200 bytes"
    } else {
        return Ok(());
    };
    Err(format!(
        "{what} {name:?} {problem}; it must be one plain file name"
    ))
}

/// Checks every name in a manifest that a restore turns into a path (see
/// [`check_file_name`]).
pub fn check_manifest_names(manifest: &SnapshotManifest) -> std::result::Result<(), String> {
    for disk in &manifest.disks {
        check_file_name("disk name", &disk.name)?;
    }
    let config = manifest
        .definition
        .as_ref()
        .and_then(|d| d.config_file.as_ref());
    if let Some(config) = config {
        check_file_name("configuration file name", &config.name)?;
    }
    Ok(())
}

/// The manifest format version this build writes.
pub const SNAPSHOT_VERSION: u32 = 1;
#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterSecret;
    use proptest::prelude::*;

    fn crypto() -> Crypto {
        Crypto::new(
            CipherKind::Aes256Gcm,
            DigestKind::Blake3Keyed,
            Some(&MasterSecret([3; 32])),
        )
    }

    #[test]
    fn objects_round_trip_and_bind_their_name() {
        let c = crypto();
        let payload = vec![42u8; 10_000];
        let bytes = seal_object(&c, ObjectKind::Chunk, "chunks/aa/aa", &payload, Some(1)).unwrap();
        assert!(bytes.len() < 1000, "compressible data is compressed");
        assert_eq!(
            open_object(&c, ObjectKind::Chunk, "chunks/aa/aa", &bytes, 10_000).unwrap(),
            payload
        );
        assert!(open_object(&c, ObjectKind::Chunk, "chunks/bb/bb", &bytes, 10_000).is_err());
        assert!(open_object(&c, ObjectKind::Index, "chunks/aa/aa", &bytes, 10_000).is_err());
        assert!(open_object(&c, ObjectKind::Chunk, "chunks/aa/aa", &bytes, 9_999).is_err());
    }

    fn manifest_json(disk: &str, config: &str) -> Vec<u8> {
        let manifest = SnapshotManifest {
            version: 1,
            disks: vec![DiskRecord {
                name: disk.to_string(),
                ..DiskRecord::default()
            }],
            definition: Some(VmDefinition {
                qmp: None,
                config_file: Some(ConfigFile {
                    name: config.to_string(),
                    content: String::new(),
                }),
            }),
            ..SnapshotManifest::default()
        };
        serde_json::to_vec(&manifest).unwrap()
    }

    #[test]
    fn attack_restore_path_traversal_names_that_are_not_one_file_name_are_refused() {
        parse_snapshot_manifest("snapshots/s", &manifest_json("web1", "web1.xml")).unwrap();
        let long = "x".repeat(MAX_FILE_NAME_LEN + 1);
        for bad in [
            "/etc/cron.d/x",
            "../x",
            "..",
            ".",
            "",
            "a/b",
            "a\0b",
            "a\nb",
            &long,
        ] {
            for json in [manifest_json(bad, "web1.xml"), manifest_json("web1", bad)] {
                let err = parse_snapshot_manifest("snapshots/s", &json).unwrap_err();
                assert!(matches!(err, Error::Corrupt { .. }), "{bad:?}: {err}");
                assert!(err.to_string().contains("one plain file name"), "{err}");
            }
        }
        check_file_name("disk name", &"x".repeat(MAX_FILE_NAME_LEN)).unwrap();
        check_file_name("disk name", ".hidden-but-plain").unwrap();
    }

    #[test]
    fn newer_envelope_versions_are_refused_by_name() {
        let mut bytes = plain_json_object(ObjectKind::Config, &"x").unwrap();
        bytes[4] = 9;
        let err = parse_plain_json::<String>(ObjectKind::Config, "config", &bytes).unwrap_err();
        assert!(
            matches!(
                err,
                Error::UnsupportedVersion {
                    found: 9,
                    supported: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn hostile_objects_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = open_object(&crypto(), ObjectKind::Chunk, "k", &bytes, 1 << 20);
        }
    }
}
