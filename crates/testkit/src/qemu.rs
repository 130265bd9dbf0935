//! Test harness: a real `qemu-storage-daemon`, or a real QEMU virtual
//! machine, serving qcow2 disks; and the `qemu-img` / `qemu-io` helpers
//! the tests use to write and compare images. Used by vbackup-qemu's and
//! the CLI's integration tests.
//!
//! Why qemu-storage-daemon: it runs QEMU's block layer — dirty bitmaps,
//! block jobs, transactions, NBD exports, QMP — without a guest or a
//! hypervisor, so live backups can be tested on any machine. A "guest"
//! writes through a writable NBD export of each disk.
//!
//! [`StorageDaemon::start_vm`] runs `qemu-system-x86_64` instead (software
//! emulation, a q35 machine whose disks are virtio-blk devices), so the
//! same tests also meet what a real VM's QMP reports: attached devices,
//! their qdev paths, a machine type. Its firmware finds nothing to boot
//! and idles; the "guest" writes through NBD exports that QMP adds after
//! start (the devices share their write permission for that). The binary
//! is `VBACKUP_QEMU_SYSTEM` or `qemu-system-x86_64` on PATH, its firmware
//! folders `VBACKUP_QEMU_FIRMWARE` (colon-separated); see
//! `scripts/qemu-system.sh`.
//!
//! The harness speaks to QEMU only through vbackup-qemu's public API
//! ([`QmpClient`], [`NbdClient`]) and reports failures as its [`Error`],
//! so a test's `?` and `unwrap` work as they would on the real clients.

use std::fs::{self, File};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use vbackup_qemu::{ConnectOptions, Error, NbdClient, QmpClient, Result};

use crate::util::{s, send_sigterm, tool};

/// How long the daemon has to come up or shut down.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `qemu-storage-daemon` with a QMP monitor on a unix socket, a
/// `file` + `qcow2` node per disk, and optionally an NBD server with a
/// writable export per disk (named after the node) for a guest to write
/// through. Stopped (SIGTERM, so images are closed and persistent bitmaps
/// stored) when dropped.
#[derive(Debug)]
pub struct StorageDaemon {
    kind: Kind,
    child: Option<Child>,
    disks: Vec<(String, PathBuf)>,
    guest_nbd: bool,
    dir: tempfile::TempDir,
}

/// Which QEMU program serves the disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `qemu-storage-daemon`.
    Daemon,
    /// `qemu-system-x86_64` running a virtual machine.
    Vm,
}

impl StorageDaemon {
    /// Starts the daemon on `disks` (node name, qcow2 image) and waits
    /// until QMP answers.
    pub fn start(disks: &[(&str, &Path)], guest_nbd: bool) -> Result<Self> {
        Self::start_kind(Kind::Daemon, disks, guest_nbd)
    }

    /// Starts a QEMU virtual machine with `disks` (node name, qcow2 image)
    /// as virtio-blk devices, and waits until QMP answers (and, with
    /// `guest_nbd`, until the guest exports are up).
    pub fn start_vm(disks: &[(&str, &Path)], guest_nbd: bool) -> Result<Self> {
        Self::start_kind(Kind::Vm, disks, guest_nbd)
    }

    /// The QEMU binary a VM runs with: `VBACKUP_QEMU_SYSTEM`, else
    /// `qemu-system-x86_64` from PATH.
    pub fn qemu_system() -> PathBuf {
        std::env::var_os("VBACKUP_QEMU_SYSTEM")
            .map_or_else(|| PathBuf::from("qemu-system-x86_64"), PathBuf::from)
    }

    fn start_kind(kind: Kind, disks: &[(&str, &Path)], guest_nbd: bool) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("vbackup-qsd-")
            .tempdir()
            .map_err(|e| io_error("creating a folder for qemu-storage-daemon", e))?;
        let mut daemon = StorageDaemon {
            kind,
            child: None,
            disks: disks
                .iter()
                .map(|(node, path)| ((*node).to_owned(), path.to_path_buf()))
                .collect(),
            guest_nbd,
            dir,
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    /// The QMP monitor socket (one client at a time).
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// The guests' NBD server socket, if started with one. Also what a
    /// live session must be given as `nbd_socket`, since QEMU runs only
    /// one NBD server.
    pub fn guest_socket(&self) -> Option<PathBuf> {
        self.guest_nbd.then(|| self.dir.path().join("guest.sock"))
    }

    /// A new QMP connection.
    pub fn qmp(&self) -> Result<QmpClient> {
        QmpClient::connect_with_timeout(&self.qmp_socket(), Duration::from_secs(20))
    }

    /// A writable NBD connection to disk `node`, as the guest.
    pub fn guest(&self, node: &str) -> Result<NbdClient> {
        let socket = self
            .guest_socket()
            .ok_or_else(|| Error::InvalidRequest("started without guest NBD exports".into()))?;
        let opts = ConnectOptions {
            export_name: node.to_owned(),
            meta_contexts: Vec::new(),
            ..ConnectOptions::default()
        };
        NbdClient::connect_unix(&socket, &opts)
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the daemon with SIGKILL (no clean close: persistent bitmaps
    /// stay marked in use, i.e. inconsistent) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the daemon cleanly (SIGTERM: images closed, persistent bitmaps
    /// stored, non-persistent ones lost), killing it if it hangs.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = send_sigterm(&child);
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        let wait_error = |e| io_error("waiting for qemu-storage-daemon", e);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().map_err(wait_error)? {
                return self.check_exit(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(self.failed("did not stop within 10 s after SIGTERM"))
    }

    /// Stops the daemon cleanly and starts it again on the same disks.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    fn check_exit(&self, status: ExitStatus) -> Result<()> {
        if status.success() || status.signal() == Some(libc::SIGTERM) {
            Ok(())
        } else {
            Err(self.failed(&format!("exited with {status}")))
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let qmp = self.qmp_socket();
        let _ = fs::remove_file(&qmp);
        let log = self.dir.path().join("qsd.log");
        let stderr = File::create(&log).map_err(|e| io_error("creating the daemon log", e))?;
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|error| Error::Spawn {
                program: self.program().display().to_string(),
                error,
            })?;
        self.child = Some(child);
        self.wait_ready()?;
        if self.kind == Kind::Vm {
            self.add_guest_exports()?;
        }
        Ok(())
    }

    fn program(&self) -> PathBuf {
        match self.kind {
            Kind::Daemon => PathBuf::from("qemu-storage-daemon"),
            Kind::Vm => Self::qemu_system(),
        }
    }

    fn command(&self) -> Command {
        match self.kind {
            Kind::Daemon => self.daemon_command(),
            Kind::Vm => self.vm_command(),
        }
    }

    /// A q35 machine under software emulation, no default devices, no
    /// display, each disk a virtio-blk device sharing its write permission
    /// (so the guest NBD exports can write too), QMP on a unix socket.
    fn vm_command(&self) -> Command {
        let mut cmd = Command::new(self.program());
        if let Some(dirs) = std::env::var_os("VBACKUP_QEMU_FIRMWARE") {
            for dir in std::env::split_paths(&dirs) {
                cmd.arg("-L").arg(dir);
            }
        }
        let qmp = opt_path(&self.qmp_socket());
        cmd.args(["-machine", "q35,accel=tcg", "-m", "64", "-nodefaults"])
            .args(["-display", "none", "-serial", "none"])
            .args([
                "-chardev",
                &format!("socket,path={qmp},server=on,wait=off,id=qmp0"),
            ])
            .args(["-mon", "chardev=qmp0,mode=control"]);
        for (node, path) in &self.disks {
            let file = format!(
                "driver=file,filename={},node-name={node}-file",
                opt_path(path)
            );
            cmd.args(["-blockdev", &file])
                .args([
                    "-blockdev",
                    &format!("driver=qcow2,file={node}-file,node-name={node}"),
                ])
                .args([
                    "-device",
                    &format!("virtio-blk-pci,drive={node},id=dev-{node},share-rw=on"),
                ]);
        }
        cmd
    }

    /// For a VM: starts the NBD server and a writable export per disk
    /// through QMP (qemu-system has no command-line options for them).
    fn add_guest_exports(&self) -> Result<()> {
        let Some(guest) = self.guest_socket() else {
            return Ok(());
        };
        let _ = fs::remove_file(&guest);
        let mut qmp = self.qmp()?;
        qmp.nbd_server_start_unix(&guest)?;
        for (node, _) in &self.disks {
            qmp.execute(
                "block-export-add",
                serde_json::json!({"type": "nbd", "id": format!("guest-{node}"),
                    "node-name": node, "name": node, "writable": true}),
            )?;
        }
        Ok(())
    }

    fn daemon_command(&self) -> Command {
        let mut cmd = Command::new("qemu-storage-daemon");
        let qmp = opt_path(&self.qmp_socket());
        cmd.args([
            "--chardev",
            &format!("socket,path={qmp},server=on,wait=off,id=qmp0"),
        ])
        .args(["--monitor", "chardev=qmp0"]);
        for (node, path) in &self.disks {
            let file = format!(
                "driver=file,filename={},node-name={node}-file",
                opt_path(path)
            );
            cmd.args(["--blockdev", &file]).args([
                "--blockdev",
                &format!("driver=qcow2,file={node}-file,node-name={node}"),
            ]);
        }
        if let Some(guest) = self.guest_socket() {
            let _ = fs::remove_file(&guest);
            cmd.args([
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", opt_path(&guest)),
            ]);
            for (node, _) in &self.disks {
                cmd.args([
                    "--export",
                    &format!("type=nbd,id=guest-{node},node-name={node},name={node},writable=on"),
                ]);
            }
        }
        cmd
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(self.failed(&format!("exited at start ({status})")));
                }
            }
            let guest_ready = match self.guest_socket() {
                Some(socket) if self.kind == Kind::Daemon => listening(&socket),
                _ => true,
            };
            if listening(&self.qmp_socket()) && guest_ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(self.failed("not ready after 10 s"));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn failed(&self, what: &str) -> Error {
        let log = fs::read(self.dir.path().join("qsd.log")).unwrap_or_default();
        Error::InvalidRequest(format!(
            "{} {what}: {}",
            self.program().display(),
            stderr_text(&log)
        ))
    }
}

/// A path inside a qemu option string, where a comma must be doubled.
fn opt_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        if self.stop().is_err() {
            self.kill();
        }
    }
}

/// Whether something accepts connections on the unix socket `path`: the
/// socket file appears when QEMU binds it, a moment before it listens, so
/// its existence alone lets a connection be refused under load.
fn listening(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Wraps an I/O error with what was being done (vbackup-qemu's own
/// constructor is private to it).
fn io_error(context: &str, error: io::Error) -> Error {
    Error::Io {
        context: context.to_owned(),
        error,
    }
}

/// A QEMU program's log as one line of text for an error message.
fn stderr_text(log: &[u8]) -> String {
    let text = String::from_utf8_lossy(log);
    let text = text.trim();
    if text.is_empty() {
        "(nothing on stderr)".to_owned()
    } else {
        text.to_owned()
    }
}

/// Writes `len` bytes of `pattern` at `offset` into the qcow2 `image`
/// (with `qemu-io`), as a guest of a stopped VM's disk would have.
pub fn guest_write(image: &Path, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("write -P {pattern} {offset} {len}");
    tool("qemu-io", &["-f", "qcow2", "-c", &cmd, s(image)]);
}

/// A raw copy of the qcow2 `image`'s content now, to compare restores with.
pub fn copy_now(image: &Path, to: &Path) {
    tool(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", s(image), s(to)],
    );
}

/// Whether two images hold the same content (`qemu-img compare`).
pub fn identical(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", s(a), s(b)])
        .status()
        .unwrap_or_else(|e| panic!("qemu-img compare: {e}"))
        .success()
}
