//! Host data safety, end to end against the `vbackup` binary: what a
//! forged manifest, a local user or a disk in use could do on the backup
//! host (issue 10). Real qemu tools (`qemu-io`, `qemu-img`), real loop
//! devices and real mounts; each test works in its own temporary folder.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::ops::Deref;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vbackup_core::Repository;
use vbackup_storage::LocalBackend;
use vbackup_testkit::cli::CliEnv;
use vbackup_testkit::util::{noise, s, text, tool, walk};

const PASSWORD: &str = "correct horse battery staple";

/// A test's folder, repository and the way to run vbackup in it: under
/// `umask 000`, so nothing but vbackup's own modes can keep its files
/// private.
struct Env(CliEnv);

impl Deref for Env {
    type Target = CliEnv;
    fn deref(&self) -> &CliEnv {
        &self.0
    }
}

impl Env {
    fn new() -> Self {
        Self(
            CliEnv::new(env!("CARGO_BIN_EXE_vbackup"))
                .with_password(PASSWORD)
                .with_umask("000"),
        )
    }

    /// Backs up `image` as VM `vm` and returns the snapshot id.
    fn backup(&self, vm: &str, args: &[&str]) -> String {
        let mut all = vec!["--json", "backup", "--vm", vm];
        all.extend_from_slice(args);
        let json: serde_json::Value = serde_json::from_str(&self.ok(&all)).unwrap();
        json["snapshot"].as_str().unwrap().to_string()
    }

    fn snapshot_count(&self) -> usize {
        let json: serde_json::Value =
            serde_json::from_str(&self.ok(&["--json", "snapshots"])).unwrap();
        json.as_array().unwrap().len()
    }

    /// The repository, opened in this process (to forge what a holder of
    /// the key could write).
    fn open_repo(&self) -> Repository {
        let backend = Arc::new(LocalBackend::new(self.repo()));
        Repository::open(backend, || Ok(Some(PASSWORD.to_string()))).unwrap()
    }

    /// A raw image of `mib` MiB with data at its start.
    fn raw_image(&self, name: &str, mib: usize) -> PathBuf {
        let path = self.path(name);
        let mut content = vec![0u8; mib << 20];
        content[..1 << 20].copy_from_slice(&noise(1 << 20, 3));
        std::fs::write(&path, content).unwrap();
        path
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Writes a sealed copy of snapshot `id` whose manifest `forge` changed,
/// as someone holding the repository key could, and returns its id.
fn forge(
    env: &Env,
    id: &str,
    forge: impl FnOnce(&mut vbackup_core::format::SnapshotManifest),
) -> String {
    let repo = env.open_repo();
    let mut manifest = repo.read_snapshot(id).unwrap().manifest;
    forge(&mut manifest);
    repo.write_snapshot(&manifest).unwrap()
}

#[test]
fn attack_restore_path_traversal_forged_disk_names_write_nothing_outside_the_target() {
    let env = Env::new();
    env.ok(&["init"]);
    let image = env.raw_image("web1.raw", 4);
    let id = env.backup("web1", &[s(&image)]);
    let outside = env.path("outside");
    std::fs::create_dir(&outside).unwrap();
    let absolute = outside.join("abs").display().to_string();
    for name in ["../escape", absolute.as_str(), "..", "a/../../escape2"] {
        let forged = forge(&env, &id, |m| m.disks[0].name = name.to_string());
        let target = env.path("target");
        let err = env.fails(&["restore", &forged, "--target", s(&target)], 3);
        assert!(err.contains("one plain file name"), "{name}: {err}");
        assert!(walk(&outside).is_empty(), "{name}: wrote outside");
        assert!(!env.path("escape.raw").exists() && !env.path("escape2.raw").exists());
        // `check` names the forged manifest as damaged.
        let err = env.fails(&["check"], 3);
        assert!(
            err.contains(&forged[..8]) || err.contains("damaged"),
            "{err}"
        );
        let backend = LocalBackend::new(env.repo());
        vbackup_storage::Backend::delete(&backend, &format!("snapshots/{forged}")).unwrap();
    }
    env.ok(&["restore", &id, "--target", s(&env.path("target"))]);
    assert!(env.path("target/web1.raw").exists());
}

#[test]
fn attack_restore_path_traversal_forged_config_file_name_writes_nothing_outside() {
    let env = Env::new();
    env.ok(&["init"]);
    let image = env.raw_image("web1.raw", 4);
    let config = env.path("web1.xml");
    std::fs::write(&config, "<domain/>").unwrap();
    let id = env.backup("web1", &["--definition", s(&config), s(&image)]);
    let forged = forge(&env, &id, |m| {
        let file = m.definition.as_mut().unwrap().config_file.as_mut().unwrap();
        file.name = "../evil.xml".to_string();
    });
    let err = env.fails(&["restore", &forged, "--target", s(&env.path("target"))], 3);
    assert!(err.contains("configuration file name"), "{err}");
    assert!(!env.path("evil.xml").exists());
}

#[test]
fn attack_local_user_copies_repository_and_restored_files_everything_is_private() {
    let env = Env::new();
    env.ok(&["init"]);
    let image = env.raw_image("web1.raw", 4);
    let config = env.path("web1.xml");
    std::fs::write(&config, "<domain/>").unwrap();
    let id = env.backup("web1", &["--definition", s(&config), s(&image)]);
    assert_eq!(mode(&env.repo()), 0o700);
    let files = walk(&env.repo());
    assert!(files.iter().any(|f| f.starts_with(env.repo().join("keys"))));
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
        let mut folder = file.parent().unwrap();
        while folder.starts_with(env.repo()) {
            assert_eq!(mode(folder), 0o700, "{}", folder.display());
            folder = folder.parent().unwrap();
        }
    }
    let target = env.path("restored/deeper");
    env.ok(&["restore", &id, "--target", s(&target)]);
    env.ok(&["restore", &id, "--target", s(&target), "--format", "qcow2"]);
    assert_eq!(mode(&target), 0o700);
    for name in ["web1.raw", "web1.qcow2", "web1.xml"] {
        assert_eq!(mode(&target.join(name)), 0o600, "{name}");
    }
    // Overwriting an existing, world-readable file makes it private too.
    std::fs::set_permissions(target.join("web1.raw"), PermissionsExt::from_mode(0o644)).unwrap();
    env.ok(&["restore", &id, "--target", s(&target), "--force"]);
    assert_eq!(mode(&target.join("web1.raw")), 0o600);
}

#[test]
fn attack_restore_through_a_planted_symlink_is_refused() {
    let env = Env::new();
    env.ok(&["init"]);
    let image = env.raw_image("web1.raw", 4);
    let id = env.backup("web1", &[s(&image)]);
    let target = env.path("target");
    std::fs::create_dir(&target).unwrap();
    let victim = env.path("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, target.join("web1.raw")).unwrap();
    let err = env.fails(&["restore", &id, "--target", s(&target), "--force"], 2);
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
}

#[test]
fn attack_local_user_reads_the_password_file_a_loose_mode_is_warned_about() {
    let env = Env::new();
    env.ok(&["init"]);
    let file = env.path("passphrase");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&file, PermissionsExt::from_mode(0o644)).unwrap();
    let args = ["--password-file", s(&file), "snapshots"];
    let mut cmd = env.command(&args);
    let out = cmd.env_remove("VBACKUP_PASSWORD").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WARNING") && stderr.contains("mode 0644") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    std::fs::set_permissions(&file, PermissionsExt::from_mode(0o600)).unwrap();
    let mut cmd = env.command(&args);
    let out = cmd.env_remove("VBACKUP_PASSWORD").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("WARNING"));
}

/// A `qemu-io` holding `image` open for writing (as a running VM would),
/// killed when dropped.
struct QemuIo(Child);

impl QemuIo {
    fn open(image: &Path, format: &str) -> Self {
        let child = Command::new("qemu-io")
            .args(["-f", format, s(image)])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let io = QemuIo(child);
        wait_for_locks(image);
        io
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until some process holds OFD locks on `image` (qemu-io has
/// opened it).
fn wait_for_locks(image: &Path) {
    let ino = std::fs::metadata(image).unwrap().ino();
    let needle = format!(":{ino} ");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let locks = std::fs::read_to_string("/proc/locks").unwrap();
        if locks
            .lines()
            .any(|l| l.contains("OFDLCK") && l.contains(&needle))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("qemu-io did not lock {}", image.display());
}

#[test]
fn attack_raw_image_written_by_a_running_process_is_not_backed_up_as_offline() {
    let env = Env::new();
    env.ok(&["init"]);
    let image = env.raw_image("web1.raw", 4);
    let writer = QemuIo::open(&image, "raw");
    for args in [vec![s(&image)], vec!["--format", "raw", s(&image)]] {
        let mut all = vec!["backup", "--vm", "web1"];
        all.extend_from_slice(&args);
        let err = env.fails(&all, 1);
        assert!(err.contains("is in use"), "{err}");
        assert!(
            err.contains("open for writing") && err.contains("--qmp"),
            "{err}"
        );
    }
    assert_eq!(env.snapshot_count(), 0);
    drop(writer);
    env.backup("web1", &[s(&image)]);
}

#[test]
fn attack_qcow2_in_use_gets_the_same_clear_message_not_qemus_lock_text() {
    let env = Env::new();
    env.ok(&["init"]);
    let raw = env.raw_image("base.raw", 4);
    let image = env.path("web1.qcow2");
    tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&image)],
    );
    let writer = QemuIo::open(&image, "qcow2");
    for args in [vec![s(&image)], vec!["--format", "qcow2", s(&image)]] {
        let mut all = vec!["backup", "--vm", "web1"];
        all.extend_from_slice(&args);
        let err = env.fails(&all, 1);
        assert!(err.contains("is in use") && err.contains("--qmp"), "{err}");
        assert!(!err.contains("Failed to get"), "{err}");
    }
    assert_eq!(env.snapshot_count(), 0);
    drop(writer);
    env.backup("web1", &[s(&image)]);
}

#[test]
fn attack_restore_over_an_image_a_vm_uses_is_refused_even_with_force() {
    let env = Env::new();
    env.ok(&["init"]);
    let image = env.raw_image("web1.raw", 4);
    let id = env.backup("web1", &[s(&image)]);
    let target = env.path("target");
    env.ok(&["restore", &id, "--target", s(&target)]);
    let restored = target.join("web1.raw");
    let before = std::fs::read(&restored).unwrap();
    let _vm = QemuIo::open(&restored, "raw");
    let err = env.fails(&["restore", &id, "--target", s(&target), "--force"], 1);
    assert!(err.contains("is in use"), "{err}");
    assert!(
        std::fs::read(&restored).unwrap() == before,
        "left untouched"
    );
}

/// A loop device over `file`, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &Path) -> Self {
        Self(
            tool("losetup", &["--find", "--show", s(file)])
                .trim()
                .to_string(),
        )
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// `device` mounted on `at`, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn new(device: &str, at: &Path) -> Self {
        std::fs::create_dir_all(at).unwrap();
        tool("mount", &[device, s(at)]);
        Mount(at.to_owned())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn attack_restore_onto_a_mounted_or_busy_block_device_is_refused_even_with_force() {
    let env = Env::new();
    env.ok(&["init"]);
    let image = env.raw_image("web1.raw", 8);
    let id = env.backup("web1", &[s(&image)]);
    let backing = env.path("volume");
    std::fs::write(&backing, vec![0u8; 16 << 20]).unwrap();
    tool("mkfs.ext4", &["-q", "-F", s(&backing)]);
    let device = LoopDevice::attach(&backing);
    let restore = ["restore", &id, "--target", &device.0, "--force"];

    // Without --force: overwriting a device is asked for, like a file.
    let err = env.fails(&restore[..4], 2);
    assert!(err.contains("--force") && err.contains(&device.0), "{err}");

    let mnt = env.path("mnt");
    let mounted = Mount::new(&device.0, &mnt);
    std::fs::write(mnt.join("file"), "the mounted file system's data").unwrap();
    let err = env.fails(&restore, 1);
    assert!(
        err.contains(&device.0) && err.contains("is in use"),
        "{err}"
    );
    assert!(
        err.contains(&format!("mounted on {}", mnt.display())),
        "{err}"
    );
    drop(mounted);
    // Mounting changed the superblock; from here on nothing else may.
    let before = std::fs::read(&backing).unwrap();
    let mounted = Mount::new(&device.0, &mnt);
    let kept = std::fs::read_to_string(mnt.join("file")).unwrap();
    assert_eq!(kept, "the mounted file system's data");
    drop(mounted);
    let before_holders = std::fs::read(&backing).unwrap();

    // Held open exclusively by another program (as LVM, md or a file
    // system would).
    let held = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&device.0)
        .unwrap();
    let err = env.fails(&restore, 1);
    assert!(
        err.contains(&device.0) && err.contains("is in use"),
        "{err}"
    );
    drop(held);

    // Used by a VM (QEMU's image locks, no exclusive open).
    let vm = QemuIo::open(Path::new(&device.0), "raw");
    let err = env.fails(&restore, 1);
    assert!(err.contains("is in use"), "{err}");
    drop(vm);
    assert!(
        std::fs::read(&backing).unwrap() == before_holders,
        "left untouched"
    );
    drop(before);

    env.ok(&restore);
    let written = std::fs::read(&backing).unwrap();
    assert!(written[..8 << 20] == std::fs::read(&image).unwrap()[..]);
}

#[test]
fn attack_disk_of_a_running_qemu_vm_is_not_backed_up_as_offline() {
    use vbackup_testkit::qemu::StorageDaemon;
    let env = Env::new();
    env.ok(&["init"]);
    let image = env.path("vda.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&image), "8M"],
    );
    let vm = StorageDaemon::start_vm(&[("vda", &image)], false).unwrap_or_else(|e| {
        panic!(
            "cannot start {} ({e}); run `eval \"$(scripts/qemu-system.sh)\"` first or use ./scripts/test.sh",
            StorageDaemon::qemu_system().display()
        )
    });
    let err = env.fails(&["backup", "--vm", "web1", s(&image)], 1);
    assert!(err.contains("is in use") && err.contains("--qmp"), "{err}");
    assert!(!err.contains("Failed to get"), "{err}");
    assert_eq!(env.snapshot_count(), 0);
    // What the message points to works.
    let qmp = vm.qmp_socket();
    env.backup("web1", &["--qmp", s(&qmp)]);
    assert_eq!(env.snapshot_count(), 1);
}
