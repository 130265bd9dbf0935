//! The daemon's dashboard in a real browser (issue 15): headless Debian
//! Chromium loads the page from a running `vbackup daemon`, runs its
//! script against the daemon's API, and the test reads what a user sees:
//! a failed job listed first among the problems, the VMs with their last
//! good backup, repository usage, snapshots, the history, and a running
//! backup's progress moving. A screenshot is written beside the DOM.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vbackup_testkit::util::{s, stop_gently, text, tool};

const CHROMIUM: &str = "/usr/bin/chromium";

struct Env {
    dir: tempfile::TempDir,
    port: u16,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let env = Self { dir, port };
        std::fs::write(env.path("pw"), "dashboard test\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(env.path("pw"), std::fs::Permissions::from_mode(0o600)).unwrap();
        // A disk big enough that a full backup can be watched running.
        let raw = env.path("big.raw");
        let random = std::fs::File::create(&raw).unwrap();
        let status = Command::new("head")
            .args(["-c", "512M", "/dev/urandom"])
            .stdout(random)
            .status()
            .unwrap();
        assert!(status.success());
        tool(
            "qemu-img",
            &[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                s(&raw),
                s(&env.path("big.qcow2")),
            ],
        );
        std::fs::remove_file(&raw).unwrap();
        tool(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                s(&env.path("web1.qcow2")),
                "16M",
            ],
        );
        tool(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 3 0 2M",
                s(&env.path("web1.qcow2")),
            ],
        );
        std::fs::write(
            env.path("vbackup.toml"),
            format!(
                r#"
[daemon]
state = "state"
socket = "vbackup.sock"
listen = "127.0.0.1:{port}"
retries = 0

[repository.local]
location = "repo"
password-file = "pw"
threads = 1

[vm.web1]
disks = ["web1.qcow2"]
repository = "local"
rpo = "1h"

[vm.gone]
disks = ["missing.qcow2"]
repository = "local"

[vm.big]
disks = ["big.qcow2"]
repository = "local"
type = "full"
"#
            ),
        )
        .unwrap();
        let out = env.run(&["init", "--repo", "local", "--chunk-size", "1M"]);
        assert!(out.status.success(), "{}", text(&out));
        env
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vbackup"));
        cmd.arg("--config")
            .arg(self.path("vbackup.toml"))
            .args(args);
        cmd.env("VBACKUP_KDF_MEMORY_KIB", "1024")
            .env("VBACKUP_CACHE_DIR", self.path("cache"))
            .env_remove("VBACKUP_REPOSITORY")
            .env_remove("VBACKUP_PASSWORD")
            .env_remove("VBACKUP_PASSWORD_FILE")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn wait_for(&self, mut ready: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while !ready() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The dashboard's DOM after its script ran, as headless Chromium
    /// rendered it; with `screenshot`, also a PNG of the page there.
    fn browse(&self, screenshot: Option<&Path>) -> String {
        chromium(&format!("http://127.0.0.1:{}/", self.port), screenshot)
    }
}

/// The DOM of `url` after its script ran, as headless Chromium rendered
/// it (self-signed certificates accepted: the test server's); with
/// `screenshot`, a PNG of the page instead.
fn chromium(url: &str, screenshot: Option<&Path>) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "the dashboard test needs Debian's chromium (apt-get install chromium; .ci/run installs it)"
    );
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1280,1500",
        "--virtual-time-budget=3000",
        "--ignore-certificate-errors",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()));
    match screenshot {
        Some(file) => cmd.arg(format!("--screenshot={}", file.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "chromium: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// A running daemon; killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    /// SIGTERM (the runs in progress are cancelled and their qemu-nbd
    /// stopped), SIGKILL only if it hangs.
    fn drop(&mut self) {
        stop_gently(&mut self.0);
    }
}

/// The text of the element with id `id` (its outer HTML, up to the next
/// section).
fn section<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {dom}"));
    let rest = &dom[start..];
    &rest[..rest.find("</section>").unwrap_or(rest.len())]
}

/// The `data-done` values of progress bars in `dom`.
fn progress_values(dom: &str) -> Vec<u64> {
    dom.match_indices("data-done=\"")
        .filter_map(|(i, m)| {
            let rest = &dom[i + m.len()..];
            rest[..rest.find('"')?].parse().ok()
        })
        .collect()
}

#[test]
fn the_dashboard_shows_problems_first_vms_usage_history_and_moving_progress() {
    let env = Env::new();
    let log = std::fs::File::create(env.path("daemon.log")).unwrap();
    let _daemon = Daemon(
        env.command(&["daemon"])
            .stderr(log)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    env.wait_for(
        || std::net::TcpStream::connect(("127.0.0.1", env.port)).is_ok(),
        "the dashboard's port",
    );
    env.ok(&["jobs", "run", "web1"]);
    env.ok(&["jobs", "run", "gone"]);
    env.wait_for(
        || {
            let runs = env.json(&["jobs", "history"]);
            runs.as_array()
                .unwrap()
                .iter()
                .filter(|r| r["status"] != "running")
                .count()
                == 2
        },
        "the two runs",
    );

    let dom = env.browse(None);
    assert!(dom.contains("data-loaded=\"yes\""), "the script ran: {dom}");
    // Problems come first, and name the failed job.
    let problems = dom.find("<h2>Problems</h2>").unwrap();
    let vms = dom.find("<h2>Virtual machines</h2>").unwrap();
    assert!(problems < vms);
    let listed = section(&dom, "problems");
    assert!(
        listed.contains("class=\"bad problem\"")
            && listed.contains("backup/gone")
            && listed.contains("missing.qcow2"),
        "{listed}"
    );
    assert!(!listed.contains("backup/web1"), "{listed}");
    // The VMs, with web1's last good backup and its RPO.
    let table = section(&dom, "vms");
    for text in [
        "web1",
        "gone",
        "big",
        "on demand",
        "succeeded",
        "failed",
        "/ 1h",
    ] {
        assert!(table.contains(text), "{text}: {table}");
    }
    // Repository usage, snapshots and history.
    let repositories = section(&dom, "repositories");
    assert!(
        repositories.contains("local") && repositories.contains('×'),
        "{repositories}"
    );
    let history = section(&dom, "history");
    assert!(
        history.contains("backup/web1") && history.contains("manual"),
        "{history}"
    );
    let snapshots = section(&dom, "snapshots");
    assert!(
        snapshots.contains("full") || snapshots.contains("incremental"),
        "{snapshots}"
    );

    // A running backup's progress moves: two views during one run.
    let screenshot = env.path("dashboard.png");
    let mut seen: Vec<u64> = Vec::new();
    for _ in 0..6 {
        env.ok(&["jobs", "run", "big"]);
        env.wait_for(
            || {
                env.json(&["jobs", "list"])
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|j| j["running"].is_object())
            },
            "the big backup running",
        );
        let first = progress_values(section(&env.browse(None), "running"));
        if seen.is_empty() {
            env.browse(Some(&screenshot));
        }
        let second = progress_values(section(&env.browse(None), "running"));
        if let (Some(a), Some(b)) = (first.first(), second.first()) {
            seen = vec![*a, *b];
            if b > a {
                break;
            }
        }
        env.wait_for(
            || {
                !env.json(&["jobs", "list"])
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|j| j["running"].is_object())
            },
            "the big backup's end",
        );
    }
    assert!(
        seen.len() == 2 && seen[1] > seen[0],
        "progress seen: {seen:?}"
    );
    let png = std::fs::read(&screenshot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    if let Some(keep) = std::env::var_os("VBACKUP_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).unwrap();
    }
}

#[test]
fn the_servers_dashboard_shows_what_each_repository_holds_to_a_token() {
    use vbackup_testkit::server::{add_token, Server};
    let bin = env!("CARGO_BIN_EXE_vbackup");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let admin = add_token(bin, &data, "*", "admin");
    let reader = add_token(bin, &data, "web", "read");
    let server = Server::start(bin, &data);
    let image = dir.path().join("web1.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&image), "8M"],
    );
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 9 0 1M", s(&image)],
    );
    for (repo, args) in [
        ("web", vec!["init"]),
        ("web", vec!["backup", "--vm", "web1", s(&image)]),
        ("db", vec!["init"]),
    ] {
        let out = Command::new(bin)
            .arg("--repo")
            .arg(server.url(repo))
            .args(&args)
            .env("VBACKUP_TOKEN", &admin)
            .env("VBACKUP_SERVER_FINGERPRINT", server.fingerprint())
            .env("VBACKUP_PASSWORD", "pw")
            .env("VBACKUP_KDF_MEMORY_KIB", "1024")
            .env("VBACKUP_CACHE_DIR", dir.path().join("cache"))
            .env("VBACKUP_CONFIG", "/dev/null")
            .env_remove("VBACKUP_REPOSITORY")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    let page = |token: &str| chromium(&format!("https://{}/#token={token}", server.addr()), None);

    let dom = page(&admin);
    assert!(dom.contains("data-loaded=\"yes\""), "{dom}");
    let table = section(&dom, "repositories");
    assert!(
        table.contains("<td>web</td><td>1</td>"),
        "web holds one snapshot: {table}"
    );
    assert!(table.contains("<td>db</td><td>0</td>"), "{table}");
    // A read token for one repository sees that one only.
    let dom = page(&reader);
    let table = section(&dom, "repositories");
    assert!(
        table.contains("<td>web</td>") && !table.contains("<td>db</td>"),
        "{table}"
    );
    // A wrong token is refused, and says so.
    let dom = page("vb1.nope.nope");
    assert!(
        dom.contains("data-loaded=\"error\"") && dom.contains("The server refused"),
        "{dom}"
    );
    assert!(!section(&dom, "repositories").contains("<td>web</td>"));
    server.stop();
}
