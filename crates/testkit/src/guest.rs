//! A real, small Linux guest for the tests that boot a VM: Debian's cloud
//! kernel, an initramfs with busybox and the virtio/ext4 modules, and an
//! ext4 root disk with busybox and the host's `qemu-ga`. Built (and
//! cached under `target/guest`) by `scripts/guest.sh`; see
//! `docs/test-guest.md`.
//!
//! Booted, the guest starts its agent on the virtio-serial port
//! `org.qemu.guest_agent.0`, prints `vbackup-guest: ready` on the serial
//! console and waits; `guest-shutdown` powers it off and, with
//! `-no-reboot`, QEMU exits. A root disk that cannot be mounted prints
//! `vbackup-guest: cannot mount root /dev/vda` and powers off too, so a
//! broken backup fails fast instead of hanging.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crate::util::stop_gently;

/// The line the guest prints on its console once its agent is started.
pub const READY: &str = "vbackup-guest: ready";
/// The line the guest prints when its root disk cannot be mounted.
pub const ROOT_FAILED: &str = "vbackup-guest: cannot mount root /dev/vda";

/// The built guest: kernel, initramfs, the pristine root disk (raw ext4;
/// boot a copy or a qcow2 overlay of it, never the file itself) and the
/// kernel command line.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// The initramfs (`initrd.img`, cpio.gz).
    pub initrd: PathBuf,
    /// The root disk (`disk.raw`: ext4, no partition table).
    pub disk: PathBuf,
    /// The kernel command line (`console=ttyS0 root=/dev/vda ...`).
    pub append: String,
}

/// The workspace root (two levels above this crate).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The guest, built by `scripts/guest.sh` on first use in this process
/// (the script itself is cached and locked across processes).
pub fn image() -> GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(build).clone()
}

fn build() -> GuestImage {
    let root = workspace_root();
    let dir = root.join("target/guest");
    let status = Command::new(root.join("scripts/guest.sh"))
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run scripts/guest.sh: {e}"));
    assert!(
        status.success(),
        "scripts/guest.sh could not build the test guest in {} ({status}); see its output above",
        dir.display()
    );
    let env_file = dir.join("guest.env");
    let env = fs::read_to_string(&env_file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", env_file.display()));
    let value = |key: &str| {
        env.lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .map(|v| v.trim_matches('\'').to_owned())
            .unwrap_or_else(|| panic!("{} has no {key}=", env_file.display()))
    };
    GuestImage {
        kernel: dir.join(value("KERNEL")),
        initrd: dir.join(value("INITRD")),
        disk: dir.join(value("DISK")),
        append: value("APPEND"),
    }
}

/// Whether to ask for KVM: only when `VBACKUP_GUEST_KVM=1` and
/// `/dev/kvm` opens read-write. Opening it is no proof that it works: on
/// sandboxed machines (this project's CI among them) the device opens but
/// KVM either aborts QEMU (`failed to set MSR`) or runs the guest without
/// it ever printing, so TCG is the default.
fn kvm_usable() -> bool {
    std::env::var_os("VBACKUP_GUEST_KVM").is_some_and(|v| v == "1")
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

/// A path inside a qemu option string, where a comma must be doubled.
fn opt_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// The `qemu-system-x86_64` arguments that boot `image` from `disk` (in
/// `format`, e.g. `qcow2`) as a virtio-blk device: a q35 machine (KVM if
/// usable and asked for, see `kvm_usable`; else TCG) with 256 MiB, no default devices, no display, no
/// reboot (a power-off or a kernel panic ends QEMU), the serial console
/// into `console_log`, QMP on the unix socket `qmp`, the guest agent's
/// virtio-serial port on the unix socket `qga`, no network. The firmware
/// folders come from `VBACKUP_QEMU_FIRMWARE` (`-L`); `QEMU_MODULE_DIR`
/// is read by QEMU from the environment.
pub fn qemu_args(
    image: &GuestImage,
    disk: &Path,
    format: &str,
    qmp: &Path,
    qga: &Path,
    console_log: &Path,
) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    if let Some(dirs) = std::env::var_os("VBACKUP_QEMU_FIRMWARE") {
        for dir in std::env::split_paths(&dirs) {
            args.extend(["-L".to_owned(), dir.display().to_string()]);
        }
    }
    let accel = if kvm_usable() { "kvm:tcg" } else { "tcg" };
    let mut push = |list: &[&str]| args.extend(list.iter().map(|s| (*s).to_owned()));
    push(&["-machine", &format!("q35,accel={accel}"), "-m", "256"]);
    push(&["-nodefaults", "-display", "none", "-no-reboot"]);
    push(&["-kernel", &image.kernel.display().to_string()]);
    push(&["-initrd", &image.initrd.display().to_string()]);
    push(&["-append", &image.append]);
    push(&[
        "-drive",
        &format!("file={},format={format},if=virtio", opt_path(disk)),
    ]);
    push(&["-serial", &format!("file:{}", opt_path(console_log))]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", opt_path(qmp)),
    ]);
    push(&[
        "-chardev",
        &format!("socket,path={},server=on,wait=off,id=qga0", opt_path(qga)),
    ]);
    push(&["-device", "virtio-serial-pci"]);
    push(&[
        "-device",
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ]);
    push(&["-nic", "none"]);
    args
}

/// The test guest running in `qemu-system-x86_64` (`VBACKUP_QEMU_SYSTEM`
/// or from PATH), its sockets and console log in a temporary folder.
/// Stopped (SIGTERM, then SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct RunningGuest {
    child: Option<Child>,
    status: Option<ExitStatus>,
    qmp: PathBuf,
    qga: PathBuf,
    console_log: PathBuf,
    stderr_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl RunningGuest {
    /// Boots `image` from `disk` (in `format`); returns once QEMU runs,
    /// not when the guest is up (see [`RunningGuest::wait_console`]).
    pub fn boot(image: &GuestImage, disk: &Path, format: &str) -> RunningGuest {
        let dir = tempfile::Builder::new()
            .prefix("vbackup-guest-")
            .tempdir()
            .expect("creating a folder for the guest's sockets");
        let qmp = dir.path().join("qmp.sock");
        let qga = dir.path().join("qga.sock");
        let console_log = dir.path().join("console.log");
        let stderr_log = dir.path().join("qemu.log");
        let stderr = File::create(&stderr_log).expect("creating the QEMU log");
        let program = crate::qemu::StorageDaemon::qemu_system();
        let child = Command::new(&program)
            .args(qemu_args(image, disk, format, &qmp, &qga, &console_log))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        RunningGuest {
            child: Some(child),
            status: None,
            qmp,
            qga,
            console_log,
            stderr_log,
            _dir: dir,
        }
    }

    /// Everything the guest printed on its serial console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.console_log).unwrap_or_default()).into_owned()
    }

    /// What QEMU printed on stderr so far.
    pub fn qemu_log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stderr_log).unwrap_or_default()).into_owned()
    }

    /// Waits until the console shows `text`; false after `timeout`, or as
    /// soon as QEMU has exited without showing it.
    pub fn wait_console(&self, text: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(text) {
                return true;
            }
            if self.exited() || Instant::now() >= deadline {
                return self.console().contains(text);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` for QEMU to exit; its status, or `None` if it
    /// still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// QEMU's process id, while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The guest agent's unix socket (host end of the virtio-serial port).
    pub fn qga_socket(&self) -> &Path {
        &self.qga
    }

    /// The QMP monitor's unix socket.
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp
    }

    fn exited(&self) -> bool {
        // Checked through `&self`, without reaping: an exited child stays
        // a zombie (state Z) until `wait_exit` or the drop reaps it.
        let Some(pid) = self.pid() else {
            return true;
        };
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => true,
        }
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.status = Some(status);
                self.child = None;
            }
        }
        self.status
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_gently(&mut child);
        }
    }
}
