//! Test harness: a real `qemu-storage-daemon` standing in for a running VM.
//! Used by this crate's and the CLI's integration tests; not a stable API.
//!
//! Why qemu-storage-daemon: it runs QEMU's block layer — dirty bitmaps,
//! block jobs, transactions, NBD exports, QMP — without a guest or a
//! hypervisor, so live backups can be tested on any machine. A "guest"
//! writes through a writable NBD export of each disk.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::nbd::{ConnectOptions, NbdClient};
use crate::process;
use crate::qmp::QmpClient;

/// How long the daemon has to come up or shut down.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `qemu-storage-daemon` with a QMP monitor on a unix socket, a
/// `file` + `qcow2` node per disk, and optionally an NBD server with a
/// writable export per disk (named after the node) for a guest to write
/// through. Stopped (SIGTERM, so images are closed and persistent bitmaps
/// stored) when dropped.
#[derive(Debug)]
pub struct StorageDaemon {
    child: Option<Child>,
    disks: Vec<(String, PathBuf)>,
    guest_nbd: bool,
    dir: tempfile::TempDir,
}

impl StorageDaemon {
    /// Starts the daemon on `disks` (node name, qcow2 image) and waits
    /// until QMP answers.
    pub fn start(disks: &[(&str, &Path)], guest_nbd: bool) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("vbackup-qsd-")
            .tempdir()
            .map_err(|e| Error::io("creating a folder for qemu-storage-daemon", e))?;
        let mut daemon = StorageDaemon {
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
        let _ = process::send_sigterm(child.id());
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        let wait_error = |e| Error::io("waiting for qemu-storage-daemon", e);
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

    fn check_exit(&self, status: std::process::ExitStatus) -> Result<()> {
        if status.success() || process::terminated_by(status, libc::SIGTERM) {
            Ok(())
        } else {
            Err(self.failed(&format!("exited with {status}")))
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let qmp = self.qmp_socket();
        let _ = fs::remove_file(&qmp);
        let log = self.dir.path().join("qsd.log");
        let stderr = File::create(&log).map_err(|e| Error::io("creating the daemon log", e))?;
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|error| Error::Spawn {
                program: "qemu-storage-daemon".into(),
                error,
            })?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn command(&self) -> Command {
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
                Some(socket) => socket.exists(),
                None => true,
            };
            if self.qmp_socket().exists() && guest_ready {
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
            "qemu-storage-daemon {what}: {}",
            process::stderr_text(&log)
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
