//! `vbackup daemon` and `vbackup jobs` as a user runs them (issue 15):
//! the configuration file as written, scheduled runs observed, a run on
//! demand, the history, a broken configuration refused on SIGHUP, the
//! daemon SIGKILLed mid-backup and restarted (the run is "interrupted",
//! the repository checks clean), and a clean stop on SIGTERM. Real
//! processes, a real qcow2 image, a local repository, a unix socket.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vbackup_testkit::util::{noise, s, stop_gently, text, tool};

/// A folder with a configuration file, a repository and a VM image.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new(schedule: &str) -> Self {
        let env = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        let pw = env.path("pw");
        std::fs::write(&pw, "daemon test\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Enough data that a backup takes a moment, so one can be caught
        // running.
        let raw = env.path("web1.raw");
        std::fs::write(&raw, noise(96 << 20, 11)).unwrap();
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
                s(&env.path("web1.qcow2")),
            ],
        );
        std::fs::remove_file(&raw).unwrap();
        env.write_config(schedule, "auto");
        let out = env.run(&["init", "--repo", "local", "--chunk-size", "1M"]);
        assert!(out.status.success(), "{}", text(&out));
        env
    }

    fn write_config(&self, schedule: &str, backup_type: &str) {
        std::fs::write(
            self.path("vbackup.toml"),
            format!(
                r#"
[daemon]
state = "state"
socket = "vbackup.sock"

[repository.local]
location = "repo"
password-file = "pw"

[vm.web1]
disks = ["web1.qcow2"]
repository = "local"
schedule = "{schedule}"
type = "{backup_type}"
keep = {{ last = 24, daily = 7, weekly = 4, monthly = 12 }}
rpo = "2h"

[verify.local]
schedule = "weekly"
read-data-subset = "10%"

[prune.local]
schedule = "daily 04:00"
"#
            ),
        )
        .unwrap();
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

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Starts `vbackup daemon`, its log in `daemon-N.log`, and waits for
    /// its API.
    fn start_daemon(&self, n: u32) -> Daemon {
        let log = std::fs::File::create(self.path(&format!("daemon-{n}.log"))).unwrap();
        let child = self
            .command(&["daemon"])
            .stderr(log)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let daemon = Daemon {
            child,
            log: self.path(&format!("daemon-{n}.log")),
        };
        self.wait_for(
            || std::os::unix::net::UnixStream::connect(self.path("vbackup.sock")).is_ok(),
            "the daemon's socket",
        );
        daemon
    }

    /// The runs of the history, oldest first.
    fn history(&self) -> Vec<serde_json::Value> {
        let mut runs = self.json(&["jobs", "history", "--limit", "1000"]);
        let runs = runs.as_array_mut().unwrap();
        runs.reverse();
        runs.clone()
    }

    fn wait_for(&self, mut ready: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ready() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A running daemon; killed when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn signal(&self, signal: i32) {
        let rc = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(rc.success());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    /// SIGTERM (the runs in progress are cancelled and their qemu-nbd
    /// stopped), SIGKILL only if it hangs.
    fn drop(&mut self) {
        stop_gently(&mut self.child);
    }
}

/// The pids of processes whose command line names `path`.
fn processes_naming(path: &std::path::Path) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

fn statuses(runs: &[serde_json::Value]) -> Vec<String> {
    runs.iter()
        .map(|r| r["status"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_daemon_runs_scheduled_and_asked_for_backups_and_survives_a_kill() {
    let env = Env::new("*:*:0/3");
    let daemon = env.start_daemon(1);
    // The jobs of the file, as written.
    let jobs = env.json(&["jobs", "list"]);
    let names: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["backup/web1", "verify/local", "prune/local"]);
    assert!(jobs[0]["next-run"].is_string(), "{jobs}");

    // Scheduled runs happen.
    env.wait_for(
        || {
            env.history()
                .iter()
                .filter(|r| r["status"] == "succeeded" && r["trigger"] != "manual")
                .filter(|r| r["job"] == "backup/web1")
                .count()
                >= 2
        },
        "two scheduled backups",
    );
    // Only the backup's schedule is due every few seconds; the prune
    // ("daily 04:00") and verify ("weekly") jobs run too when the test
    // happens to start at their time (a regression: it failed at 04:00).
    let runs: Vec<serde_json::Value> = env
        .history()
        .into_iter()
        .filter(|r| r["trigger"] == "manual" || r["job"] == "backup/web1")
        .collect();
    assert!(runs.iter().all(|r| r["job"] == "backup/web1"), "{runs:?}");
    assert!(runs[0]["snapshot"].is_string() && runs[0]["bytes-read"].as_u64() > Some(0));

    // A run asked for, on a job that is not scheduled often.
    let out = env.run(&["jobs", "run", "verify/local"]);
    assert!(out.status.success(), "{}", text(&out));
    env.wait_for(
        || {
            env.history()
                .iter()
                .any(|r| r["job"] == "verify/local" && r["status"] == "succeeded")
        },
        "the verify run",
    );
    let unknown = env.run(&["jobs", "run", "nope"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no job 'nope'"),
        "{}",
        text(&unknown)
    );

    // A broken configuration is refused on SIGHUP, with the line; the
    // daemon goes on.
    std::fs::write(env.path("vbackup.toml"), "[vm.web1]\nschedul = 3\n").unwrap();
    daemon.signal(1);
    env.wait_for(
        || daemon.log().contains("reload refused"),
        "the refused reload",
    );
    assert!(daemon.log().contains("line 2"), "{}", daemon.log());
    // A good one is taken: full backups from now on, which read the
    // whole disk (long enough to be caught running).
    env.write_config("*:*:0/3", "full");
    daemon.signal(1);
    env.wait_for(|| daemon.log().contains("reloaded"), "the reload");
    let status = env.run(&["jobs", "status"]);
    assert!(status.status.success(), "{}", text(&status));

    // SIGKILL while a backup runs, before its second half.
    env.wait_for(
        || {
            let running = &env.json(&["jobs", "list"])[0]["running"];
            let (done, total) = (
                running["done-bytes"].as_u64(),
                running["total-bytes"].as_u64(),
            );
            matches!((done, total), (Some(d), Some(t)) if t > 0 && d < t / 2)
        },
        "a backup in its first half",
    );
    daemon.signal(9);
    drop(daemon);
    assert!(
        env.path("vbackup.sock").exists(),
        "a killed daemon leaves its socket"
    );
    // A SIGKILLed daemon cannot stop the qemu-nbd of the backup it ran
    // (known, see ARCHITECTURE.md); the test ends it, not to leave it on
    // the machine.
    for pid in processes_naming(&env.path("web1.qcow2")) {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    let daemon = env.start_daemon(2);
    let runs = env.history();
    let interrupted: Vec<&serde_json::Value> = runs
        .iter()
        .filter(|r| r["status"] == "interrupted")
        .collect();
    assert_eq!(interrupted.len(), 1, "{:?}", statuses(&runs));
    assert!(interrupted[0]["error"]
        .as_str()
        .unwrap()
        .contains("stopped while it ran"));
    // The repository is consistent, and backups go on.
    let before = runs.len();
    env.wait_for(
        || env.history().len() > before + 1,
        "backups after the restart",
    );

    // SIGTERM: the run in progress is cancelled and recorded, the socket
    // removed, exit 0.
    daemon.signal(15);
    let mut daemon = daemon;
    let status = daemon.child.wait().unwrap();
    assert!(status.success(), "{}", daemon.log());
    assert!(!env.path("vbackup.sock").exists());
    assert!(!statuses(&read_history(&env)).contains(&"running".to_string()));
    let check = env.run(&["check", "--repo", "local"]);
    assert!(check.status.success(), "{}", text(&check));
}

/// The history straight from the database's owner, the daemon being
/// stopped: through a short-lived daemon.
fn read_history(env: &Env) -> Vec<serde_json::Value> {
    env.write_config("yearly", "auto");
    let _daemon = env.start_daemon(3);
    env.history()
}

#[test]
fn jobs_without_a_daemon_says_how_to_reach_one() {
    let env = Env::new("hourly");
    let out = env.run(&["jobs", "list"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("vbackup daemon") && stderr.contains(s(&env.path("vbackup.sock"))),
        "{stderr}"
    );
}

/// A free port on loopback (bound, then released for the daemon).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Receives one HTTP POST on `listener` and answers 200; returns its body.
fn receive_post(listener: std::net::TcpListener) -> std::thread::JoinHandle<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("no webhook call within 120 s: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        let mut reader = BufReader::new(stream);
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        reader
            .get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .unwrap();
        String::from_utf8(body).unwrap()
    })
}

/// A minimal SMTP server for one message on `listener`: it answers the
/// client's commands as a real server does and returns the message's
/// envelope recipients and data.
fn receive_mail(listener: std::net::TcpListener) -> std::thread::JoinHandle<(Vec<String>, String)> {
    use std::io::{BufRead, BufReader, Write};
    std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("no SMTP connection within 120 s: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        writer.write_all(b"220 test ESMTP\r\n").unwrap();
        let (mut recipients, mut data) = (Vec::new(), String::new());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                break;
            }
            let command = line.trim_end().to_ascii_uppercase();
            if command.starts_with("EHLO") || command.starts_with("HELO") {
                writer.write_all(b"250-test\r\n250 8BITMIME\r\n").unwrap();
            } else if command.starts_with("RCPT TO:") {
                recipients.push(line.trim_end()[8..].trim().to_string());
                writer.write_all(b"250 ok\r\n").unwrap();
            } else if command == "DATA" {
                writer.write_all(b"354 go on\r\n").unwrap();
                loop {
                    let mut body = String::new();
                    reader.read_line(&mut body).unwrap();
                    if body == ".\r\n" {
                        break;
                    }
                    data.push_str(&body);
                }
                writer.write_all(b"250 queued\r\n").unwrap();
            } else if command == "QUIT" {
                writer.write_all(b"221 bye\r\n").unwrap();
                break;
            } else {
                writer.write_all(b"250 ok\r\n").unwrap();
            }
        }
        (recipients, data)
    })
}

/// One plain HTTP request to `port`; the status code and the body.
fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let code = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = answer.split_once("\r\n\r\n").unwrap().1.to_string();
    (code, body)
}

/// The value of the sample `name{labels}` in a metrics text.
fn sample(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        (!line.starts_with('#') && series == format!("{name}{{{labels}}}"))
            .then(|| value.parse().ok())?
    })
}

#[test]
fn a_failure_is_notified_by_webhook_and_email_and_counted_in_the_metrics() {
    let env = Env::new("yearly");
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_url = format!("http://{}/hook", hook.local_addr().unwrap());
    let received = receive_post(hook);
    let smtp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let smtp_url = format!("smtp://{}", smtp.local_addr().unwrap());
    let mailed = receive_mail(smtp);
    let port = free_port();
    let config = std::fs::read_to_string(env.path("vbackup.toml")).unwrap();
    let config = config.replace(
        "socket = \"vbackup.sock\"\n",
        &format!("socket = \"vbackup.sock\"\nlisten = \"127.0.0.1:{port}\"\nretries = 0\n"),
    );
    std::fs::write(
        env.path("vbackup.toml"),
        format!(
            "{config}\n[vm.gone]\ndisks = [\"missing.qcow2\"]\nrepository = \"local\"\n\n[notify]\nwebhook = \"{hook_url}\"\nemail = {{ to = [\"ops@example.com\"], from = \"vbackup@example.com\", smtp = \"{smtp_url}\" }}\n"
        ),
    )
    .unwrap();
    let _daemon = env.start_daemon(1);
    let out = env.run(&["jobs", "run", "gone"]);
    assert!(out.status.success(), "{}", text(&out));

    let body: serde_json::Value = serde_json::from_str(&received.join().unwrap()).unwrap();
    assert_eq!(body["event"], "failure", "{body}");
    assert_eq!(body["job"], "backup/gone");
    assert!(
        body["text"].as_str().unwrap().contains("missing.qcow2"),
        "{body}"
    );
    assert_eq!(body["run"]["status"], "failed");
    let (recipients, mail) = mailed.join().unwrap();
    assert_eq!(recipients, ["<ops@example.com>"]);
    assert!(
        mail.contains("Subject: [vbackup] backup/gone run"),
        "{mail}"
    );
    assert!(
        mail.contains("failed") && mail.contains("missing.qcow2"),
        "{mail}"
    );

    let (code, metrics) = http(port, "GET", "/metrics");
    assert_eq!(code, 200, "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "vbackup_job_runs_total",
            "job=\"backup/gone\",status=\"failed\""
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "vbackup_job_last_run_success",
            "job=\"backup/gone\""
        ),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "vbackup_vm_rpo_seconds", "vm=\"web1\""),
        Some(7200.0),
        "{metrics}"
    );
    // The TCP listener reads, it never starts or cancels anything.
    let (code, jobs) = http(port, "GET", "/api/v1/jobs");
    assert_eq!(code, 200);
    assert!(jobs.contains("backup/gone"));
    assert_eq!(http(port, "POST", "/api/v1/runs").0, 405);
    assert_eq!(http(port, "POST", "/api/v1/runs/1/cancel").0, 404);
}
