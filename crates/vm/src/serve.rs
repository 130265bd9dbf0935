//! `vbackup serve`: a snapshot's disks as NBD exports, straight from the
//! repository (local, S3 or the backup server), one export per disk named
//! after it.
//!
//! Each disk is a [`SnapshotDiskReader`] over one [`ChunkCache`] shared by
//! all disks and connections; block status is answered from the index, so
//! holes stay holes. With `writable`, writes go to an [`Overlay`] file per
//! disk and never into the repository; [`commit_overlays`] records them as
//! a new snapshot.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use vbackup_core::format::DiskRecord;
use vbackup_core::overlay::{Overlay, OverlayHeader, OverlayOrigin};
use vbackup_core::reader::{chunk_locations, ChunkCache, ReaderOptions, SnapshotDiskReader};
use vbackup_core::{Classified, Progress, Repository, Snapshot};
use vbackup_qemu::nbd::{Allocation, ExportDisk, NbdServer};

use crate::{Error, Result};

/// Where exports are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket (created 0600; removed at the end).
    Unix(PathBuf),
    /// A TCP address; only loopback unless `allow_remote` was given.
    Tcp(SocketAddr),
}

impl Listen {
    /// Parses `unix:PATH` or `tcp:HOST:PORT`.
    pub fn parse(text: &str) -> Result<Self> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(Error::Invalid("--listen unix: needs a socket path".into()));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        if let Some(address) = text.strip_prefix("tcp:") {
            let address = address.parse().map_err(|e| {
                Error::Invalid(format!(
                    "--listen tcp:{address}: not an address and port ({e}); for example tcp:127.0.0.1:10809"
                ))
            })?;
            return Ok(Listen::Tcp(address));
        }
        Err(Error::Invalid(format!(
            "--listen {text}: give unix:PATH or tcp:HOST:PORT"
        )))
    }

    /// The NBD URI of export `name` here (what `qemu-img` and `-blockdev`
    /// take).
    pub fn uri(&self, name: &str) -> String {
        match self {
            Listen::Unix(path) => format!("nbd+unix:///{name}?socket={}", path.display()),
            Listen::Tcp(address) => format!("nbd://{address}/{name}"),
        }
    }
}

/// What to serve and how.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Disks to export (empty: all).
    pub disks: Vec<String>,
    /// Accept writes, into overlays.
    pub writable: bool,
    /// With `writable`: the overlay file (one disk exported) or the folder
    /// of overlays (`DISK.overlay`, several disks). Required for writes.
    pub overlay: Option<PathBuf>,
    /// Bytes of decoded chunks kept in memory.
    pub cache_bytes: u64,
    /// How the readers read ahead.
    pub reader: ReaderOptions,
}

/// One export of a served snapshot.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExportInfo {
    /// Export name (the disk's name).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether writes are accepted.
    pub writable: bool,
    /// The overlay holding its writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay: Option<PathBuf>,
}

/// A snapshot's disks, ready to be served.
pub struct Exports {
    snapshot: Snapshot,
    server: NbdServer,
    exports: Vec<ExportInfo>,
    overlays: Vec<Arc<Overlay>>,
    cache: Arc<ChunkCache>,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports")
            .field("snapshot", &self.snapshot.id)
            .field("exports", &self.exports)
            .finish()
    }
}

/// Reads of a snapshot disk, served.
struct ReadOnlyDisk(Arc<SnapshotDiskReader>);
/// A snapshot disk whose writes go to an overlay.
struct OverlayDisk(Arc<Overlay>);

/// A core error as the `io::Error` an export answers (EIO with this text
/// to the client), its class kept.
fn as_io(error: vbackup_core::Error) -> io::Error {
    let class = error.class();
    Classified::io(io::ErrorKind::Other, class, error)
}

/// The allocation of `[offset, offset + length)` from the reader's index.
fn allocation_of(reader: &SnapshotDiskReader, offset: u64, length: u64) -> Vec<Allocation> {
    reader
        .regions(offset, length, 1024)
        .into_iter()
        .map(|r| Allocation {
            length: r.length,
            hole: !r.data,
            zero: !r.data,
        })
        .collect()
}

impl ExportDisk for ReadOnlyDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at(offset, buf).map_err(as_io)
    }
    fn allocation(&self, offset: u64, length: u64) -> io::Result<Vec<Allocation>> {
        Ok(allocation_of(&self.0, offset, length))
    }
}

impl ExportDisk for OverlayDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at(offset, buf).map_err(as_io)
    }
    fn allocation(&self, offset: u64, length: u64) -> io::Result<Vec<Allocation>> {
        // Written blocks are data whatever the snapshot had there.
        let end = offset + length;
        let written: Vec<(u64, u64)> = self
            .0
            .written()
            .into_iter()
            .filter(|(s, e)| *s < end && *e > offset)
            .collect();
        let mut out = Vec::new();
        for a in allocation_of(self.0.base(), offset, length) {
            out.push(a);
        }
        if written.is_empty() {
            return Ok(out);
        }
        // Mark regions that overlap a write as data, splitting at the
        // write's edges.
        let mut split = Vec::new();
        let mut pos = offset;
        for a in out {
            let (start, stop) = (pos, pos + a.length);
            pos = stop;
            if !a.hole {
                split.push(a);
                continue;
            }
            let mut at = start;
            for (s, e) in written.iter().filter(|(s, e)| *s < stop && *e > start) {
                let (s, e) = ((*s).max(start), (*e).min(stop));
                if s > at {
                    split.push(Allocation {
                        length: s - at,
                        hole: true,
                        zero: true,
                    });
                }
                split.push(Allocation {
                    length: e - s,
                    hole: false,
                    zero: false,
                });
                at = e;
            }
            if at < stop {
                split.push(Allocation {
                    length: stop - at,
                    hole: true,
                    zero: true,
                });
            }
        }
        Ok(split)
    }
    fn writable(&self) -> bool {
        true
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_at(offset, data).map_err(as_io)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.0.write_zeroes(offset, length).map_err(as_io)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush().map_err(as_io)
    }
}

/// The disks of `snapshot` that `names` selects (all when empty).
fn chosen<'a>(snapshot: &'a Snapshot, names: &[String]) -> Result<Vec<&'a DiskRecord>> {
    if names.is_empty() {
        return Ok(snapshot.manifest.disks.iter().collect());
    }
    names
        .iter()
        .map(|name| {
            snapshot
                .manifest
                .disks
                .iter()
                .find(|d| &d.name == name)
                .ok_or_else(|| {
                    let have: Vec<&str> = snapshot
                        .manifest
                        .disks
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect();
                    Error::Invalid(format!(
                        "snapshot {} has no disk '{name}' (it has: {})",
                        snapshot.short_id(),
                        have.join(", ")
                    ))
                })
        })
        .collect()
}

/// Where disk `name`'s overlay goes: `path` itself for one disk, else
/// `path/NAME.overlay` (the folder is created 0700).
fn overlay_path(path: &Path, name: &str, several: bool) -> Result<PathBuf> {
    if !several {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(path)
            .map_err(|source| Error::Io {
                context: format!(
                    "creating the overlay folder {} (several disks are exported writable)",
                    path.display()
                ),
                source,
            })?;
    }
    Ok(path.join(format!("{name}.overlay")))
}

impl Exports {
    /// Opens the chosen disks of `snapshot` (their indexes are read and
    /// checked now) and, when writable, their overlays.
    pub fn open(
        repo: Arc<Repository>,
        snapshot: &Snapshot,
        options: &ServeOptions,
    ) -> Result<Self> {
        let disks = chosen(snapshot, &options.disks)?;
        let overlay_root =
            match (options.writable, &options.overlay) {
                (true, None) => return Err(Error::Invalid(
                    "--writable needs --overlay FILE: writes go there, never into the repository"
                        .into(),
                )),
                (false, Some(_)) => {
                    return Err(Error::Invalid("--overlay is for --writable exports".into()))
                }
                (_, overlay) => overlay.clone(),
            };
        let map = chunk_locations(&repo)?;
        let cache = ChunkCache::new(options.cache_bytes);
        let mut server = NbdServer::new();
        let mut exports = Vec::new();
        let mut overlays = Vec::new();
        for disk in &disks {
            let reader = Arc::new(SnapshotDiskReader::open(
                Arc::clone(&repo),
                map.clone(),
                disk,
                Arc::clone(&cache),
                options.reader,
            )?);
            let (export, overlay): (Arc<dyn ExportDisk>, _) = match &overlay_root {
                None => (Arc::new(ReadOnlyDisk(reader)), None),
                Some(root) => {
                    let path = overlay_path(root, &disk.name, disks.len() > 1)?;
                    let origin = OverlayOrigin::now(&repo, &snapshot.id, &disk.name);
                    let overlay = Arc::new(Overlay::open_or_create(&path, reader, origin)?);
                    overlays.push(Arc::clone(&overlay));
                    (Arc::new(OverlayDisk(overlay)), Some(path))
                }
            };
            let description = format!("disk '{}' of snapshot {}", disk.name, snapshot.short_id());
            server
                .add_export(&disk.name, &description, export)
                .map_err(Error::qemu(format!("exporting disk '{}'", disk.name)))?;
            exports.push(ExportInfo {
                name: disk.name.clone(),
                size: disk.virtual_size,
                writable: overlay.is_some(),
                overlay,
            });
        }
        Ok(Self {
            snapshot: snapshot.clone(),
            server,
            exports,
            overlays,
            cache,
        })
    }

    /// The exports.
    pub fn exports(&self) -> &[ExportInfo] {
        &self.exports
    }

    /// The snapshot served.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The shared chunk cache (its hits and misses).
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// Serves on `listener` until `stop` is set, then flushes the overlays.
    pub fn serve(&self, listener: Listener, stop: &AtomicBool) -> Result<()> {
        let served = match listener {
            Listener::Unix(listener, _) => self.server.serve_unix(listener, stop),
            Listener::Tcp(listener) => self.server.serve_tcp(listener, stop),
        };
        let flushed = self.flush();
        served.map_err(Error::qemu("serving NBD"))?;
        flushed
    }

    /// Makes every overlay's writes durable.
    pub fn flush(&self) -> Result<()> {
        for overlay in &self.overlays {
            overlay.flush()?;
        }
        Ok(())
    }
}

/// A bound listening socket; a unix socket's file is removed when this is
/// dropped.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket and its path.
    Unix(UnixListener, SocketFile),
    /// A TCP socket.
    Tcp(TcpListener),
}

/// A unix socket's file, removed on drop.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Listener {
    /// Binds `listen`. A unix socket file left by a killed server (nothing
    /// answers on it) is replaced; one in use is refused. The socket is
    /// made 0600: whoever can connect can read the disks. TCP must be
    /// loopback unless `allow_remote`: NBD has no authentication.
    pub fn bind(listen: &Listen, allow_remote: bool) -> Result<Self> {
        match listen {
            Listen::Unix(path) => bind_unix(path),
            Listen::Tcp(address) => {
                if !address.ip().is_loopback() && !allow_remote {
                    return Err(Error::Invalid(format!(
                        "refusing to serve on {address}: NBD has no authentication, so exports listen on loopback or a unix socket (give --allow-remote to serve on {address} anyway, behind a firewall)"
                    )));
                }
                let listener = TcpListener::bind(address).map_err(|source| Error::Io {
                    context: format!("listening on {address}"),
                    source,
                })?;
                Ok(Listener::Tcp(listener))
            }
        }
    }

    /// The address actually bound (for `tcp:127.0.0.1:0`).
    pub fn listen(&self) -> Result<Listen> {
        match self {
            Listener::Unix(_, file) => Ok(Listen::Unix(file.0.clone())),
            Listener::Tcp(listener) => {
                listener
                    .local_addr()
                    .map(Listen::Tcp)
                    .map_err(|source| Error::Io {
                        context: "reading the listening address".into(),
                        source,
                    })
            }
        }
    }
}

fn bind_unix(path: &Path) -> Result<Listener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::Invalid(format!(
                "{} is in use: another server answers there",
                path.display()
            )));
        }
        let is_socket = std::fs::symlink_metadata(path)
            .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            .unwrap_or(false);
        if !is_socket {
            return Err(Error::Invalid(format!(
                "{} exists and is not a socket; give another --listen path",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| Error::Io {
        context: format!("listening on {}", path.display()),
        source,
    })?;
    let file = SocketFile(path.to_path_buf());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        Error::Io {
            context: format!("restricting {} to its owner", path.display()),
            source,
        }
    })?;
    Ok(Listener::Unix(listener, file))
}

/// Records the writes of the overlay files `paths` as a new snapshot of
/// the snapshot they were made over (they must all be of one snapshot of
/// `repo`). Returns it; the overlays are left for the caller to delete.
pub fn commit_overlays(
    repo: Arc<Repository>,
    paths: &[PathBuf],
    threads: usize,
    progress: &Progress,
) -> Result<Snapshot> {
    let mut headers = Vec::new();
    for path in paths {
        headers.push((path, OverlayHeader::read(path)?));
    }
    let Some((_, first)) = headers.first() else {
        return Err(Error::Invalid(
            "--commit-overlay needs at least one overlay file".into(),
        ));
    };
    let snapshot_id = first.origin.snapshot.clone();
    if let Some((path, other)) = headers
        .iter()
        .find(|(_, h)| h.origin.snapshot != snapshot_id)
    {
        return Err(Error::Invalid(format!(
            "overlay {} is of snapshot {}, the others of {snapshot_id}: commit each snapshot's overlays separately",
            path.display(),
            other.origin.snapshot
        )));
    }
    if first.origin.repository != repo.config().id {
        return Err(Error::Invalid(format!(
            "the overlays belong to repository {}, not to {} ({})",
            first.origin.repository,
            repo.config().id,
            repo.location()
        )));
    }
    let snapshot = repo.find_snapshot(&snapshot_id, None)?;
    let map = chunk_locations(&repo)?;
    let cache = ChunkCache::new(vbackup_core::reader::DEFAULT_CACHE_BYTES);
    let mut overlays = Vec::new();
    for (path, header) in &headers {
        let disk = chosen(&snapshot, std::slice::from_ref(&header.origin.disk))?[0];
        let reader = Arc::new(SnapshotDiskReader::open(
            Arc::clone(&repo),
            map.clone(),
            disk,
            Arc::clone(&cache),
            ReaderOptions::default(),
        )?);
        overlays.push(Arc::new(Overlay::open(path, reader)?));
    }
    Ok(vbackup_core::overlay::commit(
        &repo, &snapshot, &overlays, threads, progress,
    )?)
}
