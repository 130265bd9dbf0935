//! Changed-block tracking of offline qcow2 images, end to end with real
//! qemu tools: chains of full, incremental and differential snapshots, each
//! restored and compared with a copy of the disk taken at its instant, and
//! every broken-base case falling back to a full read with its reason.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::ops::Deref;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vbackup_testkit::cli::CliEnv;
use vbackup_testkit::qemu::{copy_now, guest_write, identical};
use vbackup_testkit::util::{s, tool};

const MIB: u64 = 1 << 20;

/// A repository in a temporary folder, initialised.
struct Env(CliEnv);

impl Deref for Env {
    type Target = CliEnv;
    fn deref(&self) -> &CliEnv {
        &self.0
    }
}

impl Env {
    fn new() -> Self {
        let env = Self(CliEnv::new(env!("CARGO_BIN_EXE_vbackup")));
        env.ok(&["init"]);
        env
    }

    /// Backs up `image` as VM `vm` with `--type kind`; returns the JSON.
    fn backup(&self, vm: &str, kind: &str, image: &Path) -> Value {
        let out = self.ok(&["--json", "backup", "--vm", vm, "--type", kind, s(image)]);
        serde_json::from_str(&out).unwrap()
    }

    /// Restores a snapshot's disk to a raw file and returns its path.
    fn restore(&self, snapshot: &str, disk: &str) -> PathBuf {
        let out = self.path(&format!("restore-{snapshot}"));
        self.ok(&["restore", snapshot, "--disk", disk, "--target", s(&out)]);
        out.join(format!("{disk}.raw"))
    }
}

fn vbackup_bitmaps(image: &Path) -> Vec<String> {
    let info: Value =
        serde_json::from_str(&tool("qemu-img", &["info", "--output=json", s(image)])).unwrap();
    let bitmaps = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    bitmaps
        .iter()
        .filter_map(|b| b["name"].as_str())
        .filter(|n| n.starts_with("vbackup-"))
        .map(str::to_string)
        .collect()
}

fn new_disk(env: &Env, name: &str, size: u64) -> PathBuf {
    let image = env.path(name);
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&image), &size.to_string()],
    );
    guest_write(&image, 0x11, 0, size / 2);
    image
}

fn disk(json: &Value) -> &Value {
    &json["disks"][0]
}

#[test]
fn full_incremental_differential_chain_restores_every_instant() {
    let env = Env::new();
    let image = new_disk(&env, "vm.qcow2", 64 * MIB);
    let full = env.backup("web", "auto", &image);
    assert_eq!(full["backup-type"], "full");
    let full_id = full["snapshot"].as_str().unwrap();
    copy_now(&image, &env.path("at-full.raw"));
    assert_eq!(
        vbackup_bitmaps(&image).len(),
        2,
        "a full leaves an incremental and a full bitmap"
    );

    guest_write(&image, 0x22, 8 * MIB, 64 << 10);
    guest_write(&image, 0x23, 50 * MIB, 3 * MIB);
    let inc1 = env.backup("web", "incremental", &image);
    assert_eq!(inc1["backup-type"], "incremental");
    assert_eq!(disk(&inc1)["read"], "changed");
    assert_eq!(disk(&inc1)["base-snapshot"], full_id);
    let read = inc1["stats"]["bytes-read"].as_u64().unwrap();
    assert!(
        read <= 8 * MIB,
        "the incremental read {read} bytes: only the changed chunks"
    );
    copy_now(&image, &env.path("at-inc1.raw"));

    guest_write(&image, 0x33, 20 * MIB, 4096);
    let inc2 = env.backup("web", "incremental", &image);
    assert_eq!(disk(&inc2)["base-snapshot"], inc1["snapshot"]);
    assert!(inc2["stats"]["bytes-read"].as_u64().unwrap() <= 4 * MIB);
    copy_now(&image, &env.path("at-inc2.raw"));

    guest_write(&image, 0x44, 30 * MIB, 4096);
    let diff = env.backup("web", "differential", &image);
    assert_eq!(diff["backup-type"], "differential");
    assert_eq!(
        disk(&diff)["base-snapshot"],
        full_id,
        "a differential builds on the last full"
    );
    let diff_read = diff["stats"]["bytes-read"].as_u64().unwrap();
    // Every byte written since the full (small changes are read alone and
    // stored as deltas, issue 12), more than the last incremental read.
    let since_full = (64 << 10) + 3 * MIB + 2 * 4096;
    assert!(
        diff_read >= since_full && diff_read <= 20 * MIB,
        "since the full: {diff_read}"
    );
    copy_now(&image, &env.path("at-diff.raw"));
    assert_eq!(
        vbackup_bitmaps(&image).len(),
        2,
        "exactly the bitmaps the next run needs"
    );

    for (snapshot, copy) in [
        (&full, "at-full.raw"),
        (&inc1, "at-inc1.raw"),
        (&inc2, "at-inc2.raw"),
        (&diff, "at-diff.raw"),
    ] {
        let restored = env.restore(snapshot["snapshot"].as_str().unwrap(), "vm");
        assert!(
            identical(&env.path(copy), &restored),
            "snapshot {} restores as {copy}",
            snapshot["snapshot"]
        );
    }
    env.ok(&["verify"]);
}

/// Runs a full, breaks the base with `breakage`, and checks the next
/// incremental reads everything, says why, restores, and repairs tracking.
fn falls_back(breakage: impl FnOnce(&Env, &Path), reason: &str) {
    let env = Env::new();
    let image = new_disk(&env, "vm.qcow2", 64 * MIB);
    env.backup("db", "full", &image);
    guest_write(&image, 0x5a, 10 * MIB, 1 << 20);
    breakage(&env, &image);
    let next = env.backup("db", "incremental", &image);
    assert_eq!(next["backup-type"], "full", "{next}");
    assert_eq!(disk(&next)["read"], "all");
    let why = disk(&next)["fallback-reason"].as_str().unwrap_or_default();
    assert!(
        why.contains(reason),
        "reason {why:?} should mention {reason:?}"
    );
    let restored = env.restore(next["snapshot"].as_str().unwrap(), "vm");
    copy_now(&image, &env.path("now.raw"));
    assert!(identical(&env.path("now.raw"), &restored));
    // Tracking is repaired: the next incremental is a real one again.
    guest_write(&image, 0x6b, 2 * MIB, 4096);
    let repaired = env.backup("db", "incremental", &image);
    assert_eq!(repaired["backup-type"], "incremental", "{repaired}");
    let restored = env.restore(repaired["snapshot"].as_str().unwrap(), "vm");
    copy_now(&image, &env.path("now2.raw"));
    assert!(identical(&env.path("now2.raw"), &restored));
}

#[test]
fn a_deleted_bitmap_falls_back_to_a_full_read() {
    falls_back(
        |_, image| {
            for name in vbackup_bitmaps(image) {
                tool("qemu-img", &["bitmap", "--remove", s(image), &name]);
            }
        },
        "missing",
    );
}

#[test]
fn a_resized_disk_falls_back_to_a_full_read() {
    falls_back(
        |_, image| drop(tool("qemu-img", &["resize", "-q", s(image), "+8M"])),
        "resized",
    );
}

#[test]
fn a_damaged_base_snapshot_falls_back_to_a_full_read() {
    falls_back(
        |env, _| {
            let chunks = env.path("repo").join("chunks");
            let first_dir = std::fs::read_dir(&chunks)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path();
            let chunk = std::fs::read_dir(first_dir)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path();
            std::fs::remove_file(chunk).unwrap();
        },
        "damaged",
    );
}

#[test]
fn a_pruned_full_makes_a_differential_read_everything() {
    let env = Env::new();
    let image = new_disk(&env, "vm.qcow2", 32 * MIB);
    let full = env.backup("app", "full", &image);
    guest_write(&image, 0x7c, 4 * MIB, 4096);
    env.backup("app", "incremental", &image);
    let id = full["snapshot"].as_str().unwrap();
    std::fs::remove_file(env.path("repo").join("snapshots").join(id)).unwrap();
    let diff = env.backup("app", "differential", &image);
    assert_eq!(diff["backup-type"], "full");
    assert!(
        disk(&diff)["fallback-reason"]
            .as_str()
            .unwrap()
            .contains("gone"),
        "{diff}"
    );
}

#[test]
fn raw_images_are_read_whole_and_say_why() {
    let env = Env::new();
    let image = env.path("vm.raw");
    std::fs::write(&image, vec![7u8; 8 << 20]).unwrap();
    env.backup("r", "full", &image);
    std::fs::write(&image, vec![8u8; 8 << 20]).unwrap();
    let next = env.backup("r", "incremental", &image);
    assert_eq!(next["backup-type"], "full");
    assert!(disk(&next)["fallback-reason"]
        .as_str()
        .unwrap()
        .contains("raw images cannot hold dirty bitmaps"));
}

#[test]
fn the_vm_configuration_is_restored_beside_the_disks_with_their_new_paths() {
    let env = Env::new();
    let image = new_disk(&env, "guest.qcow2", 16 * MIB);
    let config = env.path("guest.xml");
    std::fs::write(
        &config,
        format!(
            "<domain><disk><source file='{}'/></disk></domain>",
            s(&image)
        ),
    )
    .unwrap();
    env.ok(&[
        "backup",
        "--vm",
        "guest",
        "--definition",
        s(&config),
        s(&image),
    ]);
    let out = env.path("restored");
    env.ok(&["restore", "latest", "--target", s(&out)]);
    let restored = std::fs::read_to_string(out.join("guest.xml")).unwrap();
    assert!(restored.contains(s(&out.join("guest.raw"))), "{restored}");
    assert!(!restored.contains(s(&image)), "{restored}");
}
