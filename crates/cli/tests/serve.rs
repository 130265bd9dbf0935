//! Issue 13: `vbackup serve` exports a snapshot's disks over NBD, checked
//! with QEMU's own tools (`qemu-img compare`, `qemu-img map`, `qemu-io`)
//! against the source images: every format, from a local folder, from S3
//! (Garage) and from `vbackup server`; holes stay holes; writable exports
//! write into an overlay and never into the repository, and the committed
//! overlay restores to what was written; a killed server leaves nothing.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vbackup_testkit::cli::CliEnv;
use vbackup_testkit::garage::Garage;
use vbackup_testkit::server::{add_token, Server};
use vbackup_testkit::util::{noise, s, stop_gently, text, tool, walk};

const VBACKUP: &str = env!("CARGO_BIN_EXE_vbackup");
const MIB: u64 = 1 << 20;

/// A running `vbackup --json serve`, stopped with SIGTERM when dropped.
struct Served {
    child: Child,
    /// What it printed once listening.
    info: Value,
}

impl Served {
    /// Starts `cmd` (vbackup with its repository environment) with
    /// `--json serve ARGS` and waits for its listening report.
    fn start(mut cmd: Command, args: &[&str]) -> Self {
        cmd.arg("--json").arg("serve").args(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            let out = child.wait_with_output().unwrap();
            panic!("vbackup serve {args:?} did not start:\n{}", text(&out));
        }
        let info = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        Self { child, info }
    }

    /// The URI of export `disk`.
    fn uri(&self, disk: &str) -> String {
        let exports = self.info["exports"].as_array().unwrap();
        let export = exports.iter().find(|e| e["name"] == disk);
        let export = export.unwrap_or_else(|| panic!("no export '{disk}' in {}", self.info));
        export["uri"].as_str().unwrap().to_string()
    }

    fn stop(mut self) {
        stop_gently(&mut self.child);
        let status = self.child.wait().unwrap();
        assert!(
            status.success() || status.code() == Some(130),
            "serve ended with {status}"
        );
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            stop_gently(&mut self.child);
        }
    }
}

/// Writes `pattern` bytes through qemu-io at each `(offset, length)`.
fn qemu_io_write(format: &str, image: &str, writes: &[(u64, u64, u8)]) {
    let mut args = vec!["-f".to_string(), format.to_string()];
    for (offset, length, pattern) in writes {
        args.push("-c".into());
        args.push(format!("write -P {pattern} {offset} {length}"));
    }
    args.push(image.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tool("qemu-io", &args);
}

/// A disk image of `format` with data in a few places and holes between.
fn image(dir: &Path, name: &str, format: &str, size_mib: u64) -> PathBuf {
    let path = dir.join(format!("{name}.{format}"));
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            format,
            s(&path),
            &format!("{size_mib}M"),
        ],
    );
    qemu_io_write(
        format,
        s(&path),
        &[
            (0, 3 * MIB, 0x11),
            (9 * MIB + 4096, 70_000, 0x22),
            ((size_mib - 1) * MIB, MIB, 0x33),
        ],
    );
    // Not compressible, not all one byte: real chunks.
    let noise_file = dir.join(format!("{name}.noise"));
    std::fs::write(&noise_file, noise(MIB as usize, size_mib)).unwrap();
    tool(
        "qemu-io",
        &[
            "-f",
            format,
            "-c",
            &format!("write -s {} {} {}", s(&noise_file), 5 * MIB, MIB),
            s(&path),
        ],
    );
    path
}

/// Whether `qemu-img compare` finds the export and the image identical.
fn compare(uri: &str, image: &Path, format: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", format, uri, s(image)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{uri} differs from {}:\n{}",
        image.display(),
        text(&out)
    );
}

/// `qemu-img map` of `uri`: `(start, length, data)` of each extent.
fn map(uri: &str) -> Vec<(u64, u64, bool)> {
    let out = tool("qemu-img", &["map", "--output=json", "-f", "raw", uri]);
    let extents: Vec<Value> = serde_json::from_str(&out).unwrap();
    extents
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// A digest of every file of `dir` (names and bytes).
fn tree_digest(dir: &Path) -> BTreeMap<PathBuf, blake3::Hash> {
    walk(dir)
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(&f).unwrap();
            (f, blake3::hash(&bytes))
        })
        .collect()
}

fn local_repo() -> CliEnv {
    let env = CliEnv::new(VBACKUP);
    env.ok(&["init"]);
    env
}

#[test]
fn exports_of_every_format_equal_their_source_and_holes_stay_holes() {
    let env = local_repo();
    let mut disks = Vec::new();
    for format in ["raw", "qcow2", "vmdk", "vhdx", "vdi", "qed"] {
        disks.push((
            image(env.dir(), &format!("disk-{format}"), format, 24),
            format,
        ));
    }
    let mut args = vec!["backup", "--vm", "formats"];
    args.extend(disks.iter().map(|(p, _)| s(p)));
    env.ok(&args);
    let sock = env.path("nbd.sock");
    let listen = format!("unix:{}", s(&sock));
    let served = Served::start(env.cmd(), &["latest", "--listen", &listen]);
    for (path, format) in &disks {
        let name = path.file_stem().unwrap().to_str().unwrap();
        compare(&served.uri(name), path, format);
    }
    // With 4 MiB chunks: data in chunks 0-2 (0-12 MiB) and 5 (the last
    // MiB), holes in 12-20 MiB.
    let extents = map(&served.uri("disk-qcow2"));
    let hole_at = |offset: u64| {
        extents
            .iter()
            .any(|(s, l, data)| !data && *s <= offset && offset < s + l)
    };
    let data_at = |offset: u64| {
        extents
            .iter()
            .any(|(s, l, data)| *data && *s <= offset && offset < s + l)
    };
    assert!(hole_at(12 * MIB) && hole_at(19 * MIB), "{extents:?}");
    assert!(
        data_at(0) && data_at(5 * MIB) && data_at(23 * MIB),
        "{extents:?}"
    );
    // Several connections at once (qemu-img convert -m 4): the same bytes.
    let copy = env.path("copy.raw");
    let uri = served.uri("disk-raw");
    tool(
        "qemu-img",
        &[
            "convert",
            "-m",
            "4",
            "-W",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            s(&copy),
        ],
    );
    compare(&uri, &copy, "raw");
    // Read-only: a write is refused, and the served disk is unchanged.
    let write = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4096", &uri])
        .output()
        .unwrap();
    assert!(
        !write.status.success()
            || text(&write).contains("denied")
            || text(&write).contains("read-only"),
        "{}",
        text(&write)
    );
    compare(&uri, &disks[0].0, "raw");
    served.stop();
    assert!(!sock.exists(), "the socket is removed when serve stops");
}

#[test]
fn exports_from_s3_and_from_the_backup_server_equal_their_source() {
    // S3 (Garage).
    let garage = Garage::single();
    let env = CliEnv::new(VBACKUP);
    let source = image(env.dir(), "vda", "qcow2", 16);
    let s3 = |args: &[&str]| {
        let mut cmd = env.cmd();
        cmd.arg("--repo")
            .arg(garage.repo("serve"))
            .args(args)
            .env_remove("VBACKUP_REPOSITORY");
        garage.credentials(&mut cmd);
        cmd
    };
    let out = s3(&["init"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = s3(&["backup", "--vm", "s3vm", s(&source)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let listen = format!("unix:{}", s(&env.path("s3.sock")));
    let served = Served::start(s3(&[]), &["latest", "--listen", &listen]);
    compare(&served.uri("vda"), &source, "qcow2");
    served.stop();

    // The backup server, with a read-only token.
    let data = env.path("data");
    let admin = add_token(VBACKUP, &data, "*", "admin");
    let read = add_token(VBACKUP, &data, "r", "read");
    let server = Server::start(VBACKUP, &data);
    let remote = |token: &str, args: &[&str]| {
        let mut cmd = env.cmd();
        cmd.arg("--repo")
            .arg(server.url("r"))
            .args(args)
            .env_remove("VBACKUP_REPOSITORY")
            .env("VBACKUP_TOKEN", token)
            .env("VBACKUP_SERVER_FINGERPRINT", server.fingerprint())
            .env("VBACKUP_RETRIES", "1");
        cmd
    };
    for args in [&["init"][..], &["backup", "--vm", "srvvm", s(&source)]] {
        let out = remote(&admin, args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    let listen = "tcp:127.0.0.1:0";
    let served = Served::start(remote(&read, &[]), &["latest", "--listen", listen]);
    let uri = served.uri("vda");
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    compare(&uri, &source, "qcow2");
    served.stop();
    server.stop();
}

#[test]
fn writes_to_a_writable_export_go_to_the_overlay_and_commit_to_a_new_snapshot() {
    let env = local_repo();
    let source = image(env.dir(), "vda", "qcow2", 16);
    env.ok(&["backup", "--vm", "w", s(&source)]);
    let repo_before = tree_digest(&env.repo());
    let overlay = env.path("vda.overlay");
    let listen = format!("unix:{}", s(&env.path("w.sock")));
    let served = Served::start(
        env.cmd(),
        &[
            "latest",
            "--listen",
            &listen,
            "--writable",
            "--overlay",
            s(&overlay),
        ],
    );
    let writes = [
        (1000, 5000, 0xab),
        (7 * MIB, 64 * 1024, 0xcd),
        (15 * MIB + 512, 512, 0xef),
    ];
    let uri = served.uri("vda");
    qemu_io_write("raw", &uri, &writes);
    // What the guest now sees: the source with the same writes.
    let expected = env.path("expected.qcow2");
    std::fs::copy(&source, &expected).unwrap();
    qemu_io_write("qcow2", s(&expected), &writes);
    compare(&uri, &expected, "qcow2");
    served.stop();
    assert!(
        tree_digest(&env.repo()) == repo_before,
        "the repository is byte for byte unchanged"
    );

    // Served again over the same overlay: the writes are still there.
    let served = Served::start(
        env.cmd(),
        &[
            "latest",
            "--listen",
            &listen,
            "--writable",
            "--overlay",
            s(&overlay),
        ],
    );
    compare(&served.uri("vda"), &expected, "qcow2");
    served.stop();

    let committed = env.json(&["serve", "--commit-overlay", s(&overlay)]);
    let id = committed["snapshot"].as_str().unwrap();
    assert!(
        committed["bytes-read"].as_u64().unwrap() <= 3 * 4 * MIB,
        "{committed}"
    );
    let restored = env.path("restored");
    env.ok(&["restore", id, "--target", s(&restored)]);
    compare(s(&restored.join("vda.raw")), &expected, "qcow2");
    // The served snapshot itself is as it was.
    let list = env.json(&["snapshots"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let check = env.run(&["check", "--read-data"]);
    assert!(check.status.success(), "{}", text(&check));
}

#[test]
fn a_killed_serve_leaves_no_socket_behind() {
    let env = local_repo();
    let source = image(env.dir(), "vda", "raw", 16);
    env.ok(&["backup", "--vm", "k", s(&source)]);
    let sock = env.path("k.sock");
    let listen = format!("unix:{}", s(&sock));
    let mut served = Served::start(env.cmd(), &["latest", "--listen", &listen]);
    assert!(sock.exists());
    served.child.kill().unwrap();
    served.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !sock.exists(),
        "the sentinel removed the socket of the killed server"
    );
    // And the path can be served again at once.
    let served = Served::start(env.cmd(), &["latest", "--listen", &listen]);
    compare(&served.uri("vda"), &source, "raw");
    served.stop();
}

#[test]
fn bad_serve_requests_fail_with_a_clear_usage_error() {
    let env = local_repo();
    let source = image(env.dir(), "vda", "raw", 16);
    env.ok(&["backup", "--vm", "b", s(&source)]);
    let listen = format!("unix:{}", s(&env.path("b.sock")));
    let err = env.fails(
        &["serve", "latest", "--listen", &listen, "--disk", "nope"],
        2,
    );
    assert!(
        err.contains("no disk 'nope'") && err.contains("vda"),
        "{err}"
    );
    let err = env.fails(&["serve", "latest", "--listen", "somewhere"], 2);
    assert!(err.contains("unix:PATH or tcp:HOST:PORT"), "{err}");
    let err = env.fails(&["serve", "latest", "--listen", "tcp:0.0.0.0:10809"], 2);
    assert!(err.contains("no authentication"), "{err}");
    let err = env.fails(&["serve", "latest", "--listen", &listen, "--writable"], 2);
    assert!(err.contains("--overlay"), "{err}");
    let junk = env.path("junk.overlay");
    std::fs::write(&junk, b"not an overlay at all").unwrap();
    let err = env.fails(&["serve", "--commit-overlay", s(&junk)], 3);
    assert!(err.contains("not a usable overlay"), "{err}");
    assert!(!env.path("b.sock").exists());
}
