//! End-to-end tests of S3 repositories against real Garage servers on
//! loopback: the full backup cycle, a cluster node killed during a backup,
//! and bad input (wrong credentials, no server, no bucket, connections cut
//! mid-upload, garbage and truncated replies). Garage must be installed
//! (`cargo install garage --locked`); the tests fail without it.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/garage.rs"]
mod garage;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{noise, s, text, tool};
use garage::Garage;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A test folder and the way to run vbackup against one S3 repository.
struct Env {
    dir: tempfile::TempDir,
    repo: String,
    garage: Option<Garage>,
    extra_env: Vec<(String, String)>,
}

impl Env {
    /// A repository under `prefix` of the Garage's bucket (not initialised).
    fn new(garage: Garage, prefix: &str) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            repo: garage.repo(prefix),
            garage: Some(garage),
            extra_env: Vec::new(),
        }
    }

    fn garage(&self) -> &Garage {
        self.garage.as_ref().unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vbackup"));
        cmd.args(args)
            .env("VBACKUP_REPOSITORY", &self.repo)
            .env("VBACKUP_PASSWORD", "pw")
            .env("VBACKUP_KDF_MEMORY_KIB", "1024")
            .env("VBACKUP_RETRIES", "3")
            .env_remove("VBACKUP_PASSWORD_FILE")
            .stdin(Stdio::null());
        if let Some(garage) = &self.garage {
            garage.credentials(&mut cmd);
        }
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "vbackup {args:?}: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs, expects failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "vbackup {args:?} succeeded: {}",
            text(&out)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    fn backup(&self, vm: &str, image: &Path, extra: &[&str]) -> Value {
        let mut args = vec!["--json", "backup", "--vm", vm];
        args.extend_from_slice(extra);
        args.push(s(image));
        serde_json::from_str(&self.ok(&args)).unwrap()
    }

    fn restore(&self, snapshot: &str, disk: &str) -> PathBuf {
        let out = self.path(&format!("restore-{}", snapshot.replace('~', "-")));
        self.ok(&["restore", snapshot, "--disk", disk, "--target", s(&out)]);
        out.join(format!("{disk}.raw"))
    }
}

/// A qcow2 of `size` bytes whose first `filled` bytes are incompressible
/// noise (so chunks are real uploads).
fn noisy_qcow2(dir: &Path, name: &str, size: u64, filled: u64, seed: u64) -> PathBuf {
    let raw = dir.join(format!("{name}.src.raw"));
    let mut file = std::fs::File::create(&raw).unwrap();
    let block = 4 * MIB as usize;
    let mut written = 0;
    while written < filled {
        let len = block.min((filled - written) as usize);
        file.write_all(&noise(len, seed + written)).unwrap();
        written += len as u64;
    }
    file.set_len(size).unwrap();
    drop(file);
    let image = dir.join(format!("{name}.qcow2"));
    tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&image)],
    );
    std::fs::remove_file(raw).unwrap();
    image
}

fn guest_write(image: &Path, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("write -P {pattern} {offset} {len}");
    tool("qemu-io", &["-f", "qcow2", "-c", &cmd, s(image)]);
}

fn copy_now(image: &Path, to: &Path) {
    tool(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", s(image), s(to)],
    );
}

fn identical(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", s(a), s(b)])
        .status()
        .unwrap()
        .success()
}

fn stat(json: &Value, name: &str) -> u64 {
    json["stats"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no stats.{name} in {json}"))
}

#[test]
fn full_and_incremental_backups_restore_identical_from_garage() {
    let env = Env::new(Garage::single(), "repos/cycle");
    env.ok(&["init"]);
    let image = noisy_qcow2(env.dir.path(), "vm", 64 * MIB, 40 * MIB, 1);

    let full = env.backup("web", &image, &[]);
    assert_eq!(full["backup-type"], "full");
    assert!(stat(&full, "chunks-new") > 0, "{full}");
    let full_id = full["snapshot"].as_str().unwrap().to_string();
    copy_now(&image, &env.path("at-full.raw"));

    guest_write(&image, 0x22, 8 * MIB, 64 << 10);
    guest_write(&image, 0x23, 50 * MIB, 3 * MIB);
    let inc = env.backup("web", &image, &["--type", "incremental"]);
    assert_eq!(inc["backup-type"], "incremental", "{inc}");
    assert!(
        stat(&inc, "bytes-read") <= 8 * MIB,
        "the incremental read more than the changed chunks: {inc}"
    );
    copy_now(&image, &env.path("at-inc.raw"));

    // The same bytes again, read in full: every chunk is already stored.
    let again = env.backup("web", &image, &["--type", "full"]);
    assert_eq!(stat(&again, "chunks-new"), 0, "{again}");
    assert!(stat(&again, "chunks-reused") > 0, "{again}");

    let inc_id = inc["snapshot"].as_str().unwrap();
    assert!(identical(
        &env.path("at-full.raw"),
        &env.restore(&full_id, "vm")
    ));
    assert!(identical(
        &env.path("at-inc.raw"),
        &env.restore(inc_id, "vm")
    ));
    let verify = env.ok(&["verify"]);
    assert!(verify.contains("no damage found"), "{verify}");

    // Plain S3 has no atomic rename: prune stops at its first move rather
    // than delete unsafely, and nothing a snapshot needs goes.
    env.ok(&["forget", "--keep-last", "1"]);
    let err = env.fails(&["prune", "--grace", "0"]);
    assert!(err.contains("cannot move objects atomically"), "{err}");
    let latest = env.restore("latest", "vm");
    assert!(identical(&env.path("at-inc.raw"), &latest));
}
