//! Backups of running VMs: a real qemu-storage-daemon serves qcow2 disks,
//! a "guest" writes to them through writable NBD exports, and `vbackup
//! backup --qmp` backs them up while they run. Each snapshot is restored
//! and compared with the disks' content at its instant; QMP is queried
//! afterwards for anything left behind.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::ops::Deref;
use std::path::Path;
use std::process::Stdio;

use serde_json::{json, Value};
use vbackup_testkit::cli::CliEnv;
use vbackup_testkit::qemu::StorageDaemon;
use vbackup_testkit::util::{noise, s, text, tool, walk};

const MIB: u64 = 1 << 20;

/// A repository, and a daemon (or VM) serving the disks it backs up.
struct Env {
    cli: CliEnv,
    daemon: StorageDaemon,
    disks: Vec<(String, u64)>,
}

impl Deref for Env {
    type Target = CliEnv;
    fn deref(&self) -> &CliEnv {
        &self.cli
    }
}

impl Env {
    /// A repository and a daemon serving fresh qcow2 disks of the given sizes.
    fn new(disks: &[(&str, u64)]) -> Self {
        Self::with(disks, StorageDaemon::start)
    }

    /// A repository and a real QEMU virtual machine (qemu-system-x86_64)
    /// whose virtio-blk disks are fresh qcow2 images of the given sizes.
    fn new_vm(disks: &[(&str, u64)]) -> Self {
        Self::with(disks, |specs, guest| {
            StorageDaemon::start_vm(specs, guest).map_err(|e| {
                panic!(
                    "cannot start {} ({e}); run `eval \"$(scripts/qemu-system.sh)\"` first or use ./scripts/test.sh",
                    StorageDaemon::qemu_system().display()
                )
            })
        })
    }

    fn with(
        disks: &[(&str, u64)],
        start: impl FnOnce(&[(&str, &Path)], bool) -> vbackup_qemu::Result<StorageDaemon>,
    ) -> Self {
        let cli = CliEnv::new(env!("CARGO_BIN_EXE_vbackup"));
        let mut specs = Vec::new();
        for (node, size) in disks {
            let path = cli.path(&format!("{node}.qcow2"));
            tool(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", s(&path), &size.to_string()],
            );
            specs.push((node.to_string(), path));
        }
        let refs: Vec<(&str, &Path)> = specs
            .iter()
            .map(|(n, p)| (n.as_str(), p.as_path()))
            .collect();
        let daemon = start(&refs, true).unwrap();
        let env = Self {
            cli,
            daemon,
            disks: disks.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
        };
        env.ok(&["init"]);
        env
    }

    fn backup_args(&self, kind: &str) -> Vec<String> {
        let qmp = self.daemon.qmp_socket();
        let nbd = self.daemon.guest_socket().unwrap();
        [
            "--json",
            "backup",
            "--vm",
            "live-vm",
            "--type",
            kind,
            "--qmp",
            s(&qmp),
            "--nbd-socket",
            s(&nbd),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    }

    fn backup(&self, kind: &str) -> Value {
        let args = self.backup_args(kind);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(&self.ok(&refs)).unwrap()
    }

    /// Writes `len` bytes of `byte` at `offset` of `node`, as the guest.
    fn write(&self, node: &str, offset: u64, len: usize, byte: u8) {
        let mut guest = self.daemon.guest(node).unwrap();
        guest.write_at(&vec![byte; len], offset).unwrap();
        guest.flush().unwrap();
    }

    /// Writes `len` incompressible bytes at the start of `node`, as the
    /// guest, and returns them.
    fn fill_with_noise(&self, node: &str, len: usize) -> Vec<u8> {
        let data = noise(len, 0x2545_f491);
        let mut guest = self.daemon.guest(node).unwrap();
        guest.write_at(&data, 0).unwrap();
        guest.flush().unwrap();
        data
    }

    /// The content of every disk now, read as the guest sees it.
    fn capture(&self) -> Vec<Vec<u8>> {
        self.disks
            .iter()
            .map(|(node, size)| {
                let mut guest = self.daemon.guest(node).unwrap();
                let mut data = vec![0u8; *size as usize];
                guest.read_at(&mut data, 0).unwrap();
                data
            })
            .collect()
    }

    /// Restores every disk of `snapshot` and returns their bytes.
    fn restore(&self, snapshot: &str) -> Vec<Vec<u8>> {
        let out = self.path(&format!("restored-{snapshot}"));
        self.ok(&["restore", snapshot, "--target", s(&out)]);
        self.disks
            .iter()
            .map(|(node, _)| std::fs::read(out.join(format!("{node}.raw"))).unwrap())
            .collect()
    }

    /// Asserts that QEMU holds nothing of vbackup's but its two bitmaps per disk.
    fn assert_clean(&self, bitmaps_per_disk: usize) {
        let mut qmp = self.daemon.qmp().unwrap();
        let jobs = qmp.execute("query-block-jobs", json!({})).unwrap();
        assert_eq!(jobs, json!([]), "block jobs left");
        let exports = qmp.execute("query-block-exports", json!({})).unwrap();
        let ours: Vec<&Value> = exports
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["id"].as_str().unwrap_or("").starts_with("vbackup-"))
            .collect();
        assert!(ours.is_empty(), "exports left: {ours:?}");
        let nodes = qmp
            .execute("query-named-block-nodes", json!({"flat": true}))
            .unwrap();
        for node in nodes.as_array().unwrap() {
            let name = node["node-name"].as_str().unwrap_or("");
            assert!(!name.starts_with("vbackup-"), "node left: {name}");
            if self.disks.iter().any(|(n, _)| n == name) {
                let bitmaps: Vec<&str> = node["dirty-bitmaps"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|b| b["name"].as_str())
                            .filter(|n| n.starts_with("vbackup-"))
                            .collect()
                    })
                    .unwrap_or_default();
                assert_eq!(
                    bitmaps.len(),
                    bitmaps_per_disk,
                    "bitmaps on {name}: {bitmaps:?}"
                );
            }
        }
    }
}

#[test]
fn a_running_vm_backs_up_full_incremental_and_differential_at_one_instant() {
    full_incremental_differential(&Env::new(&[("disk0", 32 * MIB), ("disk1", 16 * MIB)]));
}

#[test]
fn a_real_qemu_vm_backs_up_full_incremental_and_differential_at_one_instant() {
    let env = Env::new_vm(&[("disk0", 32 * MIB), ("disk1", 16 * MIB)]);
    let last = full_incremental_differential(&env);
    // The definition restored beside the disks is what the VM's QMP said.
    let out = env.path("definition");
    env.ok(&[
        "restore",
        last["snapshot"].as_str().unwrap(),
        "--target",
        s(&out),
    ]);
    let definition: Value =
        serde_json::from_slice(&std::fs::read(out.join("vm-definition.json")).unwrap()).unwrap();
    let machine = definition["qmp"]["machine-type"].as_str().unwrap_or("");
    assert!(machine.contains("q35"), "machine type {machine:?}");
    let devices = definition["qmp"]["block-devices"].to_string();
    assert!(devices.contains("dev-disk0"), "devices {devices}");
}

/// Full, incremental, incremental and differential snapshots of `env`'s
/// two disks with guest writes in between, each restored and compared
/// with the disks at its instant.
/// Returns the last (differential) snapshot's record.
fn full_incremental_differential(env: &Env) -> Value {
    env.write("disk0", 0, 8 << 20, 0x11);
    env.write("disk1", 4 * MIB, 2 << 20, 0x12);
    let full = env.backup("auto");
    assert_eq!(full["backup-type"], "full");
    assert_eq!(full["consistency"], "crash-consistent");
    let at_full = env.capture();
    env.assert_clean(2);

    env.write("disk0", 20 * MIB, 64 << 10, 0x21);
    env.write("disk1", 0, 4096, 0x22);
    let inc1 = env.backup("incremental");
    assert_eq!(inc1["backup-type"], "incremental", "{inc1}");
    assert!(
        inc1["stats"]["bytes-read"].as_u64().unwrap() <= 8 * MIB,
        "{inc1}"
    );
    let at_inc1 = env.capture();
    env.assert_clean(2);

    env.write("disk0", 2 * MIB, 4096, 0x31);
    let inc2 = env.backup("incremental");
    assert_eq!(inc2["disks"][0]["base-snapshot"], inc1["snapshot"]);
    let at_inc2 = env.capture();

    env.write("disk1", 12 * MIB, 4096, 0x41);
    let diff = env.backup("differential");
    assert_eq!(diff["backup-type"], "differential", "{diff}");
    assert_eq!(diff["disks"][0]["base-snapshot"], full["snapshot"]);
    let at_diff = env.capture();
    env.assert_clean(2);

    for (snapshot, expected) in [
        (&full, at_full),
        (&inc1, at_inc1),
        (&inc2, at_inc2),
        (&diff, at_diff),
    ] {
        let restored = env.restore(snapshot["snapshot"].as_str().unwrap());
        assert!(
            restored == expected,
            "snapshot {} does not restore to its instant",
            snapshot["snapshot"]
        );
    }
    diff
}

/// A full, a guest write, `breakage`, then an incremental that must read
/// everything, say why, restore correctly and leave valid tracking.
fn live_fallback(breakage: impl FnOnce(&mut Env), reason: &str) {
    live_fallback_in(Env::new(&[("disk0", 16 * MIB)]), breakage, reason);
}

fn live_fallback_in(mut env: Env, breakage: impl FnOnce(&mut Env), reason: &str) {
    env.write("disk0", 0, 4 << 20, 0x51);
    env.backup("full");
    env.write("disk0", 8 * MIB, 4096, 0x52);
    breakage(&mut env);
    let next = env.backup("incremental");
    assert_eq!(next["backup-type"], "full", "{next}");
    let why = next["disks"][0]["fallback-reason"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains(reason), "{why:?} should mention {reason:?}");
    let now = env.capture();
    assert!(env.restore(next["snapshot"].as_str().unwrap()) == now);
    env.write("disk0", MIB, 4096, 0x53);
    let repaired = env.backup("incremental");
    assert_eq!(
        repaired["backup-type"], "incremental",
        "tracking is repaired: {repaired}"
    );
    let now = env.capture();
    assert!(env.restore(repaired["snapshot"].as_str().unwrap()) == now);
    env.assert_clean(2);
}

#[test]
fn a_removed_bitmap_makes_the_next_backup_full() {
    live_fallback(
        |env| {
            let mut qmp = env.daemon.qmp().unwrap();
            let nodes = qmp
                .execute("query-named-block-nodes", json!({"flat": true}))
                .unwrap();
            for node in nodes
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["node-name"] == "disk0")
            {
                for bitmap in node["dirty-bitmaps"].as_array().unwrap() {
                    let args = json!({"node": "disk0", "name": bitmap["name"]});
                    qmp.execute("block-dirty-bitmap-remove", args).unwrap();
                }
            }
        },
        "missing",
    );
}

#[test]
fn a_resized_disk_makes_the_next_backup_full() {
    live_fallback(
        |env| {
            // Grown while the VM is off, as an admin would.
            env.daemon.stop().unwrap();
            tool(
                "qemu-img",
                &["resize", "-q", s(&env.path("disk0.qcow2")), "24M"],
            );
            env.daemon.restart().unwrap();
            env.disks[0].1 = 24 * MIB;
        },
        "resized",
    );
}

#[test]
fn a_daemon_killed_and_restarted_makes_the_next_backup_full() {
    live_fallback(
        |env| {
            env.daemon.kill();
            env.daemon.restart().unwrap();
        },
        "bitmap",
    );
}

#[test]
fn a_real_qemu_vm_killed_and_restarted_makes_the_next_backup_full() {
    live_fallback_in(
        Env::new_vm(&[("disk0", 16 * MIB)]),
        |env| {
            env.daemon.kill();
            env.daemon.restart().unwrap();
        },
        "bitmap",
    );
}

#[test]
fn a_cleanly_restarted_daemon_keeps_the_persistent_bitmaps() {
    restart_keeps_bitmaps(Env::new(&[("disk0", 16 * MIB)]));
}

/// Where Proxmox loses its dirty bitmaps: a VM shut down and started again
/// keeps vbackup's (persistent, stored in the qcow2 at shutdown), so the
/// next backup is still incremental.
#[test]
fn a_real_qemu_vm_restarted_keeps_the_persistent_bitmaps() {
    restart_keeps_bitmaps(Env::new_vm(&[("disk0", 16 * MIB)]));
}

fn restart_keeps_bitmaps(mut env: Env) {
    env.write("disk0", 0, 1 << 20, 0x61);
    env.backup("full");
    env.daemon.restart().unwrap();
    env.write("disk0", 4 * MIB, 4096, 0x62);
    let next = env.backup("incremental");
    assert_eq!(next["backup-type"], "incremental", "{next}");
    let now = env.capture();
    assert!(env.restore(next["snapshot"].as_str().unwrap()) == now);
}

#[test]
fn an_interrupted_live_backup_leaves_nothing_behind_and_keeps_tracking_valid() {
    let env = Env::new(&[("disk0", 384 * MIB)]);
    let noise = env.fill_with_noise("disk0", 256 << 20);
    env.backup("full");
    let changed: Vec<u8> = noise.iter().map(|b| b ^ 0x5a).collect();
    {
        let mut guest = env.daemon.guest("disk0").unwrap();
        guest.write_at(&changed, 0).unwrap();
        guest.flush().unwrap();
    }
    let chunks = || walk(&env.path("repo").join("chunks")).len();
    let before = chunks();
    let args = env.backup_args("incremental");
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.insert(1, "--threads");
    args.insert(2, "1");
    let mut child = env
        .command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while chunks() <= before
        && child.try_wait().unwrap().is_none()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    tool("kill", &["-TERM", &child.id().to_string()]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    env.assert_clean(2);
    let list: Value = serde_json::from_str(&env.ok(&["--json", "snapshots"])).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "the interrupted backup recorded nothing"
    );
    let next = env.backup("incremental");
    assert_eq!(next["backup-type"], "incremental", "{next}");
    let now = env.capture();
    assert!(env.restore(next["snapshot"].as_str().unwrap()) == now);
}

#[test]
fn writes_during_a_live_backup_are_not_in_it_but_in_the_next_incremental() {
    writes_during_a_backup(Env::new(&[("disk0", 320 * MIB)]));
}

#[test]
fn a_real_qemu_vm_written_during_its_backup_keeps_the_writes_for_the_next() {
    writes_during_a_backup(Env::new_vm(&[("disk0", 320 * MIB)]));
}

fn writes_during_a_backup(env: Env) {
    env.fill_with_noise("disk0", 256 << 20);
    let at_instant = env.capture();
    let chunks = || walk(&env.path("repo").join("chunks")).len();
    let args = env.backup_args("full");
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.insert(1, "--threads");
    args.insert(2, "1");
    let mut child = env
        .command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while chunks() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The instant is taken before the first chunk is stored: these writes come after it.
    env.write("disk0", 300 * MIB, 1 << 20, 0xee);
    env.write("disk0", 0, 64 << 10, 0xdd);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the writes landed while the backup ran"
    );
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let during: Value = serde_json::from_slice(&out.stdout).unwrap();
    let restored = env.restore(during["snapshot"].as_str().unwrap());
    assert!(
        restored == at_instant,
        "the snapshot holds the disk as it was at its instant"
    );
    let next = env.backup("incremental");
    assert_eq!(next["backup-type"], "incremental", "{next}");
    assert!(
        next["stats"]["bytes-read"].as_u64().unwrap() <= 8 * MIB,
        "only the writes made during the backup: {next}"
    );
    let now = env.capture();
    assert!(
        env.restore(next["snapshot"].as_str().unwrap()) == now,
        "the next incremental has them"
    );
    env.assert_clean(2);
}
