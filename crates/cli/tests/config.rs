//! The configuration file (issue 11: one options struct for the library,
//! the CLI and a TOML file): named repositories and VMs, flags over keys,
//! broken files refused with the line. Real `vbackup` processes, real
//! qcow2 images, a local repository.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

use tempfile::TempDir;
use vbackup_testkit::qemu::{guest_write, identical};
use vbackup_testkit::util::{s, text, tool};

const PASSWORD: &str = "config test";

/// A folder with a passphrase file, a qcow2 image and a configuration
/// file naming them; commands run with no repository in the environment.
struct Env {
    dir: TempDir,
}

impl Env {
    fn new() -> Self {
        let env = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(env.path("pw"), format!("{PASSWORD}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(env.path("pw"), std::fs::Permissions::from_mode(0o600)).unwrap();
        tool(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                s(&env.path("web1.qcow2")),
                "8M",
            ],
        );
        guest_write(&env.path("web1.qcow2"), 5, 0, 1 << 20);
        std::fs::write(env.path("web1.xml"), "<domain><name>web1</name></domain>\n").unwrap();
        env
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the configuration file `vbackup.toml`.
    fn config(&self, text: &str) -> PathBuf {
        let file = self.path("vbackup.toml");
        std::fs::write(&file, text).unwrap();
        file
    }

    /// `vbackup` with only the configuration file to say where things are.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vbackup"));
        cmd.args(["--threads", "2"]).args(args);
        cmd.env("VBACKUP_KDF_MEMORY_KIB", "1024")
            .env("VBACKUP_CACHE_DIR", self.path("cache"))
            .env("VBACKUP_CONFIG", self.path("vbackup.toml"))
            .env("HOME", self.dir.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("VBACKUP_REPOSITORY")
            .env_remove("VBACKUP_PASSWORD")
            .env_remove("VBACKUP_PASSWORD_FILE")
            .stdin(std::process::Stdio::null())
            // Relative paths in the file are the file's, not the caller's.
            .current_dir("/");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "vbackup {args:?}:\n{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str]) -> (i32, String) {
        let out = self.run(args);
        assert!(!out.status.success(), "vbackup {args:?}:\n{}", text(&out));
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

const TWO_REPOSITORIES: &str = r#"
[repository.local]
location = "repo"
password-file = "pw"

[repository.other]
location = "other-repo"
password-file = "pw"

[vm.web1]
disks = ["web1.qcow2"]
definition = "web1.xml"
repository = "local"
tags = ["nightly"]
"#;

#[test]
fn a_vm_named_in_the_file_is_backed_up_with_its_disks_definition_and_repository() {
    let env = Env::new();
    env.config(TWO_REPOSITORIES);
    env.ok(&["init", "--repo", "local"]);
    env.ok(&["init", "--repo", "other"]);
    let out = json(&env.ok(&["--json", "backup", "--vm", "web1"]));
    assert_eq!(out["disks"][0]["name"], "web1", "{out}");
    assert!(
        env.path("repo/config").exists(),
        "the VM's repository, relative to the file"
    );
    let listed = json(&env.ok(&["--json", "snapshots", "--repo", "local"]));
    let snapshot = &listed.as_array().unwrap()[0];
    assert_eq!(snapshot["tags"][0], "nightly", "{snapshot}");
    let restored = env.path("restored");
    env.ok(&[
        "restore",
        "--repo",
        "local",
        "latest",
        "--vm",
        "web1",
        "--target",
        s(&restored),
    ]);
    assert!(
        restored.join("web1.xml").exists(),
        "the definition named in the file was stored"
    );
    assert!(identical(
        &env.path("web1.qcow2"),
        &restored.join("web1.raw")
    ));
    let other = json(&env.ok(&["--json", "snapshots", "--repo", "other"]));
    assert_eq!(other.as_array().unwrap().len(), 0, "{other}");
}

#[test]
fn flags_win_over_the_file() {
    let env = Env::new();
    env.config(TWO_REPOSITORIES);
    env.ok(&["init", "--repo", "local"]);
    env.ok(&["init", "--repo", "other"]);
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            s(&env.path("spare.qcow2")),
            "4M",
        ],
    );
    let spare = env.path("spare.qcow2");
    env.ok(&[
        "backup",
        "--repo",
        "other",
        "--vm",
        "web1",
        "--tag",
        "manual",
        s(&spare),
    ]);
    let listed = json(&env.ok(&["--json", "snapshots", "--repo", "other"]));
    let snapshot = &listed.as_array().unwrap()[0];
    assert_eq!(
        snapshot["tags"],
        serde_json::json!(["manual"]),
        "{snapshot}"
    );
    assert_eq!(snapshot["disks"][0]["name"], "spare", "{snapshot}");
    assert_eq!(
        json(&env.ok(&["--json", "snapshots", "--repo", "local"]))
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // A location that is no section name is a location.
    let direct = env.path("repo");
    let listed = json(&env.ok(&[
        "--json",
        "snapshots",
        "--repo",
        s(&direct),
        "--password-file",
        s(&env.path("pw")),
    ]));
    assert_eq!(listed.as_array().unwrap().len(), 0);
}

#[test]
fn the_only_repository_is_the_default_and_two_need_a_choice() {
    let env = Env::new();
    env.config("[repository.only]\nlocation = \"repo\"\npassword-file = \"pw\"\n");
    env.ok(&["init"]);
    env.ok(&["backup", "--vm", "web1", s(&env.path("web1.qcow2"))]);
    assert_eq!(
        json(&env.ok(&["--json", "snapshots"]))
            .as_array()
            .unwrap()
            .len(),
        1
    );
    env.config(
        TWO_REPOSITORIES
            .replace("repository = \"local\"\n", "")
            .as_str(),
    );
    let (code, stderr) = env.fails(&["snapshots"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no repository given"), "{stderr}");
}

#[test]
fn broken_files_are_refused_with_the_line_and_the_reason() {
    let env = Env::new();
    let file = env.config("[repository.local]\nlocation = \"repo\"\npasword-file = \"pw\"\n");
    let (code, stderr) = env.fails(&["snapshots", "--repo", "local"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(s(&file)), "{stderr}");
    assert!(
        stderr.contains("line 3") && stderr.contains("pasword-file"),
        "{stderr}"
    );
    env.config("[vm.web1]\ndisks = [\"web1.qcow2\"]\nrepository = \"nas\"\n");
    let (code, stderr) = env.fails(&["backup", "--vm", "web1"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("'nas'"), "{stderr}");
    // A VM definition given where the configuration file goes.
    let (code, stderr) = env.fails(&["--config", s(&env.path("web1.xml")), "snapshots"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("backup --definition"), "{stderr}");
    let missing = env.path("nope.toml");
    let (code, stderr) = env.fails(&["--config", s(&missing), "snapshots"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(s(&missing)), "{stderr}");
}

#[test]
fn commands_that_need_no_repository_ignore_a_broken_file() {
    let env = Env::new();
    env.config("this is not toml [");
    env.ok(&["completions", "bash"]);
    env.ok(&["man"]);
}
