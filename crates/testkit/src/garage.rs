//! Real Garage S3 servers on loopback for the tests: one node, or a
//! cluster of three with replication factor 3. Each server gets its own
//! folder, free ports and a random RPC secret; the harness assigns the
//! layout, imports an access key, creates a bucket, and kills every node
//! (by pid) when dropped.
//!
//! Garage v2 must be installed (`cargo install garage --locked`); a test
//! that needs it fails, never skips, when it is missing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{noise, s, text};

/// The region the servers announce.
pub const REGION: &str = "garage";

/// One running `garage server` process.
struct Node {
    child: Option<Child>,
    config: PathBuf,
    s3_port: u16,
    admin_port: u16,
    rpc_port: u16,
    id: String,
}

/// A Garage cluster with one bucket and a key that may use it.
pub struct Garage {
    nodes: Vec<Node>,
    binary: PathBuf,
    /// Access key id (`GK…`).
    pub key_id: String,
    /// Secret key.
    pub secret: String,
    /// The bucket made for the test.
    pub bucket: String,
    _dir: tempfile::TempDir,
}

/// The `garage` binary: on `PATH` or in `~/.cargo/bin`.
pub fn garage_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("garage"))
            .find(|p| p.is_file())
    });
    let in_cargo = std::env::var_os("HOME")
        .map(|h| Path::new(&h).join(".cargo/bin/garage"))
        .filter(|p| p.is_file());
    on_path.or(in_cargo).unwrap_or_else(|| {
        panic!("the S3 tests need a Garage server: run `cargo install garage --locked`")
    })
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
        .port()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Random-enough bytes for secrets: a test-local generator seeded by the
/// clock and pid (the servers live for one test on loopback).
fn random_bytes(len: usize) -> Vec<u8> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos()) as u64
        ^ u64::from(std::process::id()) << 32;
    noise(len, seed)
}

impl Garage {
    /// One node with replication factor 1.
    pub fn single() -> Self {
        Self::cluster(1)
    }

    /// `count` nodes in zones dc1, dc2, … with replication factor `count`.
    pub fn cluster(count: usize) -> Self {
        let binary = garage_binary();
        let dir = tempfile::tempdir().expect("a temporary folder for Garage");
        let secret_rpc = hex(&random_bytes(32));
        let mut nodes: Vec<Node> = (0..count)
            .map(|i| start_node(&binary, dir.path(), i, count, &secret_rpc))
            .collect();
        for node in &mut nodes {
            node.id = wait_for_id(&binary, node);
        }
        let first = &nodes[0];
        for other in &nodes[1..] {
            let peer = format!("{}@127.0.0.1:{}", other.id, other.rpc_port);
            retry_cli(&binary, &first.config, &["node", "connect", &peer]);
        }
        for (i, node) in nodes.iter().enumerate() {
            let zone = format!("dc{}", i + 1);
            let short = &node.id[..16];
            retry_cli(
                &binary,
                &first.config,
                &["layout", "assign", "-z", &zone, "-c", "1G", short],
            );
        }
        retry_cli(
            &binary,
            &first.config,
            &["layout", "apply", "--version", "1"],
        );
        let key_id = format!("GK{}", hex(&random_bytes(12)));
        let secret = hex(&random_bytes(32));
        let garage = Self {
            nodes,
            binary,
            key_id,
            secret,
            bucket: "vbackup-test".to_string(),
            _dir: dir,
        };
        garage.cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            "test",
            &garage.key_id,
            &garage.secret,
        ]);
        garage.create_bucket(&garage.bucket);
        garage
    }

    /// Creates `bucket` and lets the test key read, write and own it.
    pub fn create_bucket(&self, bucket: &str) {
        self.cli(&["bucket", "create", bucket]);
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            bucket,
            "--key",
            &self.key_id,
        ]);
    }

    /// Runs `garage -c <first node's config> args…` (retrying while the
    /// cluster settles); returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        retry_cli(&self.binary, &self.nodes[0].config, args)
    }

    /// The S3 endpoint of node `i`, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    /// The S3 port of node `i`.
    pub fn s3_port(&self, i: usize) -> u16 {
        self.nodes[i].s3_port
    }

    /// The admin API port of node `i` (`/metrics`).
    pub fn admin_port(&self, i: usize) -> u16 {
        self.nodes[i].admin_port
    }

    /// A repository name `s3:http://127.0.0.1:PORT/BUCKET/PREFIX` on node 0.
    pub fn repo(&self, prefix: &str) -> String {
        format!("s3:{}/{}/{prefix}", self.endpoint(0), self.bucket)
    }

    /// A repository name listing every node's endpoint,
    /// `s3:http://127.0.0.1:P0,127.0.0.1:P1,…/BUCKET/PREFIX`.
    pub fn repo_on_all_nodes(&self, prefix: &str) -> String {
        let hosts: Vec<String> = (0..self.nodes.len())
            .map(|i| format!("127.0.0.1:{}", self.nodes[i].s3_port))
            .collect();
        format!("s3:http://{}/{}/{prefix}", hosts.join(","), self.bucket)
    }

    /// Sets the credentials and region of the test key on `cmd` (and
    /// removes any AWS settings of the caller's environment).
    pub fn credentials(&self, cmd: &mut Command) {
        for var in [
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_REGION", REGION);
    }

    /// Kills node `i` with SIGKILL, as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

fn start_node(binary: &Path, dir: &Path, i: usize, count: usize, rpc_secret: &str) -> Node {
    let root = dir.join(format!("node{i}"));
    std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("creating {}: {e}", root.display()));
    let (rpc_port, s3_port, admin_port) = (free_port(), free_port(), free_port());
    let config = root.join("garage.toml");
    let toml = format!(
        r#"metadata_dir = "{root}/meta"
data_dir = "{root}/data"
db_engine = "sqlite"
replication_factor = {count}
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"

[s3_api]
api_bind_addr = "127.0.0.1:{s3_port}"
s3_region = "{REGION}"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
"#,
        root = root.display()
    );
    std::fs::write(&config, toml).unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
    let log = std::fs::File::create(root.join("server.log"))
        .unwrap_or_else(|e| panic!("creating the server log in {}: {e}", root.display()));
    let stdout = log
        .try_clone()
        .unwrap_or_else(|e| panic!("sharing the server log: {e}"));
    let child = Command::new(binary)
        .args(["-c", s(&config), "server"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
    Node {
        child: Some(child),
        config,
        s3_port,
        admin_port,
        rpc_port,
        id: String::new(),
    }
}

/// Waits until the node answers on RPC; returns its full node id. Fails
/// with the server's log if it exited.
fn wait_for_id(binary: &Path, node: &mut Node) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(binary)
            .args(["-c", s(&node.config), "node", "id", "-q"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", binary.display()));
        if out.status.success() {
            let id = String::from_utf8_lossy(&out.stdout);
            let id = id.trim();
            return id.split_once('@').map_or(id, |(id, _)| id).to_string();
        }
        let exited = match node.child.as_mut() {
            Some(child) => child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for garage server: {e}")),
            None => panic!("garage server was already stopped"),
        };
        if exited.is_some() || Instant::now() > deadline {
            let log = node.config.with_file_name("server.log");
            panic!(
                "garage server did not start ({exited:?}): {}\nserver log:\n{}",
                text(&out),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a garage CLI command until it succeeds (30 s at most).
fn retry_cli(binary: &Path, config: &Path, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(binary)
            .args(["-c", s(config)])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", binary.display()));
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "garage {args:?} kept failing: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
