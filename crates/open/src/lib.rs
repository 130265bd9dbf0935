//! Opening a vbackup repository wherever it lives.
//!
//! Every front end — the CLI, the backup server's own tools, the daemon,
//! tests, programs using vbackup as a library — names a repository by one
//! location string and calls [`open`] (or [`init`], [`backend`]). This
//! crate owns what used to be decided in the CLI:
//!
//! - **Scheme dispatch** ([`Location`]): a folder, `s3:http(s)://HOST/BUCKET/PREFIX`
//!   (several endpoints of one cluster separated by commas), or
//!   `https://HOST:PORT/NAME` on a `vbackup server`. Other schemes are
//!   refused by name.
//! - **Retries** of transient failures (inside the S3 and server backends).
//! - **The metadata cache** of remote repositories ([`Purpose::Use`]), and
//!   none for the commands that judge what the storage holds
//!   ([`Purpose::Judge`]: check, verify, repair).
//! - **The client state** (`known-repositories.json` and the per-repository
//!   records, `state/` in the cache folder) that keeps storage from
//!   switching encryption off or rolling back unnoticed.
//! - **The worker budget** ([`io_threads`]): enough requests in flight for
//!   the backend, but memory bounded whatever the chunk and pack sizes.
//!
//! [`RepositoryOptions`] is the one options struct for all of this: the CLI
//! fills it from flags and the environment, a config file deserializes it
//! (kebab-case TOML or JSON), tests build it literally.
#![deny(missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vbackup_core::{Error, InitOptions, OpenOptions, Repository, Result};
use vbackup_storage::{Backend, CachedBackend, LocalBackend};

/// Memory the extra workers for a remote backend may take: with 4 MiB
/// chunks, 12 workers; with 16 MiB packs as well, 4.
pub const IO_MEMORY_BUDGET: u64 = 192 << 20;

/// Copies of a chunk a backup or restore worker holds at once (read,
/// compressed, sealed, and the request body).
const WORKER_CHUNK_COPIES: u64 = 4;

/// Where a repository lives, parsed from its location string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A folder on this host.
    Folder(PathBuf),
    /// A prefix of a bucket on S3-compatible storage (the location string
    /// as given, `s3:…`).
    S3(String),
    /// A repository on a `vbackup server` (`https://HOST:PORT/NAME`).
    Server(String),
}

impl Location {
    /// Parses a location: `s3:` and `https://` name remote storage, any
    /// other `scheme:` or `scheme://` is refused (a typo must not become
    /// a folder named after it), everything else is a folder.
    pub fn parse(text: &str) -> Result<Self> {
        if text.is_empty() {
            return Err(Error::InvalidInput(
                "the repository location is empty".to_string(),
            ));
        }
        if vbackup_s3::is_s3(text) {
            vbackup_s3::S3Location::parse(text).map_err(|e| Error::InvalidInput(e.to_string()))?;
            return Ok(Location::S3(text.to_string()));
        }
        if text.starts_with("https://") {
            return Ok(Location::Server(text.to_string()));
        }
        if let Some((scheme, _)) = text
            .split_once("://")
            .or_else(|| text.split_once(':').filter(|(s, _)| s.len() > 1))
        {
            return Err(Error::InvalidInput(format!(
                "repository '{text}': the '{scheme}' scheme is not supported by this build; give a folder, s3:… or https://…"
            )));
        }
        Ok(Location::Folder(PathBuf::from(text)))
    }

    /// Whether the repository is on another machine (S3, a server): such
    /// repositories get the metadata cache and more workers.
    pub fn is_remote(&self) -> bool {
        !matches!(self, Location::Folder(_))
    }
}

/// What a backend is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Ordinary work (backup, restore, listing, prune): remote repositories
    /// go through the local metadata cache unless it is turned off.
    Use,
    /// Judging what the storage holds (check, verify, repair): never
    /// through the cache, whose good copies would hide damage.
    Judge,
}

/// How to reach and open a repository: one struct for the library, the
/// CLI's flags and environment, and configuration files.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RepositoryOptions {
    /// The location: a folder, `s3:…` or `https://HOST:PORT/NAME`.
    pub repository: String,
    /// For a server: the access token (a secret; never printed by `Debug`).
    #[serde(default)]
    pub token: Option<String>,
    /// For a server with a self-signed certificate: its SHA-256
    /// fingerprint (hex), pinned.
    #[serde(default)]
    pub server_fingerprint: Option<String>,
    /// Do not keep the local metadata cache of remote repositories.
    #[serde(default)]
    pub no_cache: bool,
    /// The client's cache and state folder; `None` chooses
    /// `VBACKUP_CACHE_DIR`, else `$XDG_CACHE_HOME/vbackup`, else
    /// `~/.cache/vbackup`.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Accept a repository without encryption (see `vbackup_core::trust`).
    #[serde(default)]
    pub allow_unencrypted: bool,
    /// Worker threads; `None` picks them from the cores and the backend.
    #[serde(default)]
    pub threads: Option<usize>,
}

impl std::fmt::Debug for RepositoryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepositoryOptions")
            .field("repository", &self.repository)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("server_fingerprint", &self.server_fingerprint)
            .field("no_cache", &self.no_cache)
            .field("cache_dir", &self.cache_dir)
            .field("allow_unencrypted", &self.allow_unencrypted)
            .field("threads", &self.threads)
            .finish()
    }
}

impl RepositoryOptions {
    /// Options for `repository` with every default.
    pub fn new(repository: impl Into<String>) -> Self {
        Self {
            repository: repository.into(),
            ..Self::default()
        }
    }

    /// The parsed location.
    pub fn location(&self) -> Result<Location> {
        Location::parse(&self.repository)
    }

    /// The client's cache folder (remote repositories' metadata copies).
    pub fn cache_root(&self) -> Option<PathBuf> {
        self.cache_dir.clone().or_else(default_cache_root)
    }

    /// The client's state folder: records that storage cannot roll back.
    pub fn state_dir(&self) -> Option<PathBuf> {
        self.cache_root().map(|root| root.join("state"))
    }

    /// Worker threads for work bound by the CPU: `threads`, else the cores
    /// plus two.
    pub fn threads(&self) -> usize {
        self.threads
            .unwrap_or_else(vbackup_core::default_threads)
            .max(1)
    }
}

/// `VBACKUP_CACHE_DIR`, else `$XDG_CACHE_HOME/vbackup`, else
/// `~/.cache/vbackup` (empty variables count as unset).
pub fn default_cache_root() -> Option<PathBuf> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty("VBACKUP_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("vbackup"));
    }
    non_empty("HOME").map(|home| PathBuf::from(home).join(".cache/vbackup"))
}

/// The storage backend of the repository, for `purpose`.
pub fn backend(options: &RepositoryOptions, purpose: Purpose) -> Result<Arc<dyn Backend>> {
    let location = options.location()?;
    let raw = raw_backend(options, &location)?;
    let cached = location.is_remote() && purpose == Purpose::Use && !options.no_cache;
    match options.cache_root().filter(|_| cached) {
        Some(root) => Ok(Arc::new(CachedBackend::new(raw, &root))),
        None => Ok(raw),
    }
}

/// The backend of `location`, with retries, without the cache.
fn raw_backend(options: &RepositoryOptions, location: &Location) -> Result<Arc<dyn Backend>> {
    match location {
        Location::Folder(path) => Ok(Arc::new(LocalBackend::new(path.clone()))),
        Location::S3(text) => Ok(Arc::new(vbackup_s3::open(text)?)),
        Location::Server(url) => {
            let token = options.token.clone().ok_or_else(|| {
                Error::InvalidInput(format!(
                    "the repository {url} is on a vbackup server, which needs an access token"
                ))
            })?;
            let config = vbackup_remote::RemoteConfig {
                url: url.clone(),
                token,
                fingerprint: options.server_fingerprint.clone(),
            };
            let backend =
                vbackup_remote::open(&config).map_err(|e| Error::InvalidInput(e.to_string()))?;
            Ok(Arc::new(backend))
        }
    }
}

/// The core's open options for `options`: the explicit choice about
/// unencrypted repositories, whether a passphrase was supplied, and the
/// client state folder.
pub fn core_open_options(options: &RepositoryOptions, passphrase_given: bool) -> OpenOptions {
    OpenOptions {
        allow_unencrypted: options.allow_unencrypted,
        passphrase_given,
        state_dir: options.state_dir(),
    }
}

/// Opens the repository for `purpose`. `passphrase` is asked for only
/// when the repository is encrypted; `passphrase_given` says whether one
/// was supplied without asking (then an unencrypted config is refused).
pub fn open(
    options: &RepositoryOptions,
    purpose: Purpose,
    passphrase_given: bool,
    passphrase: impl FnOnce() -> Result<Option<String>>,
) -> Result<Repository> {
    let backend = backend(options, purpose)?;
    Repository::open_with(
        backend,
        &core_open_options(options, passphrase_given),
        passphrase,
    )
}

/// Creates a repository at the location; it is recorded in the client
/// state (encrypted, or by explicit choice not).
pub fn init(
    options: &RepositoryOptions,
    passphrase: Option<&str>,
    init: &InitOptions,
) -> Result<Repository> {
    let backend = backend(options, Purpose::Use)?;
    let init = InitOptions {
        state_dir: init.state_dir.clone().or_else(|| options.state_dir()),
        ..init.clone()
    };
    Repository::init(backend, passphrase, &init)
}

/// Worker threads for work that mostly waits on `repo`'s backend (backup,
/// restore, verify): `threads` when given, else enough to keep the
/// backend's preferred number of requests in flight — but beyond the
/// machine's cores only as many as fit in [`IO_MEMORY_BUDGET`], since each
/// holds a few copies of a chunk and, with packs, the pack it uploads or
/// the range it reads twice (the S3 client copies what it sends and
/// receives).
pub fn io_threads(repo: &Repository, threads: Option<usize>) -> usize {
    if let Some(threads) = threads {
        return threads.max(1);
    }
    let per_worker = WORKER_CHUNK_COPIES * u64::from(repo.config().chunk_size)
        + 2 * u64::from(repo.config().pack_size);
    let affordable = usize::try_from(IO_MEMORY_BUDGET / per_worker.max(1)).unwrap_or(1);
    let wanted = repo.backend().concurrency().min(affordable);
    vbackup_core::default_threads().max(1).max(wanted)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn locations_dispatch_by_scheme_and_typos_are_refused() {
        assert_eq!(
            Location::parse("/srv/vbackup").unwrap(),
            Location::Folder("/srv/vbackup".into())
        );
        assert_eq!(
            Location::parse("relative/dir").unwrap(),
            Location::Folder("relative/dir".into())
        );
        assert!(matches!(
            Location::parse("s3:http://127.0.0.1:3900/bucket/prefix").unwrap(),
            Location::S3(_)
        ));
        assert!(matches!(
            Location::parse("https://backup:8007/web").unwrap(),
            Location::Server(_)
        ));
        for bad in ["sftp://host/x", "rest:http://x", "s3:nope", ""] {
            let error = Location::parse(bad).unwrap_err();
            assert_eq!(
                error.class(),
                vbackup_core::ErrorClass::Usage,
                "{bad}: {error}"
            );
        }
        assert!(!Location::Folder("/x".into()).is_remote());
        assert!(Location::Server("https://h/x".into()).is_remote());
    }

    #[test]
    fn options_read_from_a_config_file_and_never_print_the_token() {
        let options: RepositoryOptions = serde_json::from_str(
            r#"{"repository": "https://backup:8007/web", "token": "vb1.abc.s3cr3tvalue", "threads": 4}"#,
        )
        .unwrap();
        assert_eq!(options.threads(), 4);
        assert!(!format!("{options:?}").contains("s3cr3tvalue"));
        assert!(
            serde_json::from_str::<RepositoryOptions>(r#"{"repository": "x", "typo": 1}"#).is_err()
        );
    }

    #[test]
    fn a_server_without_a_token_is_refused_before_any_request() {
        let options = RepositoryOptions::new("https://127.0.0.1:9/web");
        let error = backend(&options, Purpose::Use).err().unwrap();
        assert!(error.to_string().contains("access token"), "{error}");
    }

    #[test]
    fn a_folder_is_opened_through_the_library_with_its_client_state() {
        let dir = tempfile::tempdir().unwrap();
        let options = RepositoryOptions {
            cache_dir: Some(dir.path().join("cache")),
            ..RepositoryOptions::new(dir.path().join("repo").to_str().unwrap())
        };
        let init_options = InitOptions {
            kdf: vbackup_core::crypto::kdf::KdfParams {
                memory_kib: 1024,
                iterations: 1,
                parallelism: 1,
            },
            ..InitOptions::default()
        };
        init(&options, Some("pw"), &init_options).unwrap();
        assert!(dir
            .path()
            .join("cache/state/known-repositories.json")
            .exists());
        let repo = open(&options, Purpose::Judge, true, || Ok(Some("pw".into()))).unwrap();
        assert!(io_threads(&repo, None) >= 1);
        assert_eq!(io_threads(&repo, Some(3)), 3);
    }
}
