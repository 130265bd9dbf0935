//! The backup server end to end: a real `vbackup server` process on
//! 127.0.0.1 and real `vbackup` clients over HTTPS with a pinned
//! self-signed certificate. Full cycle with qcow2 incrementals, roles
//! (append-only backup tokens, read tokens), wrong tokens, path traversal,
//! an unpinned certificate, eight clients at once, a server killed
//! mid-upload, and fake servers that send garbage or cut replies.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use vbackup_remote::{RemoteBackend, RemoteConfig};
use vbackup_storage::{Backend, ErrorKind};
use vbackup_testkit::cli::{self, CliEnv};
use vbackup_testkit::qemu::{copy_now, guest_write, identical};
use vbackup_testkit::server::{self, Server};
use vbackup_testkit::tls::{self, Tls};
use vbackup_testkit::util::{noise, s, text, tool, walk, walk_dirs};

const MIB: u64 = 1 << 20;
const VBACKUP: &str = env!("CARGO_BIN_EXE_vbackup");

/// A server data folder with tokens, a running server and one repository.
struct Env {
    cli: CliEnv,
    server: Server,
    admin: String,
    backup: String,
    read: String,
}

/// A token for `repo` with `role` (and that label) in the data folder `data`.
fn add_token(data: &Path, repo: &str, role: &str) -> String {
    server::add_token(VBACKUP, data, repo, role)
}

impl Env {
    /// A server with admin, backup and read tokens for repository `r`,
    /// which is initialised.
    fn new() -> Self {
        Self::with_init(&["init"])
    }

    /// [`Env::new`], initialising `r` with `init` (the command and its options).
    fn with_init(init: &[&str]) -> Self {
        Self::build(init, &[], false)
    }

    /// [`Env::with_init`] with more server options; the server's stderr
    /// goes to the file `server.log` (see [`Env::log`]).
    fn with_server(init: &[&str], options: &[&str]) -> Self {
        Self::build(init, options, true)
    }

    fn build(init: &[&str], options: &[&str], log: bool) -> Self {
        let cli = CliEnv::new(VBACKUP);
        let data = cli.path("data");
        let admin = add_token(&data, "*", "admin");
        let backup = add_token(&data, "r", "backup");
        let read = add_token(&data, "r", "read");
        let log = log.then(|| cli.path("server.log"));
        let server = Server::start_with(VBACKUP, &data, options, log.as_deref());
        let env = Self {
            cli,
            server,
            admin,
            backup,
            read,
        };
        let admin = env.admin.clone();
        env.ok(&admin, init);
        env
    }

    fn data(&self) -> PathBuf {
        self.cli.path("data")
    }

    /// What the server wrote to stderr so far (with [`Env::with_server`]).
    fn log(&self) -> String {
        std::fs::read_to_string(self.path("server.log")).unwrap_or_default()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.cli.path(name)
    }

    fn command(&self, token: &str, args: &[&str]) -> Command {
        self.command_at(&self.server.url("r"), token, args)
    }

    /// [`Env::command`] for the repository URL `url`.
    fn command_at(&self, url: &str, token: &str, args: &[&str]) -> Command {
        // The local environment (passphrase "pw", cheap KDF, the cache in
        // the test's folder), less the local repository.
        let mut cmd = self.cli.cmd();
        cmd.arg("--repo")
            .arg(url)
            .args(args)
            .env_remove("VBACKUP_REPOSITORY")
            .env_remove("VBACKUP_TOKEN_FILE")
            .env("VBACKUP_TOKEN", token)
            .env("VBACKUP_SERVER_FINGERPRINT", self.server.fingerprint())
            .env("VBACKUP_RETRIES", "1");
        cmd
    }

    fn run(&self, token: &str, args: &[&str]) -> Output {
        cli::output(self.command(token, args))
    }

    fn ok(&self, token: &str, args: &[&str]) -> String {
        cli::stdout_of(self.command(token, args), args)
    }

    fn backup(&self, vm: &str, image: &Path) -> Value {
        let out = self.ok(&self.backup, &["--json", "backup", "--vm", vm, s(image)]);
        serde_json::from_str(&out).unwrap()
    }

    /// Restores disk `disk` of `snapshot` with the read token.
    fn restore(&self, snapshot: &str, disk: &str) -> PathBuf {
        let out = self.path(&format!("restore-{snapshot}"));
        self.ok(
            &self.read,
            &["restore", snapshot, "--disk", disk, "--target", s(&out)],
        );
        out.join(format!("{disk}.raw"))
    }

    fn chunk_files(&self) -> usize {
        walk(&self.data().join("repos/r/chunks"))
            .iter()
            .filter(|p| !p.file_name().unwrap().to_str().unwrap().starts_with('.'))
            .count()
    }

    fn client(&self, token: &str) -> RemoteBackend {
        RemoteBackend::new(&RemoteConfig {
            url: self.server.url("r"),
            token: token.to_string(),
            fingerprint: Some(self.server.fingerprint().to_string()),
        })
        .unwrap()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn refused(out: &Output, needle: &str) {
    assert!(!out.status.success(), "accepted: {}", text(out));
    assert!(stderr(out).contains(needle), "no {needle:?}: {}", text(out));
    assert!(!stderr(out).contains("panicked"), "{}", text(out));
}

fn raw_image(path: &Path, len: usize, seed: u64) {
    std::fs::write(path, noise(len, seed)).unwrap();
}

fn snapshot_id(json: &Value) -> String {
    json["snapshot"].as_str().unwrap().to_string()
}

#[test]
fn full_cycle_through_the_server_with_incrementals() {
    let env = Env::new();
    let image = env.path("vm.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            s(&image),
            &(32 * MIB).to_string(),
        ],
    );
    guest_write(&image, 0x11, 0, 16 * MIB);
    let full = env.backup("vm", &image);
    assert_eq!(full["backup-type"], "full", "{full}");
    copy_now(&image, &env.path("at-full.raw"));
    let chunks_after_full = env.chunk_files();
    assert_eq!(chunks_after_full, 1, "one distinct 4 MiB pattern chunk");

    // The guest changes one chunk with new data: the incremental reads
    // and sends only that one.
    guest_write(&image, 0x22, 20 * MIB, 4 * MIB);
    let inc = env.backup("vm", &image);
    assert_eq!(inc["backup-type"], "incremental", "{inc}");
    let stats = &inc["stats"];
    assert_eq!(stats["chunks-new"], 1, "{inc}");
    assert_eq!(stats["bytes-new"], 4 * MIB, "{inc}");
    assert_eq!(env.chunk_files(), chunks_after_full + 1);
    copy_now(&image, &env.path("at-inc.raw"));

    for (json, copy) in [(&full, "at-full.raw"), (&inc, "at-inc.raw")] {
        let restored = env.restore(&snapshot_id(json), "vm");
        assert!(identical(&restored, &env.path(copy)), "{json}");
    }
    let verify = env.ok(&env.read, &["verify"]);
    assert!(verify.contains("no damage found"), "{verify}");
    // Nothing but opaque objects on the server: no lease left behind.
    assert!(walk(&env.data().join("repos/r/locks")).is_empty());
    env.server.stop();
}

#[test]
fn backup_tokens_are_append_only_and_read_tokens_read() {
    let env = Env::new();
    let image = env.path("a.raw");
    raw_image(&image, 6 * MIB as usize, 1);
    let first = env.backup("a", &image);
    env.backup("a", &image);

    // Forget and prune need an admin token.
    let out = env.run(&env.backup, &["forget", "--keep-last", "1", "--prune"]);
    refused(&out, "admin token");
    let out = env.run(&env.backup, &["prune", "--grace", "0"]);
    refused(&out, "needs an admin token");
    let out = env.run(&env.read, &["--json", "backup", "--vm", "a", s(&image)]);
    refused(&out, "needs a backup (or admin) token");

    let client = env.client(&env.backup);
    let chunk = client.list("chunks/").unwrap()[0].key.clone();
    let err = client.delete(&chunk).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    let snapshot = format!("snapshots/{}", first["snapshot"].as_str().unwrap());
    let original = client.get(&snapshot).unwrap();
    let err = client.put(&snapshot, b"forged").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains("append-only"), "{err}");
    assert_eq!(client.get(&snapshot).unwrap(), original);
    // A chunk's name fixes its content: another sealing is taken as a
    // re-upload, and the stored bytes stay.
    let stored = client.get(&chunk).unwrap();
    client.put(&chunk, b"different bytes").unwrap();
    assert_eq!(client.get(&chunk).unwrap(), stored);
    for key in ["config", "keys/forged", "prune/pending-x"] {
        let err = client.put(key, b"x").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{key}: {err}");
    }
    assert!(client.rename(&chunk, "trash/x").is_err());
    // Another client's lease cannot be rewritten or removed.
    let admin = env.client(&env.admin);
    admin.put("locks/0123", b"someone's lease").unwrap();
    assert!(client.put("locks/0123", b"x").is_err());
    assert!(client.delete("locks/0123").is_err());
    assert_eq!(admin.get("locks/0123").unwrap(), b"someone's lease");
    admin.delete("locks/0123").unwrap();

    let reader = env.client(&env.read);
    assert!(reader.put("chunks/ab/new", b"x").is_err());
    assert!(reader.delete(&chunk).is_err());

    let verify = env.ok(&env.read, &["verify"]);
    assert!(verify.contains("no damage found"), "{verify}");
    // The admin token can forget and prune through the server (rename).
    env.ok(
        &env.admin,
        &["forget", "--keep-last", "1", "--prune", "--grace", "0"],
    );
    let prune = env.ok(&env.admin, &["--json", "prune", "--grace", "0"]);
    let prune: Value = serde_json::from_str(&prune).unwrap();
    assert_eq!(
        prune["exclusive"], false,
        "the server renames, so prune runs alongside backups: {prune}"
    );
    env.ok(&env.read, &["verify"]);
}

/// A repository with packs on the server: a backup token adds packs and
/// pack indexes (append-only), and the admin's prune repacks them.
#[test]
fn a_repository_with_packs_backs_up_restores_and_prunes_through_the_server() {
    let env = Env::with_init(&["init", "--pack-size", "4M"]);
    let image = env.path("a.raw");
    raw_image(&image, 12 * MIB as usize, 2);
    let first = env.backup("a", &image);
    std::fs::copy(&image, env.path("first.raw")).unwrap();
    assert_eq!(env.chunk_files(), 0, "no loose chunks");
    let packs = walk(&env.data().join("repos/r/packs")).len();
    assert!(
        (2..=4).contains(&packs),
        "{packs} packs for 3 chunks of 4 MiB"
    );
    let mut changed = std::fs::read(&image).unwrap();
    changed[..4 * MIB as usize].copy_from_slice(&noise(4 * MIB as usize, 40));
    std::fs::write(&image, &changed).unwrap();
    let second = env.backup("a", &image);
    assert_eq!(second["stats"]["chunks-new"], 1, "{second}");

    // A backup token cannot delete or replace a pack.
    let client = env.client(&env.backup);
    let pack = client.list("packs/").unwrap()[0].key.clone();
    let stored = client.get(&pack).unwrap();
    assert!(client.delete(&pack).is_err());
    // Its name is the hash of its bytes: other bytes are refused.
    let err = client.put(&pack, b"other bytes").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidKey, "{err}");
    assert_eq!(client.get(&pack).unwrap(), stored);

    let restored = env.restore(&snapshot_id(&first), "a");
    assert!(identical(&restored, &env.path("first.raw")));
    let prune = env.ok(
        &env.admin,
        &["--json", "forget", "--keep-last", "1", "--prune"],
    );
    let prune: Value = serde_json::from_str(&prune).unwrap();
    let prune = &prune["prune"];
    assert_eq!(
        prune["exclusive"], true,
        "packs are pruned exclusively: {prune}"
    );
    assert_eq!(prune["deleted-chunks"], 1, "{prune}");
    assert_eq!(prune["pack-indexes-written"], 1, "{prune}");
    let restored = env.restore(&snapshot_id(&second), "a");
    assert!(identical(&restored, &image));
    let verify = env.ok(&env.read, &["verify"]);
    assert!(verify.contains("no damage found"), "{verify}");

    // Packs larger than the server's object limit are refused at init.
    let client = RemoteBackend::new(&RemoteConfig {
        url: env.server.url("big"),
        token: env.admin.clone(),
        fingerprint: Some(env.server.fingerprint().to_string()),
    })
    .unwrap();
    let options = vbackup_core::InitOptions {
        pack_size: Some(128 << 20),
        ..vbackup_core::InitOptions::default()
    };
    let error = vbackup_core::Repository::init(Arc::new(client), Some("pw"), &options).unwrap_err();
    assert!(error.to_string().contains("too large for"), "{error}");
}

#[test]
fn wrong_missing_and_foreign_tokens_are_refused() {
    let env = Env::new();
    let out = env.run("vbk1.0000000000000000.00", &["snapshots"]);
    refused(&out, "refused the token");
    let out = env
        .command("", &["snapshots"])
        .env_remove("VBACKUP_TOKEN")
        .output()
        .unwrap();
    refused(&out, "VBACKUP_TOKEN");
    let other = add_token(&env.data(), "other", "admin");
    let out = env.run(&other, &["snapshots"]);
    refused(&out, "opens repository 'other'");
    let file = env.path("token");
    std::fs::write(&file, format!("{}\n", env.read)).unwrap();
    let out = env
        .command("", &["--token-file", s(&file), "snapshots"])
        .env_remove("VBACKUP_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // A removed token stops working at once.
    Command::new(VBACKUP)
        .args([
            "server",
            "token",
            "remove",
            "--data",
            s(&env.data()),
            "read",
        ])
        .output()
        .unwrap();
    refused(&env.run(&env.read, &["snapshots"]), "refused the token");
}

/// Sends `path` verbatim and returns the reply's status line.
fn raw_status(env: &Env, method: &str, path: &str) -> String {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        env.admin
    );
    let reply = tls::raw_exchange(
        env.server.addr(),
        env.server.fingerprint(),
        request.as_bytes(),
    )
    .unwrap();
    let reply = String::from_utf8_lossy(&reply);
    reply.lines().next().unwrap_or_default().to_string()
}

#[test]
fn path_traversal_in_names_is_refused() {
    let env = Env::new();
    std::fs::write(env.data().join("secret"), b"s").unwrap();
    for path in [
        "/v1/repos/../objects/tokens.json",
        "/v1/repos/%2e%2e/objects/tokens.json",
        "/v1/repos/%2E%2E/list",
        "/v1/repos/..%2Fdata/stat/secret",
        "/v1/repos/r%2F..%2F..%2F/objects/secret",
        "/v1/repos/.hidden/objects/config",
        "/v1/repos/r/objects/../../tokens.json",
        "/v1/repos/r/objects/%2e%2e/%2e%2e/tokens.json",
        "/v1/repos/r/objects/chunks/..%2F..%2F..%2Fsecret",
        "/v1/repos/r/stat/.tmp-x",
        "/v1/repos/r/list?prefix=../",
        "/v1/repos/r/a/b/objects/config",
    ] {
        for method in ["GET", "PUT", "DELETE"] {
            let status = raw_status(&env, method, path);
            assert!(
                status.contains(" 400 ") || status.contains(" 405 "),
                "{method} {path}: {status}"
            );
        }
    }
    assert!(raw_status(&env, "GET", "/v1/repos/r/stat/config").contains(" 200 "));
    assert!(env.data().join("secret").exists());
    assert!(env.data().join("tokens.json").exists());
    let out = env
        .command(&env.admin, &["snapshots"])
        .arg("--repo")
        .arg(format!("https://{}/..", env.server.addr()))
        .output()
        .unwrap();
    refused(&out, "invalid repository name");
}

#[test]
fn an_unpinned_self_signed_certificate_is_refused_with_its_fingerprint() {
    let env = Env::new();
    let out = env
        .command(&env.read, &["snapshots"])
        .env_remove("VBACKUP_SERVER_FINGERPRINT")
        .output()
        .unwrap();
    refused(&out, env.server.fingerprint());
    assert!(
        stderr(&out).contains("--server-fingerprint"),
        "{}",
        text(&out)
    );
    let wrong = "00".repeat(32);
    let out = env
        .command(&env.read, &["snapshots"])
        .env("VBACKUP_SERVER_FINGERPRINT", &wrong)
        .output()
        .unwrap();
    refused(&out, "not the pinned");
}

#[test]
fn eight_clients_back_up_to_one_repository_at_once() {
    let env = Env::new();
    // Six images sharing their first chunk, and two clients backing up
    // the first image again at the same time.
    let common_part = noise(4 * MIB as usize, 99);
    let mut images = Vec::new();
    for i in 0..6u64 {
        let image = env.path(&format!("vm{i}.raw"));
        let mut bytes = common_part.clone();
        bytes.extend(noise(6 * MIB as usize, 2 * i + 1));
        std::fs::write(&image, bytes).unwrap();
        images.push(image);
    }
    let jobs: Vec<(String, PathBuf)> = (0..8)
        .map(|i| (format!("vm{i}"), images[i % 6].clone()))
        .collect();
    let children: Vec<Child> = jobs
        .iter()
        .map(|(vm, image)| {
            env.command(&env.backup, &["--json", "backup", "--vm", vm, s(image)])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut snapshots = Vec::new();
    for (child, (vm, image)) in children.into_iter().zip(&jobs) {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{vm}: {}", text(&out));
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        snapshots.push((snapshot_id(&json), image.clone()));
    }
    let verify = env.ok(&env.read, &["verify"]);
    assert!(verify.contains("no damage found"), "{verify}");
    assert!(verify.contains("checked 8 snapshot(s)"), "{verify}");
    for (id, image) in &snapshots {
        let disk = image.file_stem().unwrap().to_str().unwrap();
        let restored = env.restore(id, disk);
        assert_eq!(
            std::fs::read(&restored).unwrap(),
            std::fs::read(image).unwrap()
        );
    }
    // 6 distinct tails of 2 chunks each (4 + 2 MiB) and one shared head.
    assert_eq!(env.chunk_files(), 6 * 2 + 1);
    assert!(walk(&env.data().join("repos/r/locks")).is_empty());
}

/// Bytes a relay passes from clients to the server before it holds them.
const HOLD_AFTER: u64 = 20 * MIB;

/// A TCP relay that passes bytes through, holds uploads once
/// [`HOLD_AFTER`] bytes went up, and drops every connection (and refuses
/// new ones) when `cut` is set.
struct Relay {
    addr: String,
    forwarded: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
}

fn relay(target: String) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let forwarded = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let (count, stop) = (Arc::clone(&forwarded), Arc::clone(&cut));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            if stop.load(Ordering::SeqCst) {
                continue;
            }
            let Ok(server) = TcpStream::connect(&target) else {
                continue;
            };
            let pump = |mut from: TcpStream, mut to: TcpStream, count: Option<Arc<AtomicU64>>| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 << 10];
                    from.set_read_timeout(Some(Duration::from_millis(50)))
                        .unwrap();
                    loop {
                        if stop.load(Ordering::SeqCst) {
                            let _ = to.shutdown(std::net::Shutdown::Both);
                            let _ = from.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        match from.read(&mut buf) {
                            Ok(0) => {
                                let _ = to.shutdown(std::net::Shutdown::Write);
                                return;
                            }
                            Ok(n) => {
                                // Past the limit, uploads hang until the cut.
                                while count
                                    .as_ref()
                                    .is_some_and(|c| c.load(Ordering::SeqCst) >= HOLD_AFTER)
                                    && !stop.load(Ordering::SeqCst)
                                {
                                    std::thread::sleep(Duration::from_millis(5));
                                }
                                if stop.load(Ordering::SeqCst) {
                                    continue;
                                }
                                if to.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                                if let Some(c) = &count {
                                    c.fetch_add(n as u64, Ordering::SeqCst);
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return,
                        }
                    }
                });
            };
            pump(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                Some(Arc::clone(&count)),
            );
            pump(server, client, None);
        }
    });
    Relay {
        addr,
        forwarded,
        cut,
    }
}

#[test]
fn a_server_killed_mid_upload_fails_the_backup_clearly_and_the_retry_reuses_chunks() {
    let mut env = Env::new();
    let image = env.path("big.raw");
    raw_image(&image, 64 * MIB as usize, 5);
    let relay = relay(env.server.addr().to_string());
    let url = format!("https://{}/r", relay.addr);
    let child = env
        .command(&env.backup, &["--json", "backup", "--vm", "big", s(&image)])
        .args(["--repo", &url, "--threads", "2"])
        .env("VBACKUP_RETRIES", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once 20 MiB went up (a few chunks stored, more in flight), the
    // server dies.
    while relay.forwarded.load(Ordering::SeqCst) < HOLD_AFTER {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The uploads that went through before the hold are being stored.
    for _ in 0..1000 {
        if env.chunk_files() > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    env.server.kill();
    relay.cut.store(true, Ordering::SeqCst);
    let out = child.wait_with_output().unwrap();
    refused(&out, "cannot talk to the server");
    assert!(stderr(&out).contains("attempts"), "{}", text(&out));
    let stored = env.chunk_files();
    assert!(stored > 0, "some chunks were stored before the kill");

    env.server = Server::start(VBACKUP, &env.data());
    let temporary = walk(&env.data().join("repos/r"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(".tmp-")
        })
        .count();
    assert_eq!(temporary, 0, "the restarted server removed cut uploads");
    let check = env.ok(&env.read, &["check"]);
    assert!(check.contains("no damage found"), "{check}");
    let again = env.backup("big", &image);
    let reused = again["stats"]["chunks-reused"].as_u64().unwrap();
    let new = again["stats"]["chunks-new"].as_u64().unwrap();
    assert_eq!(reused as usize, stored, "{again}");
    assert_eq!(reused + new, 16, "{again}");
    let restored = env.restore(&snapshot_id(&again), "big");
    assert_eq!(
        std::fs::read(restored).unwrap(),
        std::fs::read(&image).unwrap()
    );
    env.ok(&env.read, &["verify"]);
}

/// A TLS server that answers every request with `reply(request line)`,
/// using a certificate made like the real server's.
fn fake_server(reply: fn(&str) -> Vec<u8>) -> (String, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let identity = vbackup_server::cert::load_or_create(dir.path(), None, None).unwrap();
    let fingerprint = identity.fingerprint.clone();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            let config = Arc::clone(&config);
            std::thread::spawn(move || {
                let connection = rustls::ServerConnection::new(config).unwrap();
                let mut stream = rustls::StreamOwned::new(connection, tcp);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                let mut body = vec![0u8; length];
                let _ = stream.read_exact(&mut body);
                let line = head.lines().next().unwrap_or_default().to_string();
                let _ = stream.write_all(&reply(&line));
                let _ = stream.flush();
                stream.conn.send_close_notify();
                let _ = stream.flush();
            });
        }
    });
    (addr, fingerprint, dir)
}

fn fake_client(addr: &str, fingerprint: &str) -> vbackup_storage::RetryBackend<RemoteBackend> {
    std::env::set_var("VBACKUP_RETRIES", "1");
    vbackup_remote::open(&RemoteConfig {
        url: format!("https://{addr}/r"),
        token: "vbk1.x.y".into(),
        fingerprint: Some(fingerprint.to_string()),
    })
    .unwrap()
}

fn hostile(line: &str) -> Vec<u8> {
    let body: &[u8] = if line.contains("/list") {
        b"{\"key\":\"chunks/a\",\"size\":1}\nthis is not json\n"
    } else if line.contains("/stat/") {
        b"{\"key\": 12}"
    } else if line.contains("/missing") {
        b"{\"missing\":[\"chunks/never-asked\"]}"
    } else if line.contains("offset=") {
        // A range of 10 bytes of a 100-byte object asked, 5 sent.
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nvbackup-object-size: 100\r\n\r\n01234"
            .to_vec();
    } else {
        // Announces 1000 bytes, sends 10, closes.
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789".to_vec();
    };
    let mut reply =
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    reply.extend_from_slice(body);
    reply
}

#[test]
fn a_server_that_sends_garbage_or_cut_replies_gives_clear_errors() {
    let (addr, fingerprint, _dir) = fake_server(hostile);
    let client = fake_client(&addr, &fingerprint);
    let err = client.get("config").unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    assert!(err.to_string().contains("attempts"), "{err}");
    let err = client.get_range("chunks/ab/x", 0, 10).unwrap_err();
    assert!(err.to_string().contains("range"), "{err}");
    let err = client.list("chunks/").unwrap_err();
    assert!(err.to_string().contains("malformed listing line"), "{err}");
    let err = client.stat("config").unwrap_err();
    assert!(err.to_string().contains("malformed reply"), "{err}");
    let err = client.missing(&["chunks/ab/c".to_string()]).unwrap_err();
    assert!(err.to_string().contains("not asked"), "{err}");

    // Not HTTP at all.
    let (addr, fingerprint, _dir2) = fake_server(|_| b"garbage garbage\r\n\r\n".to_vec());
    let out = Command::new(VBACKUP)
        .args(["--repo", &format!("https://{addr}/r"), "snapshots"])
        .env("VBACKUP_TOKEN", "vbk1.x.y")
        .env("VBACKUP_SERVER_FINGERPRINT", &fingerprint)
        .env("VBACKUP_RETRIES", "1")
        .env("VBACKUP_PASSWORD", "pw")
        .output()
        .unwrap();
    refused(&out, "cannot talk to the server");
    // A cut reply through the whole CLI.
    let (addr, fingerprint, _dir3) = fake_server(hostile);
    let out = Command::new(VBACKUP)
        .args(["--repo", &format!("https://{addr}/r"), "snapshots"])
        .env("VBACKUP_TOKEN", "vbk1.x.y")
        .env("VBACKUP_SERVER_FINGERPRINT", &fingerprint)
        .env("VBACKUP_RETRIES", "1")
        .env("VBACKUP_PASSWORD", "pw")
        .output()
        .unwrap();
    refused(&out, "truncated");
}

/// Requests other than `whoami` that reached [`unknown_role_server`].
static PAST_WHOAMI: AtomicU64 = AtomicU64::new(0);

/// A server whose `whoami` names a role this client does not know.
fn unknown_role_server(line: &str) -> Vec<u8> {
    if !line.contains("/whoami") {
        PAST_WHOAMI.fetch_add(1, Ordering::SeqCst);
        return b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_vec();
    }
    let body = br#"{"id":"0123abcd","repo":"r","role":"superuser"}"#;
    let mut reply =
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    reply.extend_from_slice(body);
    reply
}

#[test]
fn regression_a_whoami_reply_with_an_unknown_role_is_refused_not_taken_for_admin() {
    let (addr, fingerprint, _dir) = fake_server(unknown_role_server);
    let url = format!("https://{addr}/r");
    for command in [
        &["prune"][..],
        &["repair"],
        &["unlock"],
        &["forget", "--keep-last", "1"],
    ] {
        let out = Command::new(VBACKUP)
            .arg("--repo")
            .arg(&url)
            .args(command)
            .env("VBACKUP_TOKEN", "vbk1.x.y")
            .env("VBACKUP_SERVER_FINGERPRINT", &fingerprint)
            .env("VBACKUP_RETRIES", "1")
            .env("VBACKUP_PASSWORD", "pw")
            .output()
            .unwrap();
        refused(&out, "unknown role \"superuser\"");
        refused(&out, "the roles are read, backup and admin");
        refused(&out, "so the command was not started");
        refused(&out, &url);
    }
    assert_eq!(
        PAST_WHOAMI.load(Ordering::SeqCst),
        0,
        "the CLI went on past whoami with a role it does not know"
    );
    // The client library refuses the reply too.
    let client = RemoteBackend::new(&RemoteConfig {
        url,
        token: "vbk1.x.y".into(),
        fingerprint: Some(fingerprint),
    })
    .unwrap();
    let err = client.whoami().unwrap_err();
    assert!(err.to_string().contains("unknown role"), "{err}");
}

#[test]
fn an_unreachable_server_is_reported_after_retries() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(VBACKUP)
        .args([
            "--repo",
            &format!("https://127.0.0.1:{port}/r"),
            "snapshots",
        ])
        .env("VBACKUP_TOKEN", "vbk1.x.y")
        .env("VBACKUP_SERVER_FINGERPRINT", "00".repeat(32))
        .env("VBACKUP_RETRIES", "1")
        .output()
        .unwrap();
    refused(&out, "cannot talk to the server");
    assert!(stderr(&out).contains("2 attempts"), "{}", text(&out));
}

/// The server's storage fills up during a backup (a small tmpfs in a
/// private mount namespace): the client says so (507 → no space), nothing
/// is recorded, and once there is room the retried backup reuses what
/// was stored.
#[test]
fn a_full_disk_on_the_server_fails_the_backup_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("data.raw");
    raw_image(&image, 24 << 20, 9);
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let script = format!(
        r#"set -u
mount -t tmpfs -o size=40m tmpfs {mnt} || exit 99
D={mnt}/data
ADMIN=$({bin} server token add --data $D --repo '*' --role admin 2>/dev/null)
BK=$({bin} server token add --data $D --repo r --role backup 2>/dev/null)
{bin} server --listen 127.0.0.1:0 --data $D > {out}/banner &
SERVER=$!
trap 'kill $SERVER 2>/dev/null' EXIT
for i in $(seq 200); do grep -q listening {out}/banner && break; sleep 0.05; done
ADDR=$(sed -n 's/^listening on https:\/\///p' {out}/banner)
export VBACKUP_SERVER_FINGERPRINT=$(sed -n 's/.*fingerprint \([0-9a-f]*\).*/\1/p' {out}/banner | head -1)
export VBACKUP_REPOSITORY=https://$ADDR/r VBACKUP_RETRIES=1
VBACKUP_TOKEN=$ADMIN {bin} init >/dev/null || exit 98
head -c 28M /dev/zero > {mnt}/filler
VBACKUP_TOKEN=$BK {bin} backup --vm full {image} 2>{out}/backup.err; echo "backup-exit=$?"
VBACKUP_TOKEN=$BK {bin} snapshots | tail -1
rm {mnt}/filler
VBACKUP_TOKEN=$BK {bin} --json backup --vm full {image} >{out}/retry.json 2>{out}/retry.err; echo "retry-exit=$?"
VBACKUP_TOKEN=$BK {bin} verify >/dev/null 2>&1; echo "verify-exit=$?"
"#,
        mnt = s(&mnt),
        out = s(dir.path()),
        bin = VBACKUP,
        image = s(&image)
    );
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .env("VBACKUP_PASSWORD", "pw")
        .env("VBACKUP_KDF_MEMORY_KIB", "1024")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    let err = std::fs::read_to_string(dir.path().join("backup.err")).unwrap();
    assert!(stdout.contains("backup-exit=1"), "{stdout}\n{err}");
    assert!(err.contains("no space left"), "{err}");
    assert!(!err.contains("attempts"), "not retried: {err}");
    assert!(stdout.contains("0 snapshot(s)"), "{stdout}");
    let retry = std::fs::read_to_string(dir.path().join("retry.json")).unwrap();
    let retry_err = std::fs::read_to_string(dir.path().join("retry.err")).unwrap();
    assert!(
        stdout.contains("retry-exit=0") && stdout.contains("verify-exit=0"),
        "{stdout}\n{retry}\n{retry_err}"
    );
    let retry: Value = serde_json::from_str(&retry).unwrap();
    assert!(
        retry["stats"]["chunks-reused"].as_u64().unwrap() > 0,
        "{retry}"
    );
}

// ---- Issue 10: attacks on the server that must fail ----

/// A TLS connection to the server that fails a test rather than hang.
fn connect(env: &Env) -> Tls {
    let stream = tls::raw_connect(env.server.addr(), env.server.fingerprint()).unwrap();
    stream
        .sock
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Reads what the server sends until it has sent a whole reply head and
/// `body_bytes` more, or closes, or goes quiet (the read timeout).
fn read_reply(stream: &mut Tls) -> String {
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&reply);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .and_then(|n| n.trim().parse::<usize>().ok());
            if length.is_some_and(|n| body.len() >= n) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&reply).into_owned()
}

fn head(method: &str, path: &str, token: Option<&str>, length: u64) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n")
}

/// The id in a `vbk1.<id>.<secret>` token.
fn token_id(token: &str) -> &str {
    token.split('.').nth(1).unwrap()
}

#[test]
fn attack_unauthenticated_huge_body_is_answered_before_it_is_read() {
    let env = Env::new();
    for (method, path) in [
        ("POST", "/v1/repos/r/missing"),
        ("POST", "/v1/repos/r/rename"),
        ("PUT", "/v1/repos/r/objects/chunks/ab/abcd"),
    ] {
        for token in [None, Some("vbk1.0000000000000000.00")] {
            let mut stream = connect(&env);
            stream
                .write_all(head(method, path, token, 66_000_000).as_bytes())
                .unwrap();
            // A sliver of the 66 MB: the refusal must come without the rest.
            stream.write_all(&[b'['; 64 << 10]).unwrap();
            stream.flush().unwrap();
            let reply = read_reply(&mut stream);
            assert!(
                reply.starts_with("HTTP/1.1 401"),
                "{method} {path} {token:?}: {reply:?}"
            );
        }
    }
    // A read token may not rename: refused before the body too.
    let mut stream = connect(&env);
    let request = head("POST", "/v1/repos/r/rename", Some(&env.read), 66_000_000);
    stream.write_all(request.as_bytes()).unwrap();
    stream.flush().unwrap();
    assert!(read_reply(&mut stream).starts_with("HTTP/1.1 403"));
}

#[test]
fn attack_oversized_json_body_gets_413() {
    let env = Env::new();
    for path in ["/v1/repos/r/missing", "/v1/repos/r/rename"] {
        let mut stream = connect(&env);
        let request = head("POST", path, Some(&env.admin), 2 * MIB);
        stream.write_all(request.as_bytes()).unwrap();
        stream.flush().unwrap();
        let reply = read_reply(&mut stream);
        assert!(reply.starts_with("HTTP/1.1 413"), "{path}: {reply}");
        assert!(reply.contains("larger than the 1048576 bytes"), "{reply}");
    }
    // Chunked, without a length: cut off once past the limit.
    let mut stream = connect(&env);
    let request = format!(
        "POST /v1/repos/r/missing HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        env.admin
    );
    stream.write_all(request.as_bytes()).unwrap();
    let piece = vec![b' '; 64 << 10];
    for _ in 0..20 {
        let sent = stream
            .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
            .and_then(|()| stream.write_all(&piece))
            .and_then(|()| stream.write_all(b"\r\n"))
            .and_then(|()| stream.flush());
        if sent.is_err() {
            break;
        }
    }
    let reply = read_reply(&mut stream);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // Normal chunk-presence queries still work.
    let client = env.client(&env.read);
    assert_eq!(
        client.missing(&["chunks/ab/x".to_string()]).unwrap().len(),
        1
    );
}

/// Sends `piece` every 100 ms until the server answers or closes; returns
/// what it sent and the reply.
fn trickle(stream: &mut Tls, piece: &[u8], most: usize) -> (usize, String) {
    stream
        .sock
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut reply = Vec::new();
    for sent in 0..most {
        if stream
            .write_all(piece)
            .and_then(|()| stream.flush())
            .is_err()
        {
            return (sent, String::from_utf8_lossy(&reply).into_owned());
        }
        match stream.read(&mut buf) {
            Ok(0) => return (sent, String::from_utf8_lossy(&reply).into_owned()),
            Ok(n) => {
                reply.extend_from_slice(&buf[..n]);
                stream
                    .sock
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let _ = stream.read_to_end(&mut reply);
                return (sent, String::from_utf8_lossy(&reply).into_owned());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (sent, String::from_utf8_lossy(&reply).into_owned()),
        }
    }
    (most, String::from_utf8_lossy(&reply).into_owned())
}

#[test]
fn attack_slow_body_and_slow_headers_are_cut_off() {
    let env = Env::with_server(&["init"], &["--timeout", "2s"]);
    // A body of 2000 bytes sent one byte per 100 ms would take 200 s;
    // each byte comes well within the timeout, the whole body does not.
    let mut stream = connect(&env);
    let request = head(
        "PUT",
        "/v1/repos/r/objects/snapshots/slow",
        Some(&env.backup),
        2000,
    );
    stream.write_all(request.as_bytes()).unwrap();
    let (sent, reply) = trickle(&mut stream, b"x", 2000);
    assert!(sent < 2000, "the server waited for the whole slow body");
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert!(reply.contains("too slowly"), "{reply}");
    // Headers that never end (slowloris): the connection is closed.
    let mut stream = connect(&env);
    stream
        .write_all(b"GET /v1/repos/r/whoami HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    let (sent, _) = trickle(&mut stream, b"X-Slow: 1\r\n", 2000);
    assert!(sent < 2000, "the server waited for endless headers");
    // An idle connection is closed too.
    let mut stream = connect(&env);
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Ok(_) => panic!("the server sent bytes on an idle connection"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "an idle connection stayed open: {e}"
        ),
    }
    // A reader that asks for a large object and stops reading is cut off
    // (more than the socket buffers hold, so the server's writes stall).
    let big = noise(40 * MIB as usize, 6);
    env.client(&env.admin).put("snapshots/big", &big).unwrap();
    let mut stream = connect(&env);
    let request = format!(
        "GET /v1/repos/r/objects/snapshots/big HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
        env.read
    );
    stream.write_all(request.as_bytes()).unwrap();
    stream.flush().unwrap();
    std::thread::sleep(Duration::from_secs(6));
    stream
        .sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    assert!(reply.starts_with(b"HTTP/1.1 200"));
    assert!(
        reply.len() < big.len(),
        "a stalled reader got the whole reply"
    );
    // Normal requests are served.
    let read = env.client(&env.read);
    assert_eq!(read.get("snapshots/big").unwrap(), big);
}

#[test]
fn attack_connection_flood_is_capped() {
    let env = Env::with_server(&["init"], &["--max-connections", "2"]);
    let whoami = |env: &Env| {
        let request = format!(
            "GET /v1/repos/r/whoami HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            env.read
        );
        tls::raw_exchange(
            env.server.addr(),
            env.server.fingerprint(),
            request.as_bytes(),
        )
        .map(|r| String::from_utf8_lossy(&r).into_owned())
        .unwrap_or_default()
    };
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        whoami(&env).starts_with("HTTP/1.1 200")
    });
    assert!(up, "the server does not serve");
    // Two silent connections hold both places: a third is closed at once.
    let hogs: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(env.server.addr()).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(whoami(&env), "", "a connection over the cap was served");
    // Logged before the connection is closed.
    assert!(
        env.log().contains("refused: already serving 2"),
        "{}",
        env.log()
    );
    drop(hogs);
    // Their places free up as soon as they close.
    let served = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        whoami(&env).starts_with("HTTP/1.1 200")
    });
    assert!(served, "the server did not serve again after the flood");
}

#[test]
fn attack_quota_refuses_uploads_over_it() {
    let env = Env::new();
    let out = Command::new(VBACKUP)
        .args(["--json", "server", "token", "add", "--data", s(&env.data())])
        .args([
            "--repo",
            "r",
            "--role",
            "backup",
            "--label",
            "small-host",
            "--quota",
            "1M",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["quota"], MIB, "{json}");
    let token = json["token"].as_str().unwrap().to_string();
    let client = env.client(&token);
    let part = noise(600 << 10, 3);
    client.put("snapshots/q1", &part).unwrap();
    // The same object again adds nothing.
    client.put("snapshots/q1", &part).unwrap();
    let err = client.put("snapshots/q2", &part).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    let message = err.to_string();
    assert!(message.contains("small-host (token"), "{message}");
    assert!(
        message.contains("quota") && message.contains("1048576"),
        "{message}"
    );
    assert!(client.stat("snapshots/q2").unwrap().is_none());
    // Other tokens are not limited, and the count survives a restart.
    env.client(&env.backup).put("snapshots/q3", &part).unwrap();
    let used = std::fs::read_to_string(env.data().join("usage").join(token_id(&token))).unwrap();
    assert_eq!(used, (600u64 << 10).to_string());
}

/// Writes the token file `original` without the token labelled `label`,
/// leaving a syntax error when `broken` (a doubled comma, as a hand edit
/// might).
fn drop_token_by_hand(data: &Path, original: &str, label: &str, broken: bool) {
    let path = data.join("tokens.json");
    let mut file: Value = serde_json::from_str(original).unwrap();
    file["tokens"]
        .as_array_mut()
        .unwrap()
        .retain(|t| t["label"] != label);
    let mut text = serde_json::to_string_pretty(&file).unwrap();
    if broken {
        text = text.replacen("\"label\": \"admin\",", "\"label\": \"admin\",,", 1);
    }
    std::fs::write(&path, text).unwrap();
}

#[test]
fn attack_broken_token_file_fails_closed_and_loudly() {
    let env = Env::with_server(&["init"], &[]);
    env.ok(&env.read, &["snapshots"]);
    let original = std::fs::read_to_string(env.data().join("tokens.json")).unwrap();
    // The operator revokes the read token by hand and breaks the file.
    drop_token_by_hand(&env.data(), &original, "read", true);
    for token in [&env.read, &env.admin, &env.backup] {
        let out = env.run(token, &["snapshots"]);
        refused(&out, "token file is broken");
    }
    let log = env.log();
    assert!(
        log.contains("token file is broken") && log.contains("line"),
        "{log}"
    );
    // Fixed: served again, and the revoked token stays revoked.
    drop_token_by_hand(&env.data(), &original, "read", false);
    env.ok(&env.admin, &["snapshots"]);
    refused(
        &env.run(&env.read, &["snapshots"]),
        "unknown or wrong token",
    );
    assert!(env.log().contains("readable again"), "{}", env.log());
    // A server does not start on a broken file.
    drop_token_by_hand(&env.data(), &original, "read", true);
    let mut child = Command::new(VBACKUP)
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--data",
            s(&env.data()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        child.try_wait().unwrap().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(exited, "the server started with a broken token file");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).contains("tokens.json") && stderr(&out).contains("line"),
        "{}",
        text(&out)
    );
}

#[test]
fn attack_loose_chunks_in_a_packed_repository_are_refused() {
    let env = Env::with_init(&["init", "--pack-size", "4M"]);
    let image = env.path("a.raw");
    raw_image(&image, 6 * MIB as usize, 4);
    env.backup("a", &image);
    let backup = env.client(&env.backup);
    let pack = backup.list("packs/").unwrap()[0].key.clone();
    // Junk under a chunk name would shadow the packed chunk of that name.
    let junk = format!("chunks/ab/{}", "ab".repeat(32));
    for token in [&env.backup, &env.admin] {
        let err = env.client(token).put(&junk, b"junk").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
        assert!(
            err.to_string().contains("keeps its chunks in packs"),
            "{err}"
        );
    }
    assert_eq!(env.chunk_files(), 0);
    // A pack must be named by the hash of its bytes.
    let bytes = backup.get(&pack).unwrap();
    let forged = format!("packs/00/{}", "00".repeat(32));
    for (key, body) in [
        (forged.as_str(), &bytes[..]),
        (pack.as_str(), b"junk".as_slice()),
    ] {
        let err = backup.put(key, body).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidKey, "{err}");
        assert!(err.to_string().contains("BLAKE3"), "{err}");
    }
    backup.put(&pack, &bytes).unwrap();
    assert_eq!(backup.get(&pack).unwrap(), bytes);
    let verify = env.ok(&env.read, &["verify"]);
    assert!(verify.contains("no damage found"), "{verify}");
}

#[test]
fn attack_refusals_name_the_token_that_wrote_the_object() {
    let env = Env::new();
    let image = env.path("a.raw");
    raw_image(&image, 2 * MIB as usize, 5);
    let snapshot = format!("snapshots/{}", snapshot_id(&env.backup("a", &image)));
    let admin = env.client(&env.admin);
    let backup_id = token_id(&env.backup);
    let wrote = format!("backup (token {backup_id})");
    assert_eq!(
        admin.stat(&snapshot).unwrap().unwrap().writer,
        Some(wrote.clone())
    );
    // Content-addressed objects carry no writer.
    let chunk = admin.list("chunks/").unwrap()[0].key.clone();
    assert_eq!(admin.stat(&chunk).unwrap().unwrap().writer, None);
    // A lease of one backup token, refused to another, names its writer.
    let other = add_token(&env.data(), "r", "backup");
    env.client(&env.backup)
        .put("locks/lease1", b"lease")
        .unwrap();
    let err = env.client(&other).put("locks/lease1", b"mine").unwrap_err();
    assert!(
        err.to_string().contains(&format!("written by {wrote}")),
        "{err}"
    );
    let err = env.client(&other).delete("locks/lease1").unwrap_err();
    assert!(
        err.to_string().contains(&format!("written by {wrote}")),
        "{err}"
    );
    let err = env.client(&other).put(&snapshot, b"forged").unwrap_err();
    assert!(
        err.to_string().contains(&format!("written by {wrote}")),
        "{err}"
    );
    // Admin writes are recorded; a move keeps the writer of the bytes.
    admin.put("policy", b"{}").unwrap();
    let admin_id = token_id(&env.admin);
    assert_eq!(
        admin.stat("policy").unwrap().unwrap().writer,
        Some(format!("admin (token {admin_id})"))
    );
    let damaged = format!("damaged/{snapshot}");
    admin.rename(&snapshot, &damaged).unwrap();
    assert_eq!(admin.stat(&damaged).unwrap().unwrap().writer, Some(wrote));
    let moved = format!("damaged/{chunk}");
    admin.rename(&chunk, &moved).unwrap();
    assert_eq!(
        admin.stat(&moved).unwrap().unwrap().writer,
        Some(format!("admin (token {admin_id})"))
    );
    // A removed token is still named.
    Command::new(VBACKUP)
        .args([
            "server",
            "token",
            "remove",
            "--data",
            s(&env.data()),
            "backup",
        ])
        .output()
        .unwrap();
    let writer = admin.stat(&damaged).unwrap().unwrap().writer.unwrap();
    assert_eq!(writer, format!("token {backup_id} (since removed)"));
}

#[test]
fn attack_junk_snapshot_from_a_backup_token_is_named_with_its_token_by_prune_and_cleared_by_repair()
{
    let env = Env::new();
    let image = env.path("a.raw");
    raw_image(&image, 2 * MIB as usize, 6);
    env.backup("a", &image);
    // A backup token holder without the passphrase uploads junk as a manifest.
    env.client(&env.backup)
        .put(&format!("snapshots/{}", "ab".repeat(32)), b"junk")
        .unwrap();
    let out = env.run(&env.admin, &["prune", "--grace", "0s"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let writer = format!("by backup (token {})", token_id(&env.backup));
    assert!(stderr.contains(&writer), "{stderr}");
    assert!(stderr.contains("vbackup repair"), "{stderr}");
    env.ok(&env.admin, &["repair"]);
    env.ok(&env.admin, &["prune", "--grace", "0s"]);
}

#[test]
fn attack_poisoned_reuse_through_the_server_fails_the_backup_until_repair_clears_the_junk() {
    let env = Env::new();
    let old = env.path("old.raw");
    let new = env.path("new.raw");
    raw_image(&old, 2 * MIB as usize, 21);
    raw_image(&new, 2 * MIB as usize, 22);
    env.backup("a", &old);
    env.backup("a", &new);
    let admin = env.client(&env.admin);
    let chunks = |b: &RemoteBackend| -> std::collections::BTreeSet<String> {
        b.list("chunks/")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect()
    };
    let before = chunks(&admin);
    env.ok(&env.admin, &["forget", "--keep-last", "1"]);
    env.ok(&env.admin, &["prune", "--grace", "0s"]);
    env.ok(&env.admin, &["prune", "--grace", "0s"]);
    let freed: Vec<String> = before.difference(&chunks(&admin)).cloned().collect();
    assert!(!freed.is_empty());
    // A backup token without the passphrase fills the freed names with junk.
    for key in &freed {
        env.client(&env.backup).put(key, b"junk").unwrap();
    }
    // The old data comes back: the backup must not reuse the junk.
    let out = env.run(&env.backup, &["backup", "--vm", "a", s(&old)]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not authenticate"), "{stderr}");
    assert!(stderr.contains("vbackup repair"), "{stderr}");
    env.ok(&env.admin, &["repair"]);
    let snapshot = snapshot_id(&env.backup("a", &old));
    let restored = env.restore(&snapshot, "old");
    assert_eq!(
        std::fs::read(restored).unwrap(),
        std::fs::read(&old).unwrap()
    );
}

#[test]
fn attack_local_user_reads_the_servers_data_folder_everything_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let image = env.path("a.raw");
    raw_image(&image, MIB as usize, 31);
    env.backup("a", &image);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let data = env.data();
    for dir in walk_dirs(&data) {
        assert_eq!(
            mode(&dir) & 0o077,
            0,
            "{} is {:o}",
            dir.display(),
            mode(&dir)
        );
    }
    let tokens = data.join("tokens.json");
    assert_eq!(mode(&tokens) & 0o077, 0, "{}", tokens.display());
}

#[test]
fn a_server_url_with_a_trailing_slash_names_the_same_repository() {
    let env = Env::new();
    let image = env.path("disk.raw");
    raw_image(&image, MIB as usize, 11);
    let slash = format!("{}/", env.server.url("r"));
    let out = env
        .command_at(
            &slash,
            &env.backup,
            &["--json", "backup", "--vm", "web1", s(&image)],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let listed = env.ok(&env.read, &["--json", "snapshots"]);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let out = env
        .command_at(&slash, &env.admin, &["--json", "snapshots"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // A URL without a name is refused, naming it, with no empty object name.
    let bare = format!("https://{}/", env.server.addr());
    let out = env
        .command_at(&bare, &env.read, &["snapshots"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(err.contains(&format!("repository URL '{bare}'")), "{err}");
    assert!(!err.contains("(object '')"), "{err}");
}

#[test]
fn a_token_for_another_repository_says_which_repository_it_opens() {
    let env = Env::new();
    let other = add_token(&env.data(), "other", "admin");
    let url = env.server.url("r");
    for args in [&["snapshots"][..], &["prune", "--dry-run"]] {
        let out = env.run(&other, args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(
            err.contains("this token opens repository 'other', not 'r'"),
            "{args:?}: {err}"
        );
        assert!(
            err.contains("vbackup server token add --repo r"),
            "{args:?}: {err}"
        );
        assert!(err.contains(&url), "{args:?}: the URL is not named: {err}");
        assert!(!err.contains("(object '')"), "{args:?}: {err}");
        assert!(!err.contains("role does not allow"), "{args:?}: {err}");
    }
}
