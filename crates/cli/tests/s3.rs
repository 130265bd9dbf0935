//! End-to-end tests of S3 repositories against real Garage servers on
//! loopback: the full backup cycle, a cluster node killed during a backup,
//! and bad input (wrong credentials, no server, no bucket, connections cut
//! mid-upload, garbage and truncated replies). Garage must be installed
//! (`cargo install garage --locked`); the tests fail without it.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use vbackup_core::format::lifecycle::LockKind;
use vbackup_core::{Lease, LeaseTiming, Repository};
use vbackup_testkit::cli::{self, CliEnv};
use vbackup_testkit::garage::{self, Garage};
use vbackup_testkit::qemu::{copy_now, guest_write, identical};
use vbackup_testkit::util::{noise, s, text, tool, walk};

const MIB: u64 = 1 << 20;

/// A test folder and the way to run vbackup against one S3 repository.
struct Env {
    cli: CliEnv,
    repo: String,
    garage: Option<Garage>,
    extra_env: Vec<(String, String)>,
}

impl Env {
    /// A repository under `prefix` of the Garage's bucket (not initialised).
    fn new(garage: Garage, prefix: &str) -> Self {
        Self {
            cli: CliEnv::new(env!("CARGO_BIN_EXE_vbackup")),
            repo: garage.repo(prefix),
            garage: Some(garage),
            extra_env: Vec::new(),
        }
    }

    /// For fake servers: dummy credentials, one retry.
    fn without_server() -> Self {
        let vars = [
            ("AWS_ACCESS_KEY_ID", "GK0000"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_REGION", garage::REGION),
            ("VBACKUP_RETRIES", "1"),
        ];
        Self {
            cli: CliEnv::new(env!("CARGO_BIN_EXE_vbackup")),
            repo: String::new(),
            garage: None,
            extra_env: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn garage(&self) -> &Garage {
        self.garage.as_ref().unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.cli.path(name)
    }

    /// vbackup with the local environment (passphrase "pw", cheap KDF, the
    /// cache in the test's folder) on the S3 repository.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.cli.command(args);
        cmd.env("VBACKUP_REPOSITORY", &self.repo)
            .env("VBACKUP_RETRIES", "3");
        if let Some(garage) = &self.garage {
            garage.credentials(&mut cmd);
        }
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        cli::output(self.command(args))
    }

    fn ok(&self, args: &[&str]) -> String {
        cli::stdout_of(self.command(args), args)
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

fn stat(json: &Value, name: &str) -> u64 {
    json["stats"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no stats.{name} in {json}"))
}

#[test]
fn full_and_incremental_backups_restore_identical_from_garage() {
    let env = Env::new(Garage::single(), "repos/cycle");
    let init = env.ok(&["init"]);
    assert!(init.contains("packs of about 16.0 MiB"), "{init}");
    let image = noisy_qcow2(env.cli.dir(), "vm", 64 * MIB, 40 * MIB, 1);

    let admin = env.garage().admin_port(0);
    let puts_before = s3_requests(admin, "PutObject");
    let full = env.backup("web", &image, &[]);
    assert_eq!(full["backup-type"], "full");
    assert!(stat(&full, "chunks-new") > 0, "{full}");
    // One PUT per 16 MiB pack (not per chunk), plus the pack index, the
    // lease, the disk index and the manifest.
    let puts = s3_requests(admin, "PutObject") - puts_before;
    let packs = stat(&full, "bytes-stored").div_ceil(16 * MIB);
    assert!(puts <= packs + 5, "{puts} PUTs: {full}");
    assert!(puts < stat(&full, "chunks-new"), "{puts} PUTs: {full}");
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

    // The same bytes again, read in full: every chunk is already stored,
    // but for the one the incremental stored as a delta (its 64 KiB
    // write), which a full backup stores whole once.
    let puts_before = s3_requests(admin, "PutObject");
    let again = env.backup("web", &image, &["--type", "full"]);
    let new = stat(&again, "chunks-new");
    assert!(new <= 1, "{again}");
    let puts = s3_requests(admin, "PutObject") - puts_before;
    assert!(
        puts <= 4 + 2 * new,
        "{puts} PUTs for a backup storing {new} chunk(s): {again}"
    );
    assert!(stat(&again, "chunks-reused") > 0, "{again}");

    let inc_id = inc["snapshot"].as_str().unwrap();
    // The restore reads neighbouring chunks of a pack with one request.
    let gets_before = s3_requests(admin, "GetObject");
    assert!(identical(
        &env.path("at-full.raw"),
        &env.restore(&full_id, "vm")
    ));
    let gets = s3_requests(admin, "GetObject") - gets_before;
    // Config, key, 3 manifests, the disk index, 2 pack indexes: 8; then
    // one ranged read per pack.
    assert!(
        gets <= packs + 8,
        "{gets} GETs to restore {} chunks in {packs} packs",
        stat(&full, "chunks-new")
    );
    assert!(identical(
        &env.path("at-inc.raw"),
        &env.restore(inc_id, "vm")
    ));
    let verify = env.ok(&["verify"]);
    assert!(verify.contains("no damage found"), "{verify}");

    let latest = env.restore("latest", "vm");
    assert!(identical(&env.path("at-inc.raw"), &latest));
}

/// Snapshot manifests and indexes are kept in a local cache, so a backup
/// does not fetch them again; check reads the storage itself.
#[test]
fn metadata_is_cached_locally_and_check_still_reads_the_storage() {
    let env = Env::new(Garage::single(), "repos/cache");
    env.ok(&["init"]);
    let image = noisy_qcow2(env.cli.dir(), "vm", 32 * MIB, 16 * MIB, 21);
    let first = env.backup("web", &image, &[]);
    for _ in 0..3 {
        env.backup("web", &image, &["--type", "full"]);
    }
    let cached = walk(&env.path("cache"));
    let count = |folder: &str| {
        cached
            .iter()
            .filter(|p| p.to_string_lossy().contains(folder))
            .count()
    };
    assert_eq!(count("/snapshots/"), 4, "{cached:?}");
    assert!(
        count("/packindex/") >= 1 && count("/indexes/") >= 1,
        "{cached:?}"
    );

    let admin = env.garage().admin_port(0);
    let gets = |extra: &[&str]| {
        let before = s3_requests(admin, "GetObject");
        let mut args = extra.to_vec();
        args.extend(["snapshots"]);
        env.ok(&args);
        s3_requests(admin, "GetObject") - before
    };
    let with_cache = gets(&[]);
    let without = gets(&["--no-cache"]);
    // Config and key either way; the 4 manifests only without the cache.
    assert!(
        with_cache + 4 <= without,
        "{with_cache} GETs cached, {without} without"
    );

    // An index damaged on the storage is found by check, though the cache
    // holds a good copy.
    let index = first["disks"][0]["index"].as_str().unwrap().to_string();
    engine(&env).backend().put(&index, b"damaged").unwrap();
    let out = env.run(&["check"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&index), "{}", text(&out));
}

/// The repository at `env.repo` opened in this process, to hold locks the
/// way a running backup or prune would.
fn engine(env: &Env) -> Repository {
    let garage = env.garage();
    let credentials = vbackup_s3::S3Credentials {
        access_key_id: garage.key_id.clone(),
        secret_access_key: garage.secret.clone(),
        region: garage::REGION.to_string(),
    };
    let backend = vbackup_s3::open_with(&env.repo, Some(&credentials)).unwrap();
    Repository::open(Arc::new(backend), || Ok(Some("pw".into()))).unwrap()
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn num(json: &Value, name: &str) -> u64 {
    json[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {json}"))
}

/// Plain S3 cannot rename: prune takes the repository to itself. It is
/// refused while a backup runs, refuses backups while it runs, and deletes
/// exactly what no snapshot needs.
#[test]
fn prune_reclaims_space_on_s3_with_the_repository_to_itself() {
    let env = Env::new(Garage::single(), "repos/prune");
    env.ok(&["init"]);
    let image = noisy_qcow2(env.cli.dir(), "vm", 32 * MIB, 24 * MIB, 5);
    env.backup("web", &image, &[]);
    guest_write(&image, 0x31, 0, 4 * MIB);
    env.backup("web", &image, &[]);
    guest_write(&image, 0x32, 12 * MIB, 4 * MIB);
    env.backup("web", &image, &[]);
    copy_now(&image, &env.path("at-last.raw"));
    let repo = engine(&env);

    // A running backup (its lease) stops the prune before it changes anything.
    let lease = Lease::start(&repo, LockKind::Backup, LeaseTiming::default()).unwrap();
    let out = env.run(&["prune"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(
        err.contains("1 backup(s) are running") && err.contains(&lease.id()[..8]),
        "{err}"
    );
    lease.release().unwrap();
    let locks = json(&env.ok(&["--json", "locks"]));
    assert_eq!(locks.as_array().unwrap().len(), 0, "{locks}");

    let admin = env.garage().admin_port(0);
    let deletes_before = s3_requests(admin, "DeleteObject");
    let out = json(&env.ok(&["--json", "forget", "--keep-last", "1", "--prune"]));
    assert_eq!(out["forget"]["removed"], 2, "{out}");
    let prune = &out["prune"];
    assert_eq!(prune["exclusive"], true, "{prune}");
    // The first backup's first chunk and the chunk the third overwrote
    // (4 MiB chunks), and the two older indexes.
    assert_eq!(num(prune, "deleted-chunks"), 2, "{prune}");
    assert_eq!(num(prune, "deleted-indexes"), 2, "{prune}");
    let deletes = s3_requests(admin, "DeleteObject") - deletes_before;
    assert!(deletes >= 4, "{deletes} DeleteObject requests: {prune}");
    let summary = env.ok(&["prune", "--dry-run"]);
    eprintln!("{summary}");
    assert!(
        summary.contains("would take the repository to itself"),
        "{summary}"
    );
    let after = json(&env.ok(&["--json", "prune", "--dry-run"]));
    assert_eq!(
        num(&after, "chunks"),
        num(prune, "chunks") - 2,
        "chunk objects left: {after}"
    );
    assert_eq!(num(&after, "deleted-chunks"), 0, "{after}");
    assert!(identical(
        &env.path("at-last.raw"),
        &env.restore("latest", "vm")
    ));
    let check = env.ok(&["check", "--read-data"]);
    assert!(check.contains("no damage found"), "{check}");
    assert!(
        !check.contains("prune/") && !check.contains("locks/"),
        "{check}"
    );

    // While a prune holds the repository, a backup is refused and leaves
    // nothing behind.
    let (lock, _) = Lease::stop_the_world(&repo, LeaseTiming::default(), None).unwrap();
    guest_write(&image, 0x33, 20 * MIB, 4 * MIB);
    let out = env.run(&["backup", "--vm", "web", s(&image)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(
        err.contains("needs the repository to itself") && err.contains("retry when it ends"),
        "{err}"
    );
    let locks = json(&env.ok(&["--json", "locks"]));
    let ids: Vec<&str> = locks
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![lock.id()], "the backup's lease is gone: {locks}");
    let stats = json(&env.ok(&["--json", "stats"]));
    assert_eq!(num(&stats, "snapshots"), 1, "{stats}");
    assert_eq!(num(&stats, "unreferenced-chunks"), 0, "{stats}");
    lock.release().unwrap();
    let done = env.backup("web", &image, &[]);
    assert!(stat(&done, "chunks-new") >= 1, "{done}");
}

#[test]
fn wrong_credentials_missing_bucket_and_no_server_fail_at_once_and_clearly() {
    let garage = Garage::single();
    let endpoint = garage.endpoint(0);
    let (key_id, secret) = (garage.key_id.clone(), garage.secret.clone());
    let mut env = Env::new(garage, "repos/bad");
    env.ok(&["init"]);

    // Credentials from a shared credentials file and a named profile.
    let file = env.path("aws-credentials");
    std::fs::write(
        &file,
        format!("[default]\naws_access_key_id = GKnothing\naws_secret_access_key = x\n\n[backup]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"),
    )
    .unwrap();
    let mut cmd = env.command(&["snapshots"]);
    cmd.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_SHARED_CREDENTIALS_FILE", &file)
        .env("AWS_CONFIG_FILE", env.path("no-config"))
        .env("AWS_PROFILE", "backup");
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "profile credentials: {}", text(&out));

    env.extra_env = vec![("AWS_SECRET_ACCESS_KEY".into(), "0".repeat(64))];
    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("access denied"), "{err}");
    assert!(err.contains("AWS_SECRET_ACCESS_KEY"), "{err}");
    env.extra_env.clear();

    env.repo = format!("s3:{endpoint}/no-such-bucket/repos/bad");
    let err = env.fails(&["init"]);
    assert!(
        err.contains("the bucket 'no-such-bucket' does not exist"),
        "{err}"
    );

    // A port nobody listens on, one retry: "could not connect", quickly.
    env.repo = format!("s3:http://127.0.0.1:{}/vbackup-test/x", garage::free_port());
    env.extra_env = vec![("VBACKUP_RETRIES".into(), "1".into())];
    let err = env.fails(&["snapshots"]);
    assert!(err.contains("could not connect"), "{err}");
    assert!(err.contains("connection refused"), "{err}");
    assert!(err.contains("gave up after 2 attempts"), "{err}");

    env.repo = "s3:ftp://127.0.0.1/b".into();
    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("http:// or https://"));
}

/// A TCP proxy to `upstream` that lets `budget` bytes of requests through,
/// then cuts every connection and refuses new ones (a server or network
/// dropping out in the middle of an upload).
fn cutting_proxy(upstream: u16, budget: u64) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sent = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            if cut.load(Ordering::SeqCst) {
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
            let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
            open.lock().unwrap().push(client.try_clone().unwrap());
            open.lock().unwrap().push(server.try_clone().unwrap());
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (sent, cut2, open2) = (sent.clone(), cut.clone(), open.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = c_in.read(&mut buf) {
                    if n == 0 || s_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    if sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > budget {
                        cut2.store(true, Ordering::SeqCst);
                        for stream in open2.lock().unwrap().drain(..) {
                            let _ = stream.shutdown(Shutdown::Both);
                        }
                        break;
                    }
                }
                let _ = s_out.shutdown(Shutdown::Write);
            });
            let (mut s_in, mut c_out) = (server, client);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_in, &mut c_out);
                let _ = c_out.shutdown(Shutdown::Write);
            });
        }
    });
    port
}

#[test]
fn a_connection_cut_mid_upload_fails_cleanly_and_the_retry_reuses_what_was_stored() {
    let garage = Garage::single();
    let direct = garage.repo("repos/cut");
    let mut env = Env::new(garage, "repos/cut");
    env.ok(&["init"]);
    let image = noisy_qcow2(env.cli.dir(), "vm", 64 * MIB, 48 * MIB, 7);

    // 48 MiB of noise goes up in three 16 MiB packs: the cut comes in the
    // third, after two whole packs.
    let proxy = cutting_proxy(env.garage().s3_port(0), 36 * MIB);
    env.repo = format!("s3:http://127.0.0.1:{proxy}/vbackup-test/repos/cut");
    env.extra_env = vec![("VBACKUP_RETRIES".into(), "1".into())];
    let err = env.fails(&["backup", "--threads", "2", "--vm", "web", s(&image)]);
    eprintln!("cut mid-upload: {err}");
    assert!(err.contains("S3 error"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // Through a healthy path: nothing stored was lost, no snapshot was
    // recorded, and the next backup reuses the chunks already uploaded.
    env.repo = direct;
    env.extra_env.clear();
    let check = env.ok(&["check"]);
    assert!(check.contains("no damage found"), "{check}");
    let snapshots: Value = serde_json::from_str(&env.ok(&["--json", "snapshots"])).unwrap();
    assert_eq!(snapshots.as_array().map(Vec::len), Some(0), "{snapshots}");
    let retry = env.backup("web", &image, &[]);
    assert!(stat(&retry, "chunks-reused") >= 4, "{retry}");
    assert!(stat(&retry, "chunks-new") >= 1, "{retry}");
    copy_now(&image, &env.path("now.raw"));
    assert!(identical(
        &env.path("now.raw"),
        &env.restore("latest", "vm")
    ));
    assert!(env.ok(&["verify"]).contains("no damage found"));
}

/// How the fake S3 server answers object reads.
#[derive(Clone, Copy)]
enum Reply {
    /// Full-length random bytes with status 200.
    Garbage,
    /// A Content-Length of 5000 and 100 bytes, then the connection closes.
    Truncated,
    /// Random bytes with status 200 for the bucket listing too.
    GarbageListing,
    /// Reads the request and never answers (a hung server).
    Hang,
}

/// A fake S3 server on loopback that answers ListObjectsV2 with an empty
/// bucket (unless `GarbageListing`) and every other request per `reply`.
fn fake_s3(reply: Reply) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let listing = head.lines().next().unwrap_or("").contains("list-type=2");
                let body = noise(300, 5);
                if matches!(reply, Reply::Hang) {
                    std::thread::sleep(Duration::from_secs(60));
                    return;
                }
                let mut out = Vec::new();
                match (listing, reply) {
                    (true, Reply::Garbage | Reply::Truncated) => {
                        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
                            <ListBucketResult><Name>b</Name><Prefix></Prefix><KeyCount>0</KeyCount>\
                            <MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>";
                        write!(out, "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}", xml.len()).unwrap();
                    }
                    (_, Reply::Truncated) => {
                        write!(
                            out,
                            "HTTP/1.1 200 OK\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n"
                        )
                        .unwrap();
                        out.extend_from_slice(&body[..100]);
                    }
                    _ => {
                        write!(
                            out,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .unwrap();
                        out.extend_from_slice(&body);
                    }
                }
                let _ = stream.write_all(&out);
                let _ = stream.shutdown(Shutdown::Both);
            });
        }
    });
    port
}

#[test]
fn garbage_truncated_and_missing_replies_are_clear_errors() {
    let mut env = Env::without_server();

    env.repo = format!("s3:http://127.0.0.1:{}/b/r", fake_s3(Reply::Truncated));
    let err = env.fails(&["snapshots"]);
    eprintln!("truncated: {err}");
    assert!(err.contains("S3 error while downloading"), "{err}");
    assert!(err.contains("gave up after 2 attempts"), "{err}");

    env.repo = format!("s3:http://127.0.0.1:{}/b/r", fake_s3(Reply::Garbage));
    let out = env.run(&["snapshots"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("garbage: {err}");
    assert!(err.contains("config"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    env.repo = format!("s3:http://127.0.0.1:{}/b/r", fake_s3(Reply::GarbageListing));
    let err = env.fails(&["snapshots"]);
    eprintln!("garbage listing: {err}");
    assert!(err.contains("S3 error while opening the bucket"), "{err}");
    assert!(err.contains("not valid S3 XML"), "{err}");

    // A server that never answers: each attempt ends at the timeout.
    env.repo = format!("s3:http://127.0.0.1:{}/b/r", fake_s3(Reply::Hang));
    env.extra_env
        .push(("VBACKUP_S3_TIMEOUT".into(), "1".into()));
    let err = env.fails(&["snapshots"]);
    eprintln!("hung server: {err}");
    assert!(err.contains("did not answer in time"), "{err}");
    assert!(err.contains("gave up after 2 attempts"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The sum of Garage's `api_s3_request_counter` for `endpoint` (e.g.
/// `PutObject`) from the admin API's `/metrics` on `port`.
fn s3_requests(port: u16, endpoint: &str) -> u64 {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let request = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    let label = format!("api_s3_request_counter{{api_endpoint=\"{endpoint}\"}} ");
    reply
        .lines()
        .filter_map(|l| l.strip_prefix(&label))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[test]
fn a_cluster_node_killed_during_a_backup_does_not_stop_it() {
    node_killed_during_a_backup(Env::new(Garage::cluster(3), "repos/cluster"), 2);
}

/// The node vbackup talks to dies: with every node's endpoint in the
/// repository name, requests move to the next node and the backup, its
/// restore and verify go on there.
#[test]
fn the_node_vbackup_talks_to_killed_during_a_backup_fails_over_to_another() {
    let garage = Garage::cluster(3);
    let mut env = Env::new(garage, "repos/failover");
    env.repo = env.garage().repo_on_all_nodes("repos/failover");
    node_killed_during_a_backup(env, 0);
}

/// Kills node `victim` of the cluster once a backup of a 256 MiB image is
/// under way; the backup completes, restores identical and verifies.
fn node_killed_during_a_backup(mut env: Env, victim: usize) {
    env.ok(&["init"]);
    let image = noisy_qcow2(env.cli.dir(), "vm", 320 * MIB, 256 * MIB, 11);
    copy_now(&image, &env.path("source.raw"));

    let mut backup = env
        .command(&[
            "--json",
            "backup",
            "--threads",
            "4",
            "--vm",
            "db",
            s(&image),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the node once a few chunks are in.
    let admin = env.garage().admin_port(0);
    while s3_requests(admin, "PutObject") < 4 {
        assert!(
            backup.try_wait().unwrap().is_none(),
            "the backup ended before any node was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        backup.try_wait().unwrap().is_none(),
        "the backup ended before the node was killed: make the image bigger"
    );
    env.garage.as_mut().unwrap().kill(victim);
    let out = backup.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "backup with a node down: {}",
        text(&out)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(stat(&json, "chunks-new") >= 60, "{json}");

    assert!(identical(
        &env.path("source.raw"),
        &env.restore("latest", "vm")
    ));
    assert!(env.ok(&["verify"]).contains("no damage found"));
}
