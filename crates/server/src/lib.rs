//! vbackup's backup server: repositories stored in folders
//! (`DIR/repos/NAME`), served over HTTPS to `vbackup` clients that use
//! `--repo https://HOST:PORT/NAME`.
//!
//! Clients encrypt everything; the server stores opaque objects and never
//! sees keys or plaintext. Access is by token (see [`tokens`]), each scoped
//! to a repository with a role, checked per request at the object level
//! (see [`access`]): `read`, `backup` (append-only) or `admin`.
//!
//! The server is async (tokio, hyper through axum, rustls); storage calls
//! run on [`vbackup_storage::LocalBackend`] in blocking threads, so many
//! clients back up to one repository at once: objects are written to a
//! temporary file and renamed into place, so concurrent uploads of the same
//! chunk are safe.
#![deny(missing_docs)]

pub mod access;
mod api;
mod body;
pub mod cert;
mod download;
pub mod overview;
mod records;
mod stall;
pub mod tokens;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// The server's one error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A wrong argument or request from the operator.
    #[error("{0}")]
    Usage(String),
    /// A file or network operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (port 0 picks a free port).
    pub listen: String,
    /// The data folder: `repos/`, `tokens.json`, `tls/`, `lock-owners/`.
    pub data: PathBuf,
    /// Certificate chain (PEM); with `key`, replaces the self-signed one.
    pub cert: Option<PathBuf>,
    /// Private key (PEM).
    pub key: Option<PathBuf>,
    /// How long a client may keep the server waiting: for the TLS
    /// handshake (at most 10 s), for a request's headers, on an idle
    /// connection, between two pieces of a body (a whole body gets this
    /// plus one second per 32 KiB), and reading a reply (a write that makes
    /// no progress for this long closes the connection).
    pub timeout: Duration,
    /// The most connections served at once; more are closed at once.
    pub max_connections: usize,
    /// The most bytes of upload bodies held in memory at once (at least
    /// one largest object, 80 MiB); further uploads wait for room.
    pub max_upload_memory: u64,
}

/// The default [`ServerConfig::max_upload_memory`]: 1 GiB.
pub const DEFAULT_MAX_UPLOAD_MEMORY: u64 = 1 << 30;

/// The default [`ServerConfig::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The default [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// The largest request head (request line and headers) the server reads.
const MAX_HEADER_BYTES: usize = 64 << 10;

/// The longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often refused connections are logged at most.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What the server tells its operator once it listens.
#[derive(Debug, Clone)]
pub struct Started {
    /// The bound address.
    pub address: SocketAddr,
    /// SHA-256 fingerprint of the certificate, for clients to pin.
    pub fingerprint: String,
    /// True when a self-signed certificate was made at this start.
    pub certificate_created: bool,
    /// How many tokens exist.
    pub tokens: usize,
}

/// Runs the server until `stop` is set (the CLI sets it on SIGINT and
/// SIGTERM); calls `ready` once it listens. Open connections get a few
/// seconds to finish their requests.
pub fn run(
    config: &ServerConfig,
    stop: Arc<AtomicBool>,
    ready: impl FnOnce(&Started),
) -> Result<(), Error> {
    let identity =
        cert::load_or_create(&config.data, config.cert.as_deref(), config.key.as_deref())?;
    let tokens = tokens::TokenStore::open(&config.data)?;
    create_private_dir(&config.data.join("repos")).map_err(|e| {
        Error::io(
            format!("creating {}", config.data.join("repos").display()),
            e,
        )
    })?;
    remove_temporary_files(&config.data.join("repos"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Other(format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| Error::Other(format!("the certificate or key is unusable: {e}")))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the server's threads", e))?;
    if config.max_connections == 0 {
        return Err(Error::Usage("--max-connections must be at least 1".into()));
    }
    if config.max_upload_memory < api::MAX_BODY as u64 {
        return Err(Error::Usage(format!(
            "--max-upload-memory must be at least {} bytes (one largest object)",
            api::MAX_BODY
        )));
    }
    let units = usize::try_from(config.max_upload_memory / body::MEMORY_UNIT)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS);
    let shared = Arc::new(api::Shared {
        data: config.data.clone(),
        tokens,
        timeout: config.timeout,
        usage: records::Usage::new(&config.data),
        upload_memory: Arc::new(Semaphore::new(units)),
        overviews: overview::Overviews::default(),
    });
    let token_count = shared.tokens.len();
    runtime.block_on(async move {
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(|e| Error::io(format!("listening on {}", config.listen), e))?;
        let address = listener
            .local_addr()
            .map_err(|e| Error::io("reading the bound address", e))?;
        ready(&Started {
            address,
            fingerprint: identity.fingerprint,
            certificate_created: identity.created,
            tokens: token_count,
        });
        let limits = Limits {
            timeout: config.timeout,
            connections: Arc::new(Semaphore::new(config.max_connections)),
            max_connections: config.max_connections,
        };
        serve(
            listener,
            TlsAcceptor::from(Arc::new(tls)),
            shared,
            limits,
            stop,
        )
        .await;
        Ok(())
    })
}

/// What bounds the connections.
struct Limits {
    timeout: Duration,
    connections: Arc<Semaphore>,
    max_connections: usize,
}

/// Counts connections refused over the cap and logs them now and then.
#[derive(Default)]
struct Refusals {
    count: u64,
    logged: Option<Instant>,
}

impl Refusals {
    fn refused(&mut self, max: usize) {
        self.count += 1;
        if self
            .logged
            .is_some_and(|t| t.elapsed() < REFUSAL_LOG_INTERVAL)
        {
            return;
        }
        eprintln!(
            "vbackup server: {} connection(s) refused: already serving {max} (--max-connections)",
            self.count
        );
        self.count = 0;
        self.logged = Some(Instant::now());
    }
}

/// Accepts connections until `stop` is set, then lets open ones finish.
async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<api::Shared>,
    limits: Limits,
    stop: Arc<AtomicBool>,
) {
    let app = api::router(shared);
    let (shutdown, shutdown_seen) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut refusals = Refusals::default();
    loop {
        while connections.try_join_next().is_some() {}
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else {
                    // Out of file descriptors and the like: wait a little.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                // Over the cap the connection is closed at once: it holds
                // no memory and no task.
                let Ok(permit) = Arc::clone(&limits.connections).try_acquire_owned() else {
                    refusals.refused(limits.max_connections);
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let service = TowerToHyperService::new(app.clone());
                let mut seen = shutdown_seen.clone();
                let timeout = limits.timeout;
                connections.spawn(async move {
                    let _permit = permit;
                    let handshake = timeout.min(HANDSHAKE_TIMEOUT);
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(handshake, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    // The header timeout also closes idle keep-alive
                    // connections: hyper starts it when it waits for the
                    // next request.
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(timeout)
                        .max_header_size(MAX_HEADER_BYTES)
                        .serve_connection(
                            TokioIo::new(stall::WriteDeadline::new(stream, timeout)),
                            service,
                        );
                    tokio::pin!(connection);
                    tokio::select! {
                        _ = connection.as_mut() => {}
                        _ = seen.changed() => {
                            connection.as_mut().graceful_shutdown();
                            let _ = connection.await;
                        }
                    }
                });
            }
            () = stopped(&stop) => break,
        }
    }
    drop(listener);
    let _ = shutdown.send(true);
    let drain = async { while connections.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
}

/// Removes the temporary files that uploads cut by a crash or a kill left
/// in the repositories; at start no upload is in flight, so every one of
/// them is dead. (Clients cannot remove them: they are not objects.)
fn remove_temporary_files(repos: &Path) {
    let Ok(entries) = std::fs::read_dir(repos) else {
        return;
    };
    for entry in entries.flatten() {
        let backend = vbackup_storage::LocalBackend::new(entry.path());
        match backend.remove_temporary_files() {
            Ok(0) => {}
            Ok(n) => eprintln!(
                "vbackup server: removed {n} temporary file(s) of interrupted uploads in {}",
                entry.path().display()
            ),
            Err(e) => eprintln!(
                "vbackup server: cannot clean {}: {e}",
                entry.path().display()
            ),
        }
    }
}

async fn stopped(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The folder of repository `name` in the data folder `data`.
pub fn repo_path(data: &Path, name: &str) -> PathBuf {
    data.join("repos").join(name)
}

/// Creates `dir` and its missing parents with mode 0700: the data folder
/// holds the TLS key, the token hashes and every repository, none of which
/// another local user may read.
pub(crate) fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}
