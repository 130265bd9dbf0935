//! The CLI as a new user finds it (issue 11): `forget` by id and per VM,
//! and never emptying a VM unasked; what `snapshots`, `key list` and the
//! backup summary say; quickstart's temporary folder; progress lines on an
//! 80-column terminal; bad input refused; empty environment variables
//! taken as unset. Real `vbackup` processes on a local repository, real
//! terminals through `script(1)` where a terminal matters.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::ops::Deref;
use std::path::PathBuf;
use std::process::Command;

use vbackup_testkit::cli::{local_env, CliEnv};
use vbackup_testkit::qemu::guest_write;
use vbackup_testkit::util::{noise, s, text, tool};

const PASSWORD: &str = "usability test";

/// A test's folder and repository; vbackup runs in the folder.
struct Env(CliEnv);

impl Deref for Env {
    type Target = CliEnv;
    fn deref(&self) -> &CliEnv {
        &self.0
    }
}

impl Env {
    fn new() -> Self {
        let env = Self(
            CliEnv::new(env!("CARGO_BIN_EXE_vbackup"))
                .with_password(PASSWORD)
                .with_first_args(&["--threads", "2"])
                .run_in_dir(),
        );
        env.ok(&["init", "--chunk-size", "64K"]);
        env
    }

    /// Runs a command that must fail (and not by a signal); returns its
    /// exit code and stderr. (Here in place of [`CliEnv::fails`], which
    /// expects one code.)
    fn fails(&self, args: &[&str]) -> (i32, String) {
        let (code, err) = self.fails_somehow(args);
        (code.unwrap(), err)
    }

    /// A qcow2 image `name` of 1 MiB with `seed`'s data in its first half
    /// (the second half unallocated).
    fn image(&self, name: &str, seed: u64) -> PathBuf {
        let path = self.path(name);
        let data = self.path(&format!("{name}.data"));
        let mut bytes = noise(512 << 10, seed);
        bytes.resize(1 << 20, 0);
        std::fs::write(&data, bytes).unwrap();
        tool(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "qcow2", s(&data), s(&path)],
        );
        path
    }

    /// Backs up a fresh image of VM `vm`; returns the snapshot's full id.
    fn backup(&self, vm: &str, seed: u64) -> String {
        let image = self.image(&format!("{vm}-{seed}.qcow2"), seed);
        let json = self.json(&["backup", "--vm", vm, s(&image)]);
        json["snapshot"].as_str().unwrap().to_string()
    }

    /// The ids of the snapshots, oldest first.
    fn snapshot_ids(&self) -> Vec<String> {
        self.json(&["snapshots"])
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// Runs `vbackup ARGS` on a pseudo-terminal of `cols` columns (through
    /// `script`), typing `input`; returns the exit code and everything the
    /// terminal showed.
    fn on_terminal(&self, args: &str, input: &str, cols: u32) -> (i32, String) {
        let bin = env!("CARGO_BIN_EXE_vbackup");
        let line = format!("stty cols {cols} rows 24; {bin} --threads 2 {args}");
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &line, "/dev/null"]);
        local_env(&mut cmd, self.dir(), PASSWORD);
        cmd.current_dir(self.dir())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().unwrap();
            // The answer waits in the terminal's input until read.
            stdin.write_all(input.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

// ---- forget ----------------------------------------------------------

#[test]
fn forget_takes_snapshot_id_prefixes_and_records_them_as_forgotten() {
    let env = Env::new();
    let ids = [env.backup("a", 1), env.backup("a", 2), env.backup("a", 3)];
    let manifest = env.path("repo/snapshots").join(&ids[0]);
    let copy = std::fs::read(&manifest).unwrap();
    let out = env.ok(&["forget", &ids[0][..8], &ids[1][..10]]);
    assert!(out.contains("removed 2 snapshot(s), kept 1"), "{out}");
    assert_eq!(env.snapshot_ids(), vec![ids[2].clone()]);
    // Recorded in this host's client state: a storage that puts one back
    // is named.
    std::fs::write(&manifest, copy).unwrap();
    let out = env.run(&["snapshots"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("snapshot {} (VM 'a'", ids[0]))
            && stderr.contains("removed by `vbackup forget` on this host"),
        "{}",
        text(&out)
    );
}

#[test]
fn forget_refuses_unknown_and_ambiguous_ids_naming_each_and_removes_nothing() {
    let env = Env::new();
    // Until two ids share their first digit (at most 17 by pigeonhole).
    let mut ids: Vec<String> = Vec::new();
    let shared = loop {
        let id = env.backup("a", ids.len() as u64 + 1);
        if let Some(other) = ids.iter().find(|o| o[..1] == id[..1]) {
            break other[..1].to_string();
        }
        ids.push(id);
    };
    let before = env.snapshot_ids();
    let (code, err) = env.fails(&["forget", "--yes", "zzzzzzzz", &shared, &ids[0][..8]]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no snapshot has an id starting with 'zzzzzzzz'")
            && err.contains(&format!("'{shared}' matches 2 snapshots"))
            && err.contains("nothing was removed"),
        "{err}"
    );
    assert_eq!(env.snapshot_ids(), before);
    let (code, err) = env.fails(&["forget", &ids[0][..8], "--keep-last", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not both"), "{err}");
}

#[test]
fn forget_keep_tag_typo_without_a_terminal_is_refused_naming_the_vms_it_would_empty() {
    let env = Env::new();
    env.backup("web1", 1);
    env.backup("web1", 2);
    env.backup("db1", 3);
    let (code, err) = env.fails(&["forget", "--keep-tag", "typo"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("every snapshot of VM(s) 'db1', 'web1'")
            && err.contains("nothing was removed")
            && err.contains("--yes"),
        "{err}"
    );
    assert_eq!(env.snapshot_ids().len(), 3);
    // The plan still shows what would happen, and says so.
    let plan = env.ok(&["forget", "--keep-tag", "typo", "--dry-run"]);
    assert!(
        plan.contains("would remove 3 snapshot(s)")
            && plan.contains("'db1', 'web1' would have no snapshot left"),
        "{plan}"
    );
    let out = env.ok(&["forget", "--keep-tag", "typo", "--yes"]);
    assert!(out.contains("removed 3 snapshot(s)"), "{out}");
    assert!(env.snapshot_ids().is_empty());
}

#[test]
fn forget_by_id_of_a_vms_last_snapshot_needs_yes() {
    let env = Env::new();
    let a = env.backup("a", 1);
    env.backup("b", 2);
    let (code, err) = env.fails(&["forget", &a[..8]]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("every snapshot of VM(s) 'a'"), "{err}");
    env.ok(&["forget", &a[..8], "--yes"]);
    assert_eq!(env.snapshot_ids().len(), 1);
}

#[test]
fn forget_emptying_a_vm_on_a_terminal_asks_and_no_removes_nothing() {
    let env = Env::new();
    env.backup("web1", 1);
    env.backup("db1", 2);
    let (code, screen) = env.on_terminal("forget --keep-tag typo", "n\n", 100);
    assert_ne!(code, 0, "{screen}");
    assert!(
        screen.contains("EVERY snapshot of VM(s) 'db1', 'web1'")
            && screen.contains("[y/N]")
            && screen.contains("nothing was removed"),
        "{screen}"
    );
    assert_eq!(env.snapshot_ids().len(), 2);
    let (code, screen) = env.on_terminal("forget --keep-tag typo", "y\n", 100);
    assert_eq!(code, 0, "{screen}");
    assert!(screen.contains("removed 2 snapshot(s)"), "{screen}");
    assert!(env.snapshot_ids().is_empty());
}

#[test]
fn forget_vm_limits_the_rules_to_one_vm() {
    let env = Env::new();
    env.backup("a", 1);
    let a2 = env.backup("a", 2);
    let b1 = env.backup("b", 3);
    let b2 = env.backup("b", 4);
    let out = env.ok(&["forget", "--vm", "a", "--keep-last", "1"]);
    assert!(out.contains("removed 1 snapshot(s), kept 1"), "{out}");
    assert_eq!(env.snapshot_ids(), vec![a2, b1, b2]);
    let (code, err) = env.fails(&["forget", "--vm", "typo", "--keep-last", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no snapshot of VM 'typo'") && err.contains("a, b"),
        "{err}"
    );
}

#[test]
fn forget_as_the_readme_writes_it_still_works() {
    let env = Env::new();
    env.backup("a", 1);
    env.backup("a", 2);
    let plan = env.ok(&[
        "forget",
        "--keep-daily",
        "7",
        "--keep-weekly",
        "5",
        "--keep-monthly",
        "12",
        "--dry-run",
    ]);
    assert!(
        plan.contains("would remove 1 snapshot(s), kept 1"),
        "{plan}"
    );
    let out = env.ok(&[
        "forget",
        "--keep-last",
        "3",
        "--keep-within",
        "14d",
        "--group-by",
        "host,vm",
        "--prune",
    ]);
    assert!(out.contains("removed 0 snapshot(s), kept 2"), "{out}");
}

// ---- what the commands say ---------------------------------------------

#[test]
fn snapshots_show_type_and_consistency_and_record_the_absolute_source() {
    let env = Env::new();
    env.image("disk.qcow2", 1);
    env.ok(&["backup", "--vm", "a", "disk.qcow2"]);
    env.ok(&["backup", "--vm", "a", "./disk.qcow2"]);
    let table = env.ok(&["snapshots"]);
    let header = table.lines().next().unwrap();
    assert!(
        header.contains("TYPE") && header.contains("CONSISTENCY"),
        "{table}"
    );
    let rows: Vec<&str> = table.lines().skip(1).take(2).collect();
    assert!(
        rows[0].contains(" full ") && rows[0].contains(" offline "),
        "{table}"
    );
    assert!(
        rows[1].contains(" incremental ") && rows[1].contains(" offline "),
        "{table}"
    );
    let json = env.json(&["snapshots"]);
    let absolute = env.dir().join("disk.qcow2");
    for snapshot in json.as_array().unwrap() {
        assert_eq!(snapshot["consistency"], "offline", "{snapshot}");
        assert_eq!(snapshot["disks"][0]["source"], s(&absolute), "{snapshot}");
    }
    assert_eq!(json[0]["backup_type"], "full");
    assert_eq!(json[1]["backup_type"], "incremental");
}

#[test]
fn key_list_shows_whole_seconds_and_the_uid_user_when_user_is_unset() {
    let env = Env::new();
    let mut cmd = env.command(&["key", "add"]);
    cmd.env_remove("USER").env("VBACKUP_NEW_PASSWORD", "second");
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let list = env.ok(&["key", "list"]);
    let user = tool("id", &["-un"]).trim().to_string();
    let rows: Vec<&str> = list.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{list}");
    for row in rows {
        let fields: Vec<&str> = row
            .trim_start_matches(['*', ' '])
            .split_whitespace()
            .collect();
        let created = fields[1];
        assert!(
            created.len() == 20
                && created.ends_with('Z')
                && chrono::DateTime::parse_from_rfc3339(created).is_ok(),
            "{list}"
        );
        // The key added without $USER (not the one in use, marked *).
        if !row.starts_with('*') {
            assert_eq!(fields.last().copied(), Some(user.as_str()), "{list}");
        }
    }
}

#[test]
fn backup_summary_figures_say_what_they_count() {
    let env = Env::new();
    // 512 KiB of data in a 1 MiB image: the data fills whole 64 KiB chunks.
    let image = env.image("disk.qcow2", 1);
    let out = env.ok(&["backup", "--vm", "a", s(&image)]);
    assert!(
        out.contains("read 512.0 KiB of allocated data from the disks"),
        "{out}"
    );
    assert!(
        out.contains("new chunks: 512.0 KiB before compression, stored as"),
        "{out}"
    );
    // A partly allocated chunk is stored whole: 4 KiB written into a fresh
    // image of 4 KiB clusters allocate 4 KiB of a 64 KiB chunk, which
    // makes 64 KiB of new chunk, and the line says why.
    let sparse = env.path("sparse.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&sparse),
            "1M",
        ],
    );
    guest_write(&sparse, 7, 0, 4096);
    let out = env.ok(&["backup", "--vm", "b", s(&sparse)]);
    assert!(
        out.contains("new chunks: 64.0 KiB before compression (counted whole: their unallocated parts as zeros)"),
        "{out}"
    );
}

#[test]
fn quickstart_says_it_removes_its_temporary_folder_and_keep_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    let quickstart = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vbackup"));
        cmd.args(["quickstart", "--size-mib", "32"])
            .args(extra)
            .env("TMPDIR", tmp.path());
        local_env(&mut cmd, tmp.path(), PASSWORD);
        cmd.env_remove("VBACKUP_REPOSITORY");
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let folder = |out: &str| -> PathBuf {
        let first = out.lines().next().unwrap();
        let path = first.trim_start_matches("vbackup quickstart in ");
        PathBuf::from(path.split(" (").next().unwrap())
    };
    let out = quickstart(&[]);
    let work = folder(&out);
    assert!(
        out.lines().next().unwrap().contains("removed at the end"),
        "{out}"
    );
    assert!(
        out.contains(&format!("removed the temporary folder {}", work.display())),
        "{out}"
    );
    assert!(!work.exists());
    let out = quickstart(&["--keep"]);
    let work = folder(&out);
    assert!(out.contains(&format!("kept {}", work.display())), "{out}");
    assert!(work.join("repository/config").is_file(), "{out}");
}

#[test]
fn restore_progress_lines_fit_an_80_column_terminal() {
    let env = Env::new();
    let raw = env.path("big.img");
    std::fs::write(&raw, noise(96 << 20, 9)).unwrap();
    env.ok(&["backup", "--vm", "big", s(&raw)]);
    let (code, screen) = env.on_terminal("restore latest --vm big --target out", "", 80);
    assert_eq!(code, 0, "{screen}");
    let plain = strip_escapes(&screen);
    let bars: Vec<&str> = plain
        .split(['\r', '\n'])
        .filter(|line| line.contains("restore ["))
        .collect();
    assert!(!bars.is_empty(), "no progress line drawn:\n{plain}");
    for bar in bars {
        assert!(bar.chars().count() <= 80, "{} columns: {bar:?}", bar.len());
    }
}

/// Text without ANSI escape sequences (CSI ones, as indicatif draws).
fn strip_escapes(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    out
}

// ---- bad input ---------------------------------------------------------

#[test]
fn backup_refuses_an_empty_vm_name() {
    let env = Env::new();
    let image = env.image("disk.qcow2", 1);
    for vm in ["", "  "] {
        let (code, err) = env.fails(&["backup", "--vm", vm, s(&image)]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("a VM needs a name"), "{err}");
    }
    assert!(env.snapshot_ids().is_empty());
}

#[test]
fn backup_refuses_the_same_disk_given_twice_naming_it() {
    let env = Env::new();
    let image = env.image("disk.qcow2", 1);
    let (code, err) = env.fails(&["backup", "--vm", "a", s(&image), "./disk.qcow2"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{} is given twice", s(&image))),
        "{err}"
    );
    assert!(env.snapshot_ids().is_empty());
    // No bitmap was added either: the image backs up normally afterwards.
    env.ok(&["backup", "--vm", "a", s(&image)]);
}

#[test]
fn backup_refuses_random_bytes_named_qcow2_unless_format_raw_is_given() {
    let env = Env::new();
    let fake = env.path("fake.qcow2");
    std::fs::write(&fake, noise(256 << 10, 5)).unwrap();
    let (code, err) = env.fails(&["backup", "--vm", "a", s(&fake)]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(s(&fake))
            && err.contains("named like a qcow2 image")
            && err.contains("as raw bytes")
            && err.contains("--format raw"),
        "{err}"
    );
    assert!(env.snapshot_ids().is_empty());
    env.ok(&["backup", "--vm", "a", "--format", "raw", s(&fake)]);
    assert_eq!(env.snapshot_ids().len(), 1);
}

#[test]
fn empty_password_file_and_repository_variables_count_as_unset() {
    let env = Env::new();
    env.backup("a", 1);
    let mut cmd = env.command(&["snapshots"]);
    cmd.env("VBACKUP_PASSWORD_FILE", "")
        .env("VBACKUP_TOKEN_FILE", "")
        .env("VBACKUP_SERVER_FINGERPRINT", "");
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 snapshot(s)"));
    let mut cmd = env.command(&["snapshots"]);
    cmd.env("VBACKUP_REPOSITORY", "");
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr.contains("no repository given: use --repo PATH or set VBACKUP_REPOSITORY"),
        "{stderr}"
    );
}

#[test]
fn regression_a_closed_pipe_ends_vbackup_quietly_not_with_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vbackup"));
    cmd.args(["init", "--chunk-size", "64K"]);
    local_env(&mut cmd, dir.path(), "pw");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before vbackup writes anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{:?} {stderr}", out.status);
    // The repository was made before the output failed, and is whole.
    assert!(dir.path().join("repo/config").exists());
}

#[test]
fn quiet_holds_for_every_reporting_command_and_json_still_prints() {
    let env = Env::new();
    env.backup("web1", 1);
    for command in [&["snapshots"][..], &["stats"], &["locks"], &["key", "list"]] {
        let mut args = vec!["--quiet"];
        args.extend_from_slice(command);
        assert_eq!(env.ok(&args), "", "{command:?} printed with --quiet");
        let mut args = vec!["--json"];
        args.extend_from_slice(command);
        let out = env.ok(&args);
        assert!(
            serde_json::from_str::<serde_json::Value>(&out).is_ok(),
            "{command:?}: {out}"
        );
        assert!(!env.ok(command).is_empty(), "{command:?} printed nothing");
    }
}
