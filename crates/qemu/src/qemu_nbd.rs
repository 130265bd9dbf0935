//! A `qemu-nbd` process serving one image on a private unix socket.
//!
//! Why a process: qemu's block layer reads every format qemu knows (qcow2,
//! vmdk, vhdx, vdi, ...) including backing chains and compression; serving
//! the image over NBD lets our native client read it without linking qemu.
//! The socket lives in a fresh temporary directory that only we can reach,
//! and the process dies with the [`QemuNbd`] value.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::img;
use crate::nbd::{self, ConnectOptions, NbdClient};
use crate::process;

/// How long [`QemuNbd`] waits for qemu-nbd to exit after SIGTERM before
/// killing it.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How to start `qemu-nbd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuNbdOptions {
    /// The image to serve.
    pub path: PathBuf,
    /// Its format; `None` asks `qemu-img info` first, so qemu-nbd is always
    /// given `--format` and never guesses `raw` on its own.
    pub format: Option<String>,
    /// Serve read-only (`--read-only`).
    pub read_only: bool,
    /// How many clients may be connected at once (`--shared`).
    pub shared: u32,
    /// Bypass the host page cache (`--cache=none`) when the file system
    /// supports `O_DIRECT`; otherwise qemu's default (writeback) is used.
    pub direct_io: bool,
    /// `--aio` mode (`threads`, `native`, `io_uring`), or qemu's default.
    pub aio: Option<String>,
    /// For a new image whose writer makes it durable itself once qemu-nbd
    /// has exited (an fsync of the closed file): `--cache=unsafe`, so
    /// qemu does not fsync the image each time it allocates qcow2
    /// metadata (an L2 table, a refcount block: 200 fsyncs, 0.7 s, for
    /// 64 MiB in 64 places of a 1 TiB image). Never for an image
    /// anything else uses.
    pub unsafe_cache: bool,
    /// For writable images: pass discards through and turn written zeroes
    /// into holes (`--discard=unmap --detect-zeroes=unmap`).
    pub unmap_zeroes: bool,
    /// How long to wait for the socket to accept connections.
    pub start_timeout: Duration,
    /// A persistent dirty bitmap of the image to expose as the NBD
    /// metadata context `qemu:dirty-bitmap:NAME` (`--bitmap`); readers
    /// then answer `changed()` from it. qemu-nbd refuses a bitmap that
    /// is missing or inconsistent, with its own message.
    pub bitmap: Option<String>,
}

impl QemuNbdOptions {
    /// Read-only, one connection, default caching.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        QemuNbdOptions {
            path: path.into(),
            format: None,
            read_only: true,
            shared: 1,
            direct_io: false,
            aio: None,
            unsafe_cache: false,
            unmap_zeroes: false,
            start_timeout: Duration::from_secs(10),
            bitmap: None,
        }
    }
}

/// A running `qemu-nbd`; dropping it stops the process and removes the
/// socket directory.
#[derive(Debug)]
pub struct QemuNbd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    path: PathBuf,
    format: String,
    bitmap: Option<String>,
    /// Served read-only (a backup's) or writable (a restore's).
    read_only: bool,
    stopped: bool,
    /// A connection held open for the server's whole life. qemu-nbd runs
    /// without `--persistent`, so it exits by itself once every negotiated
    /// connection is closed: if vbackup is killed (even with SIGKILL), the
    /// kernel closes our sockets and qemu-nbd does not outlive us.
    keeper: Option<NbdClient>,
    // Declared last: removed after the process is gone.
    _dir: tempfile::TempDir,
}

impl QemuNbd {
    /// Starts qemu-nbd and waits until it accepts NBD connections. If it
    /// exits first, the error carries its stderr (qemu's reason).
    pub fn start(opts: &QemuNbdOptions) -> Result<Self> {
        Self::spawn(opts).map_err(|e| match e {
            Error::QemuNbd { .. } | Error::Image { .. } | Error::InUse { .. } => e,
            other => other.for_image(&opts.path),
        })
    }

    fn spawn(opts: &QemuNbdOptions) -> Result<Self> {
        let format = match &opts.format {
            Some(f) => f.clone(),
            None => img::image_info(&opts.path)?.format,
        };
        img::check_format(&format)?;
        let dir = tempfile::Builder::new()
            .prefix("vbackup-nbd-")
            .tempdir()
            .map_err(|e| Error::io("creating a directory for the qemu-nbd socket", e))?;
        let socket = dir.path().join("nbd.sock");
        process::check_socket_path(&socket)?;
        let log = dir.path().join("qemu-nbd.log");
        let mut cmd = command(opts, &format, &socket)?;
        let child = spawn_logged(&mut cmd, &log)?;
        let server = QemuNbd {
            child,
            socket,
            log,
            path: opts.path.clone(),
            format,
            bitmap: opts.bitmap.clone(),
            read_only: opts.read_only,
            stopped: false,
            keeper: None,
            _dir: dir,
        };
        server.wait_ready(opts.start_timeout)
    }

    /// The unix socket qemu-nbd listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The process id of qemu-nbd.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The image format being served.
    pub fn format(&self) -> &str {
        &self.format
    }

    /// The image being served.
    pub fn image_path(&self) -> &Path {
        &self.path
    }

    /// The dirty bitmap exposed over NBD, if any.
    pub fn bitmap(&self) -> Option<&str> {
        self.bitmap.as_deref()
    }

    /// Opens a connection with `base:allocation` selected.
    pub fn connect(&self) -> Result<NbdClient> {
        self.connect_with(&ConnectOptions::default())
    }

    /// Opens a connection with the given options.
    pub fn connect_with(&self, opts: &ConnectOptions) -> Result<NbdClient> {
        NbdClient::connect_unix(&self.socket, opts)
    }

    /// Stops qemu-nbd (SIGTERM, so it closes the image cleanly) and reports
    /// an unclean exit with qemu-nbd's stderr.
    pub fn stop(mut self) -> Result<()> {
        let status = self.terminate()?;
        if status.success() || terminated_by_sigterm(status) {
            Ok(())
        } else {
            Err(self.failed(&format!("exited with {status}")))
        }
    }

    fn wait_ready(mut self, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let mut last_error = None;
        let mut delay = process::PollDelay::new();
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(|e| Error::io("waiting for qemu-nbd", e))?
            {
                self.stopped = true;
                return Err(self.failed(&format!("qemu-nbd exited ({status})")));
            }
            if self.socket.exists() {
                // The probe aborts before negotiating, which does not count
                // as a client having left; the keeper then negotiates.
                match nbd::probe_unix(&self.socket, timeout).and_then(|()| self.connect()) {
                    Ok(keeper) => {
                        self.keeper = Some(keeper);
                        return Ok(self);
                    }
                    Err(e) => last_error = Some(e),
                }
            }
            if Instant::now() >= deadline {
                let why = last_error.map_or_else(|| "no socket".to_owned(), |e| e.to_string());
                return Err(self.failed(&format!("not ready after {timeout:?} ({why})")));
            }
            delay.sleep();
        }
    }

    /// An error naming the image, with what qemu-nbd printed.
    fn failed(&self, what: &str) -> Error {
        let stderr = fs::read(&self.log).unwrap_or_default();
        let error = Error::QemuNbd {
            path: self.path.clone(),
            reason: format!("{what}: {}", process::stderr_text(&stderr)),
        };
        error.in_use_if_locked(&self.path, self.read_only)
    }

    /// SIGTERM, wait up to [`STOP_TIMEOUT`], then SIGKILL.
    fn terminate(&mut self) -> Result<ExitStatus> {
        self.stopped = true;
        drop(self.keeper.take());
        let wait_error = |e| Error::io("waiting for qemu-nbd to exit", e);
        if let Some(status) = self.child.try_wait().map_err(wait_error)? {
            return Ok(status);
        }
        // If SIGTERM cannot be sent, fall through to SIGKILL.
        let _ = process::send_sigterm(self.child.id());
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut delay = process::PollDelay::new();
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().map_err(wait_error)? {
                return Ok(status);
            }
            delay.sleep();
        }
        let _ = self.child.kill();
        self.child.wait().map_err(wait_error)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.terminate();
        }
    }
}

/// The qemu-nbd command line for `opts`.
fn command(opts: &QemuNbdOptions, format: &str, socket: &Path) -> Result<Command> {
    let mut cmd = Command::new("qemu-nbd");
    // One connection more than asked for: the keeper's (see `QemuNbd`).
    cmd.arg(format!("--socket={}", socket.display()))
        .arg(format!("--format={format}"))
        .arg(format!("--shared={}", opts.shared.max(1).saturating_add(1)));
    if opts.read_only {
        cmd.arg("--read-only");
    } else if opts.unmap_zeroes {
        cmd.args(["--discard=unmap", "--detect-zeroes=unmap"]);
    }
    if opts.unsafe_cache && !opts.read_only {
        cmd.arg("--cache=unsafe");
    } else if opts.direct_io && supports_direct_io(&opts.path, opts.read_only) {
        cmd.arg("--cache=none");
    }
    if let Some(bitmap) = &opts.bitmap {
        img::check_bitmap_name(bitmap)?;
        cmd.arg(format!("--bitmap={bitmap}"));
    }
    if let Some(aio) = &opts.aio {
        img::check_format(aio)?;
        cmd.arg(format!("--aio={aio}"));
    }
    cmd.arg(img::qemu_path(&opts.path)?);
    Ok(cmd)
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let stderr = File::create(log).map_err(|e| Error::io("creating the qemu-nbd log", e))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|error| Error::Spawn {
            program: "qemu-nbd".into(),
            error,
        })
}

/// Whether the file system under `path` accepts `O_DIRECT` (tmpfs, for
/// one, does not, and qemu-nbd would fail with `--cache=none`).
fn supports_direct_io(path: &Path, read_only: bool) -> bool {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .is_ok()
}

fn terminated_by_sigterm(status: ExitStatus) -> bool {
    process::terminated_by(status, libc::SIGTERM)
}
