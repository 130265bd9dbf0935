//! Opening, creating and reading/writing a repository.
//!
//! A [`Repository`] is a backend plus the keys that open it. It knows where
//! each kind of object lives (`config`, `keys/<id>`, `chunks/<xx>/<id>`,
//! `indexes/<id>`, `snapshots/<id>`) and seals and opens them; the commands
//! (backup, restore, verify, stats) are built on these few operations.

use std::collections::HashMap;
use std::sync::Arc;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use vbackup_storage::Backend;

use crate::crypto::{kdf, random_bytes, CipherKind, Crypto, DigestKind, MasterSecret};
use crate::error::{Error, Result};
use crate::format::{
    self, open_object_owned, seal_object, Config, DiskIndex, KeyFile, ObjectKind, SnapshotManifest,
    LOOSE_REPOSITORY_VERSION, PACKS_REPOSITORY_VERSION, REPOSITORY_VERSION,
};
use crate::packs::{ChunkMap, DEFAULT_PACK_SIZE, MAX_PACK_SIZE, MIN_PACK_SIZE};
use crate::trust::{check_unencrypted, KnownRepositories, OpenOptions};
use crate::ChunkId;

/// Name of the config object.
pub const CONFIG_KEY: &str = "config";
/// Folder of key objects.
pub const KEYS_PREFIX: &str = "keys/";
/// Folder of chunk objects.
pub const CHUNKS_PREFIX: &str = "chunks/";
/// Folder of index objects.
pub const INDEXES_PREFIX: &str = "indexes/";
/// Folder of snapshot manifests.
pub const SNAPSHOTS_PREFIX: &str = "snapshots/";
/// Folder of locks and backup leases.
pub const LOCKS_PREFIX: &str = "locks/";
/// Folder of prune lists (pending deletions, deletion logs).
pub const PRUNE_PREFIX: &str = "prune/";
/// Folder where a sweep moves an object just before deleting it.
pub const TRASH_PREFIX: &str = "trash/";
/// Folder where `repair` moves damaged objects.
pub const QUARANTINE_PREFIX: &str = "quarantine/";
/// Folder of damage markers.
pub const DAMAGED_PREFIX: &str = "damaged/";
/// Name of the stored retention policy.
pub const POLICY_KEY: &str = "policy";

/// Largest chunk size a repository may use (also bounds decompression).
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Smallest chunk size a repository may use.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Upper bound for decoded metadata objects (indexes of 16 TiB disks at 64 KiB chunks fit).
const MAX_METADATA_LEN: usize = 1 << 30;

/// How `init` sets up a repository; also the defaults users see in `--help`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Chunk size in bytes (power of two between 64 KiB and 64 MiB).
    pub chunk_size: u32,
    /// Cipher; `CipherKind::None` means no encryption.
    pub cipher: CipherKind,
    /// Chunk digest.
    pub digest: DigestKind,
    /// zstd level for chunks.
    pub compression_level: i32,
    /// Argon2id cost of the first key.
    pub kdf: kdf::KdfParams,
    /// Target size of pack objects: `Some(0)` stores each chunk as its own
    /// object, `None` chooses: packs of [`crate::packs::DEFAULT_PACK_SIZE`]
    /// on storage without atomic rename (object stores, where every object
    /// costs requests), loose chunks elsewhere.
    pub pack_size: Option<u32>,
    /// The client's record of known repositories (`crate::trust`): the new
    /// repository is recorded there, encrypted or explicitly not.
    pub state_dir: Option<std::path::PathBuf>,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            chunk_size: 4 << 20,
            cipher: CipherKind::default_for_cpu(),
            digest: DigestKind::Blake3Keyed,
            compression_level: 3,
            kdf: kdf::KdfParams::default(),
            pack_size: None,
            state_dir: None,
        }
    }
}

/// Summary of one key object, for `vbackup key list`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct KeyInfo {
    /// Key id (object name without the folder).
    pub id: String,
    /// When it was added.
    pub created: String,
    /// Host that added it.
    pub host: String,
    /// User that added it.
    pub user: String,
    /// Whether this key opened the repository in this session.
    pub current: bool,
}

/// A snapshot manifest with its id.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Hex id (the object name without the folder).
    pub id: String,
    /// The manifest.
    pub manifest: SnapshotManifest,
}

/// How far past this host's clock a snapshot may be dated and still be
/// taken at its word: hosts' clocks differ a little, but a snapshot from
/// further ahead is forged or from a badly wrong clock. Such snapshots are
/// flagged, never counted by retention rules and never used as a base.
pub const FUTURE_SKEW_MINUTES: i64 = 15;

impl Snapshot {
    /// The first 8 hex digits, as shown in tables.
    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(8)]
    }

    /// Its time, if readable.
    pub fn time(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::DateTime::parse_from_rfc3339(&self.manifest.time)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc))
    }

    /// Whether it is dated later than `now` plus [`FUTURE_SKEW_MINUTES`].
    pub fn is_future_dated(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        self.time()
            .is_some_and(|t| t > now + chrono::Duration::minutes(FUTURE_SKEW_MINUTES))
    }
}

/// Snapshot manifests read at once when listing, at the least (remote
/// backends ask for more through `Backend::concurrency`).
const SNAPSHOT_READERS: usize = 4;

/// An open repository.
pub struct Repository {
    backend: Arc<dyn Backend>,
    config: Config,
    crypto: Crypto,
    secret: Option<MasterSecret>,
    key_id: Option<String>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.backend.location())
            .field("config", &self.config)
            .finish()
    }
}

fn validate_init(options: &InitOptions) -> Result<()> {
    let cs = options.chunk_size;
    if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return Err(Error::InvalidInput(format!(
            "chunk size {cs} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes"
        )));
    }
    if !(1..=19).contains(&options.compression_level) {
        return Err(Error::InvalidInput(
            "compression level must be between 1 and 19".to_string(),
        ));
    }
    if let Some(size) = options.pack_size.filter(|s| *s != 0) {
        if !(MIN_PACK_SIZE..=MAX_PACK_SIZE).contains(&size) {
            return Err(Error::InvalidInput(format!(
                "pack size {size} is not between {MIN_PACK_SIZE} and {MAX_PACK_SIZE} bytes (0 stores chunks unpacked)"
            )));
        }
    }
    Ok(())
}

/// Range-checks every field of a stored config before anything uses it.
/// The config is readable (and, without the key, writable) by the storage:
/// a value outside what `init` writes is tampering or damage, never a
/// setting to follow. A version 1 config has no packs, and its MAC does not
/// cover `pack-size`, so a pack size there is refused rather than obeyed.
fn check_config_values(config: &Config) -> Result<()> {
    let bad = |reason: String| Err(Error::corrupt(CONFIG_KEY, reason));
    let cs = config.chunk_size;
    if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return bad(format!(
            "chunk size {cs} is outside what any vbackup writes"
        ));
    }
    if !(1..=19).contains(&config.compression_level) {
        return bad(format!(
            "compression level {} is outside 1..=19",
            config.compression_level
        ));
    }
    if config.id.len() != 32 || !config.id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return bad("the repository id is not 32 hex digits".to_string());
    }
    match (config.version, config.pack_size) {
        (LOOSE_REPOSITORY_VERSION, 0) => {}
        (LOOSE_REPOSITORY_VERSION, size) => {
            return bad(format!(
                "a version 1 repository has no packs, but the config says pack size {size} (added without the key?)"
            ))
        }
        (PACKS_REPOSITORY_VERSION, 0) => {
            return bad("a version 2 repository must have a pack size".to_string())
        }
        (_, 0) => {}
        (_, size) if !(MIN_PACK_SIZE..=MAX_PACK_SIZE).contains(&size) => {
            return bad(format!(
                "pack size {size} is outside {MIN_PACK_SIZE}..={MAX_PACK_SIZE}"
            ))
        }
        _ => {}
    }
    match (config.cipher, config.mac.is_empty()) {
        (CipherKind::None, false) => bad("an unencrypted config carries a MAC".to_string()),
        (CipherKind::None, true) => Ok(()),
        (_, true) => bad("an encrypted config has no MAC".to_string()),
        (_, false) => Ok(()),
    }
}

/// Refuses a pack size whose packs (up to the size plus a chunk and its
/// trailer) the backend would not accept.
fn check_pack_fits(backend: &dyn Backend, pack_size: u32, chunk_size: u32) -> Result<()> {
    let largest = u64::from(pack_size) + u64::from(chunk_size) + (1 << 20);
    match backend.max_object_size() {
        Some(limit) if pack_size > 0 && largest > limit => Err(Error::InvalidInput(format!(
            "pack size {pack_size} is too large for {}, which accepts objects up to {limit} bytes (a pack may reach its size plus one chunk)",
            backend.location()
        ))),
        _ => Ok(()),
    }
}

/// The pack size a new repository on `backend` gets.
fn chosen_pack_size(backend: &dyn Backend, options: &InitOptions) -> u32 {
    match options.pack_size {
        Some(size) => size,
        None if backend.can_rename() => 0,
        None => DEFAULT_PACK_SIZE,
    }
}

impl Repository {
    /// Creates a new repository. `passphrase` must be given unless the
    /// cipher is `None`.
    pub fn init(
        backend: Arc<dyn Backend>,
        passphrase: Option<&str>,
        options: &InitOptions,
    ) -> Result<Self> {
        validate_init(options)?;
        if backend.stat(CONFIG_KEY)?.is_some() {
            return Err(Error::AlreadyInitialized {
                location: backend.location(),
            });
        }
        let secret = match (options.cipher, passphrase) {
            (CipherKind::None, _) => None,
            (_, Some(_)) => Some(MasterSecret::generate()?),
            (_, None) => {
                return Err(Error::PassphraseRequired {
                    location: backend.location(),
                })
            }
        };
        let crypto = Crypto::new(options.cipher, options.digest, secret.as_ref());
        let pack_size = chosen_pack_size(backend.as_ref(), options);
        check_pack_fits(backend.as_ref(), pack_size, options.chunk_size)?;
        let mut config = Config {
            version: REPOSITORY_VERSION,
            pack_size,
            id: hex::encode(random_bytes::<16>()?),
            chunk_size: options.chunk_size,
            digest: options.digest,
            cipher: options.cipher,
            compression_level: options.compression_level,
            mac: String::new(),
        };
        if secret.is_some() {
            config.mac = hex::encode(crypto.mac(&config.mac_input()));
        }
        let mut repo = Self {
            backend,
            config,
            crypto,
            secret,
            key_id: None,
        };
        if let Some(passphrase) = passphrase.filter(|_| repo.secret.is_some()) {
            repo.key_id = Some(repo.add_key(passphrase, options.kdf)?);
        }
        // The config goes last: until it exists the folder is not a repository.
        let config_bytes = format::plain_json_object(ObjectKind::Config, &repo.config)?;
        repo.backend.put(CONFIG_KEY, &config_bytes)?;
        if let Some(dir) = &options.state_dir {
            KnownRepositories::new(dir).record(&repo.location(), &repo.config);
        }
        Ok(repo)
    }

    /// Reads the config without opening any key (for messages and checks).
    pub fn read_config(backend: &dyn Backend) -> Result<Config> {
        let bytes = match backend.get(CONFIG_KEY) {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => {
                return Err(Error::NotARepository {
                    location: backend.location(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let config: Config = format::parse_plain_json(ObjectKind::Config, CONFIG_KEY, &bytes)?;
        if config.version > REPOSITORY_VERSION || config.version == 0 {
            return Err(Error::UnsupportedVersion {
                what: format!("the repository at {}", backend.location()),
                found: config.version,
                supported: REPOSITORY_VERSION,
            });
        }
        check_config_values(&config)?;
        Ok(config)
    }

    /// Opens an encrypted repository; `passphrase` is asked for only when
    /// needed. An unencrypted one is refused (see [`Repository::open_with`]).
    pub fn open(
        backend: Arc<dyn Backend>,
        passphrase: impl FnOnce() -> Result<Option<String>>,
    ) -> Result<Self> {
        Self::open_with(backend, &OpenOptions::default(), passphrase)
    }

    /// Opens a repository as `options` say. An unencrypted config is
    /// accepted only by the user's explicit choice and when nothing
    /// suggests the repository was encrypted (`crate::trust`); an encrypted
    /// one must pass its MAC check. What was opened is recorded in
    /// `options.state_dir`.
    pub fn open_with(
        backend: Arc<dyn Backend>,
        options: &OpenOptions,
        passphrase: impl FnOnce() -> Result<Option<String>>,
    ) -> Result<Self> {
        let config = Self::read_config(backend.as_ref())?;
        let location = backend.location();
        let known = options.state_dir.as_deref().map(KnownRepositories::new);
        let repo = match config.cipher {
            CipherKind::None => {
                let keys = backend.list(KEYS_PREFIX)?.len();
                let seen = known.as_ref().and_then(|k| k.get(&location));
                check_unencrypted(&location, keys, options, seen.as_ref())?;
                let crypto = Crypto::new(config.cipher, config.digest, None);
                Self {
                    backend,
                    config,
                    crypto,
                    secret: None,
                    key_id: None,
                }
            }
            _ => Self::unlock_encrypted(backend, config, passphrase)?,
        };
        if let Some(known) = known {
            known.record(&location, &repo.config);
        }
        Ok(repo)
    }

    /// Unlocks an encrypted repository and checks its config's MAC.
    fn unlock_encrypted(
        backend: Arc<dyn Backend>,
        config: Config,
        passphrase: impl FnOnce() -> Result<Option<String>>,
    ) -> Result<Self> {
        let passphrase = passphrase()?.ok_or_else(|| Error::PassphraseRequired {
            location: backend.location(),
        })?;
        let (key_id, secret) = unlock(backend.as_ref(), &config, &passphrase)?;
        let crypto = Crypto::new(config.cipher, config.digest, Some(&secret));
        if hex::encode(crypto.mac(&config.mac_input())) != config.mac {
            return Err(Error::corrupt(
                CONFIG_KEY,
                "its authentication code does not match (modified without the key)",
            ));
        }
        Ok(Self {
            backend,
            config,
            crypto,
            secret: Some(secret),
            key_id: Some(key_id),
        })
    }

    /// The repository's config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The backend holding the objects.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Digest and seal operations.
    pub fn crypto(&self) -> &Crypto {
        &self.crypto
    }

    /// Where the repository is, for messages.
    pub fn location(&self) -> String {
        self.backend.location()
    }

    /// Adds a key object wrapping the master secret under `passphrase` and
    /// returns its id.
    pub fn add_key(&self, passphrase: &str, params: kdf::KdfParams) -> Result<String> {
        let secret = self.secret.as_ref().ok_or_else(|| {
            Error::InvalidInput("this repository is not encrypted, so it has no keys".to_string())
        })?;
        let salt = random_bytes::<16>()?;
        let kek = kdf::derive(passphrase.as_bytes(), &salt, params)?;
        let nonce = random_bytes::<12>()?;
        let aad = key_aad(&self.config.id);
        let mut wrapped = secret.0.to_vec();
        kek_cipher(&kek)?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut wrapped,
            )
            .map_err(|_| Error::internal("wrapping the master key failed"))?;
        let key_file = KeyFile {
            version: 1,
            created: chrono::Utc::now().to_rfc3339(),
            host: crate::hostname(),
            user: crate::user_name(),
            kdf: params,
            salt: hex::encode(salt),
            wrapped: hex::encode([nonce.as_slice(), &wrapped].concat()),
        };
        let id = hex::encode(random_bytes::<16>()?);
        self.backend.put(
            &format!("{KEYS_PREFIX}{id}"),
            &format::plain_json_object(ObjectKind::Key, &key_file)?,
        )?;
        Ok(id)
    }

    /// Lists the key objects.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let mut keys = Vec::new();
        for object in self.backend.list(KEYS_PREFIX)? {
            let bytes = self.backend.get(&object.key)?;
            let file: KeyFile = format::parse_plain_json(ObjectKind::Key, &object.key, &bytes)?;
            let id = object.key.trim_start_matches(KEYS_PREFIX).to_string();
            let current = self.key_id.as_deref() == Some(id.as_str());
            keys.push(KeyInfo {
                id,
                created: file.created,
                host: file.host,
                user: file.user,
                current,
            });
        }
        keys.sort_by(|a, b| a.created.cmp(&b.created));
        Ok(keys)
    }

    /// Removes the key whose id starts with `id_prefix`. The key in use and
    /// the last key cannot be removed.
    pub fn remove_key(&self, id_prefix: &str) -> Result<String> {
        let keys = self.list_keys()?;
        let matching: Vec<_> = keys
            .iter()
            .filter(|k| k.id.starts_with(id_prefix))
            .collect();
        let key = match matching.as_slice() {
            [one] => *one,
            [] => {
                return Err(Error::InvalidInput(format!(
                    "no key id starts with '{id_prefix}'"
                )))
            }
            _ => {
                return Err(Error::InvalidInput(format!(
                    "'{id_prefix}' matches several keys; give more digits"
                )))
            }
        };
        if key.current {
            return Err(Error::InvalidInput(
                "refusing to remove the key that opened the repository; open it with another key first".to_string(),
            ));
        }
        self.backend.delete(&format!("{KEYS_PREFIX}{}", key.id))?;
        Ok(key.id.clone())
    }

    /// The object name of a chunk.
    pub fn chunk_key(id: &ChunkId) -> String {
        let hex = id.to_hex();
        format!("{CHUNKS_PREFIX}{}/{hex}", &hex[..2])
    }

    /// Every chunk stored, loose or in a pack, with its stored size.
    pub fn list_chunks(&self) -> Result<HashMap<ChunkId, u64>> {
        Ok(self.chunk_map()?.sizes())
    }

    /// Where every stored chunk is (see [`ChunkMap::load`]).
    pub fn chunk_map(&self) -> Result<ChunkMap> {
        ChunkMap::load(self)
    }

    /// Encodes a chunk (compress, seal) without storing it.
    pub fn encode_chunk(&self, id: &ChunkId, data: &[u8]) -> Result<Vec<u8>> {
        seal_object(
            &self.crypto,
            ObjectKind::Chunk,
            &Self::chunk_key(id),
            data,
            Some(self.config.compression_level),
        )
    }

    /// Stores an encoded chunk as its own object. Refused in a repository
    /// with packs, whose readers never look at loose chunks.
    pub fn put_chunk(&self, id: &ChunkId, encoded: &[u8]) -> Result<()> {
        if self.config.packs() {
            return Err(Error::Internal(format!(
                "chunk {id} was to be stored loose in {}, a repository with packs",
                self.location()
            )));
        }
        Ok(self.backend.put(&Self::chunk_key(id), encoded)?)
    }

    /// Reads a loose chunk, authenticates it, and checks that its plaintext
    /// has the digest it is named by (chunks in packs are read through
    /// [`crate::packs::read_unit`]).
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let key = Self::chunk_key(id);
        let bytes = self.backend.get(&key)?;
        self.decode_chunk(id, bytes)
    }

    /// Checks and decodes a chunk object's bytes.
    pub fn decode_chunk(&self, id: &ChunkId, bytes: Vec<u8>) -> Result<Vec<u8>> {
        let key = Self::chunk_key(id);
        let data = open_object_owned(
            &self.crypto,
            ObjectKind::Chunk,
            &key,
            bytes,
            MAX_CHUNK_SIZE as usize,
        )?;
        if self.crypto.chunk_id(&data) != *id {
            return Err(Error::corrupt(&key, "content does not match its digest"));
        }
        Ok(data)
    }

    /// Stores a disk index and returns its object name.
    ///
    /// The index is written even when an object of that name exists: the
    /// fresh write is what tells a concurrent prune that the index is in use
    /// again (see ARCHITECTURE.md, garbage collection), and it replaces a
    /// damaged copy.
    pub fn write_index(&self, index: &DiskIndex) -> Result<String> {
        // A new index in a repository older builds may share is written in
        // the index version they read; a reused one keeps its own.
        let newest = self.config.index_version();
        let payload = match index.version() > newest {
            true => index.clone().in_version(newest)?.encode(),
            false => index.encode(),
        };
        let key = format!("{INDEXES_PREFIX}{}", hex::encode(self.crypto.mac(&payload)));
        let bytes = seal_object(&self.crypto, ObjectKind::Index, &key, &payload, Some(3))?;
        self.backend.put(&key, &bytes)?;
        Ok(key)
    }

    /// The object name of the index with digest `digest`.
    pub fn index_key(digest: &[u8; 32]) -> String {
        format!("{INDEXES_PREFIX}{}", hex::encode(digest))
    }

    /// The digest in an index object name, if it is one.
    pub fn index_digest(key: &str) -> Option<[u8; 32]> {
        let hex = key.strip_prefix(INDEXES_PREFIX)?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex, &mut digest).ok()?;
        Some(digest)
    }

    /// Seals `payload` as an object of `kind` named `key` and stores it.
    pub fn put_sealed(&self, kind: ObjectKind, key: &str, payload: &[u8]) -> Result<()> {
        let bytes = seal_object(&self.crypto, kind, key, payload, Some(3))?;
        Ok(self.backend.put(key, &bytes)?)
    }

    /// Reads and opens a sealed object of `kind`.
    pub fn get_sealed(&self, kind: ObjectKind, key: &str) -> Result<Vec<u8>> {
        let bytes = self.backend.get(key)?;
        open_object_owned(&self.crypto, kind, key, bytes, MAX_METADATA_LEN)
    }

    /// Seals `value` as JSON under `key`.
    pub fn put_sealed_json<T: serde::Serialize>(
        &self,
        kind: ObjectKind,
        key: &str,
        value: &T,
    ) -> Result<()> {
        let json = serde_json::to_vec(value)
            .map_err(|e| Error::internal(format!("cannot encode '{key}': {e}")))?;
        self.put_sealed(kind, key, &json)
    }

    /// Reads a sealed JSON object written by [`Repository::put_sealed_json`].
    pub fn get_sealed_json<T: serde::de::DeserializeOwned>(
        &self,
        kind: ObjectKind,
        key: &str,
    ) -> Result<T> {
        let json = self.get_sealed(kind, key)?;
        serde_json::from_slice(&json).map_err(|e| Error::corrupt(key, format!("invalid JSON: {e}")))
    }

    /// Reads and checks a disk index.
    pub fn read_index(&self, key: &str) -> Result<DiskIndex> {
        let bytes = self.backend.get(key)?;
        let payload = open_object_owned(
            &self.crypto,
            ObjectKind::Index,
            key,
            bytes,
            MAX_METADATA_LEN,
        )?;
        DiskIndex::decode(key, &payload)
    }

    /// Stores a snapshot manifest and returns its id.
    pub fn write_snapshot(&self, manifest: &SnapshotManifest) -> Result<String> {
        let id = hex::encode(random_bytes::<32>()?);
        let key = format!("{SNAPSHOTS_PREFIX}{id}");
        let json = serde_json::to_vec(manifest)
            .map_err(|e| Error::internal(format!("cannot encode the snapshot manifest: {e}")))?;
        let bytes = seal_object(&self.crypto, ObjectKind::Snapshot, &key, &json, Some(3))?;
        self.backend.put(&key, &bytes)?;
        Ok(id)
    }

    /// Reads one snapshot manifest by full id.
    pub fn read_snapshot(&self, id: &str) -> Result<Snapshot> {
        let key = format!("{SNAPSHOTS_PREFIX}{id}");
        let bytes = self.backend.get(&key)?;
        let json = open_object_owned(
            &self.crypto,
            ObjectKind::Snapshot,
            &key,
            bytes,
            MAX_METADATA_LEN,
        )?;
        let manifest = format::parse_snapshot_manifest(&key, &json)?;
        Ok(Snapshot {
            id: id.to_string(),
            manifest,
        })
    }

    /// Every snapshot that can be read, oldest first, and the errors of those
    /// that cannot.
    pub fn list_snapshots_checked(&self) -> Result<(Vec<Snapshot>, Vec<Error>)> {
        let ids: Vec<String> = self
            .backend
            .list(SNAPSHOTS_PREFIX)?
            .into_iter()
            .map(|o| o.key.trim_start_matches(SNAPSHOTS_PREFIX).to_string())
            .collect();
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for result in self.read_snapshots(&ids) {
            match result {
                Ok(snapshot) => good.push(snapshot),
                Err(e) => bad.push(e),
            }
        }
        good.sort_by(|a, b| {
            a.manifest
                .time
                .cmp(&b.manifest.time)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok((good, bad))
    }

    /// Reads the snapshots `ids`, several at a time: on remote storage each
    /// is a request, and a repository may hold thousands.
    fn read_snapshots(&self, ids: &[String]) -> Vec<Result<Snapshot>> {
        let workers = self.backend.concurrency().max(SNAPSHOT_READERS);
        crate::parallel_map(ids, workers, |id| self.read_snapshot(id))
    }

    /// Every snapshot, oldest first; fails if any manifest is damaged.
    pub fn list_snapshots(&self) -> Result<Vec<Snapshot>> {
        let (good, mut bad) = self.list_snapshots_checked()?;
        match bad.pop() {
            Some(error) => Err(error),
            None => Ok(good),
        }
    }

    /// Finds a snapshot by `latest`, a full id or a unique id prefix,
    /// optionally among one VM's snapshots only.
    pub fn find_snapshot(&self, spec: &str, vm: Option<&str>) -> Result<Snapshot> {
        let (snapshots, damaged) = self.list_snapshots_checked()?;
        let candidates: Vec<Snapshot> = snapshots
            .into_iter()
            .filter(|s| vm.is_none_or(|vm| s.manifest.vm == vm))
            .collect();
        let vm_note = vm.map(|vm| format!(" of VM '{vm}'")).unwrap_or_default();
        if spec == "latest" {
            return candidates.into_iter().last().ok_or_else(|| {
                Error::SnapshotSelection(format!("no snapshots{vm_note} in the repository"))
            });
        }
        let mut matching: Vec<Snapshot> = candidates
            .into_iter()
            .filter(|s| s.id.starts_with(spec))
            .collect();
        match matching.len() {
            1 => Ok(matching.remove(0)),
            // A damaged (or forged) manifest of that id: say why it is unusable.
            0 => Err(damaged
                .into_iter()
                .find(|e| {
                    matches!(e, Error::Corrupt { key, .. }
                        if key.starts_with(&format!("{SNAPSHOTS_PREFIX}{spec}")))
                })
                .unwrap_or_else(|| {
                    Error::SnapshotSelection(format!(
                        "no snapshot{vm_note} has an id starting with '{spec}'"
                    ))
                })),
            n => Err(Error::SnapshotSelection(format!(
                "'{spec}' matches {n} snapshots{vm_note}; give more digits"
            ))),
        }
    }
}

fn key_aad(repository_id: &str) -> Vec<u8> {
    format!("vbackup key v1|{repository_id}").into_bytes()
}

/// AES-256-GCM under a key-encryption key.
fn kek_cipher(kek: &[u8; 32]) -> Result<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, kek)
        .map(LessSafeKey::new)
        .map_err(|_| Error::internal("cannot set up AES-256-GCM for the key"))
}

/// Tries every key object with the passphrase.
fn unlock(
    backend: &dyn Backend,
    config: &Config,
    passphrase: &str,
) -> Result<(String, MasterSecret)> {
    let keys = backend.list(KEYS_PREFIX)?;
    for object in &keys {
        let bytes = backend.get(&object.key)?;
        let file: KeyFile = format::parse_plain_json(ObjectKind::Key, &object.key, &bytes)?;
        if let Some(secret) = try_key(&object.key, &file, &config.id, passphrase)? {
            return Ok((
                object.key.trim_start_matches(KEYS_PREFIX).to_string(),
                secret,
            ));
        }
    }
    Err(Error::WrongPassphrase {
        location: backend.location(),
        keys: keys.len(),
    })
}

fn try_key(
    key: &str,
    file: &KeyFile,
    repository_id: &str,
    passphrase: &str,
) -> Result<Option<MasterSecret>> {
    if file.version != 1 {
        return Err(Error::UnsupportedVersion {
            what: format!("key '{key}'"),
            found: file.version,
            supported: 1,
        });
    }
    let salt = hex::decode(&file.salt).map_err(|_| Error::corrupt(key, "salt is not hex"))?;
    let wrapped =
        hex::decode(&file.wrapped).map_err(|_| Error::corrupt(key, "wrapped key is not hex"))?;
    if wrapped.len() != 12 + 32 + 16 {
        return Err(Error::corrupt(key, "wrapped key has the wrong length"));
    }
    // The parameters are the key file's: if Argon2id refuses them, the
    // file is damaged, not vbackup.
    let kek = kdf::derive(passphrase.as_bytes(), &salt, file.kdf).map_err(|e| match e {
        Error::Internal(reason) => Error::corrupt(key, reason),
        other => other,
    })?;
    let (nonce, sealed) = wrapped.split_at(12);
    let nonce: [u8; 12] = nonce.try_into().map_err(|_| Error::corrupt(key, "nonce"))?;
    let aad = key_aad(repository_id);
    let mut buffer = sealed.to_vec();
    let nonce = Nonce::assume_unique_for_key(nonce);
    let Ok(plain) = kek_cipher(&kek)?.open_in_place(nonce, Aad::from(&aad), &mut buffer) else {
        return Ok(None);
    };
    let secret: [u8; 32] = plain
        .try_into()
        .map_err(|_| Error::corrupt(key, "master key length"))?;
    Ok(Some(MasterSecret(secret)))
}
