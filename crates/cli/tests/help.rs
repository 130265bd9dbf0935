//! The `vbackup` command line as a new user meets it: `--help` text and
//! headings, shell completions, the manual page, error messages that name
//! the repository's path or URL, and the VM definition written by a
//! restore. Each test runs the real binary in its own temporary folder.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use vbackup_testkit::cli::local_env;
use vbackup_testkit::qemu::guest_write;
use vbackup_testkit::util::{s, text, tool};

const PASSWORD: &str = "correct horse battery staple";

/// The commands a user can run (the hidden `synth` is not one of them).
const COMMANDS: [&str; 19] = [
    "init",
    "backup",
    "restore",
    "snapshots",
    "check",
    "verify",
    "forget",
    "prune",
    "repair",
    "policy",
    "locks",
    "unlock",
    "stats",
    "key",
    "speed",
    "quickstart",
    "server",
    "completions",
    "man",
];

/// `vbackup ARGS` for a local repository in `dir/repo`.
fn vbackup(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vbackup"));
    cmd.args(args);
    local_env(&mut cmd, dir, PASSWORD);
    cmd.output().unwrap()
}

/// Runs, expects success, returns stdout.
fn ok(dir: &Path, args: &[&str]) -> String {
    let out = vbackup(dir, args);
    assert!(out.status.success(), "vbackup {args:?}: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs, expects exit `code`, returns stderr.
fn fails(dir: &Path, args: &[&str], code: i32) -> String {
    let out = vbackup(dir, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "vbackup {args:?}: {}",
        text(&out)
    );
    String::from_utf8(out.stderr).unwrap()
}

/// The lines of `help` under the heading `heading` (up to the next
/// heading, a line that is not indented).
fn section<'a>(help: &'a str, heading: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|line| line.trim_end() != heading)
        .skip(1)
        .take_while(|line| line.is_empty() || line.starts_with(' '))
        .collect()
}

/// Whether one of `lines` documents the flag `--flag`.
fn lists(lines: &[&str], flag: &str) -> bool {
    lines.iter().any(|line| {
        line.trim_start()
            .split([',', ' ', '='])
            .any(|word| word == flag)
    })
}

#[test]
fn start_with_block_of_the_top_level_help_keeps_its_lines() {
    let dir = tempfile::tempdir().unwrap();
    let help = ok(dir.path(), &["--help"]);
    let lines: Vec<&str> = help.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("Start with:  vbackup init --repo /srv/vbackup"))
        .unwrap_or_else(|| panic!("no Start with: line of its own:\n{help}"));
    assert!(lines[start].trim_end().ends_with("/srv/vbackup"), "{help}");
    assert!(
        lines[start + 1]
            .trim_start()
            .starts_with("then  vbackup backup"),
        "{help}"
    );
    assert!(
        lines[start + 2]
            .trim_start()
            .starts_with("then  vbackup restore"),
        "{help}"
    );
}

#[test]
fn subcommand_help_puts_global_options_under_their_own_heading() {
    let dir = tempfile::tempdir().unwrap();
    let help = ok(dir.path(), &["snapshots", "--help"]);
    let own = section(&help, "Options:");
    let global = section(&help, "Global options:");
    assert!(lists(&own, "--vm"), "{help}");
    for flag in [
        "--repo",
        "--password-file",
        "--json",
        "--threads",
        "--no-cache",
    ] {
        assert!(
            lists(&global, flag),
            "{flag} not under Global options:\n{help}"
        );
        assert!(
            !lists(&own, flag),
            "{flag} among the command's options:\n{help}"
        );
    }
    let help = ok(dir.path(), &["backup", "--help"]);
    let live = section(&help, "Live VM:");
    for flag in ["--qmp", "--qga", "--nbd-socket"] {
        assert!(lists(&live, flag), "{flag} not under Live VM:\n{help}");
    }
    let cbt = section(&help, "Changed-block tracking:");
    for flag in ["--type", "--force-read"] {
        assert!(
            lists(&cbt, flag),
            "{flag} not under Changed-block tracking:\n{help}"
        );
    }
    assert!(lists(&section(&help, "Options:"), "--vm"), "{help}");
}

#[test]
fn server_help_lists_no_repository_client_options() {
    let dir = tempfile::tempdir().unwrap();
    let client_only = [
        "--password-file",
        "--threads",
        "--no-cache",
        "--token-file",
        "--server-fingerprint",
        "--allow-unencrypted",
    ];
    for command in [
        &["server", "--help"][..],
        &["server", "token", "--help"],
        &["server", "token", "list", "--help"],
        &["server", "token", "add", "--help"],
    ] {
        let help = ok(dir.path(), command);
        for flag in client_only {
            assert!(!help.contains(flag), "{command:?} lists {flag}:\n{help}");
        }
        assert!(help.contains("--json"), "{command:?}:\n{help}");
    }
    let serve = ok(dir.path(), &["server", "--help"]);
    assert!(!serve.contains("--repo"), "{serve}");
    assert!(lists(&section(&serve, "Options:"), "--listen"), "{serve}");
    for flag in ["--cert", "--key"] {
        assert!(lists(&section(&serve, "TLS:"), flag), "{flag}:\n{serve}");
    }
    for flag in ["--timeout", "--max-connections", "--max-upload-memory"] {
        assert!(lists(&section(&serve, "Limits:"), flag), "{flag}:\n{serve}");
    }
    let add = ok(dir.path(), &["server", "token", "add", "--help"]);
    assert!(add.contains("--repo <NAME>"), "{add}");
    assert!(
        add.contains("The repository the token opens on this server"),
        "{add}"
    );
    // Elsewhere the globals are still there, before or after the command.
    let help = ok(dir.path(), &["backup", "--help"]);
    for flag in client_only {
        assert!(help.contains(flag), "backup --help lacks {flag}:\n{help}");
    }
    let repo = dir.path().join("repo");
    ok(dir.path(), &["init", "--repo", s(&repo)]);
    let other = tempfile::tempdir().unwrap();
    let before = ok(other.path(), &["--repo", s(&repo), "--json", "snapshots"]);
    let after = ok(other.path(), &["snapshots", "--repo", s(&repo), "--json"]);
    assert_eq!((before.trim(), after.trim()), ("[]", "[]"));
}

#[test]
fn completions_for_every_shell_mention_every_command() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(dir.path(), &["completions", shell]);
        for command in COMMANDS {
            assert!(
                script.contains(command),
                "{shell} completions lack '{command}'"
            );
        }
        assert!(
            script.contains("password-file"),
            "{shell}: no global options"
        );
    }
    let bash = ok(dir.path(), &["completions", "bash"]);
    assert!(bash.contains("complete -F _vbackup"), "{bash}");
    let out = Command::new("bash")
        .args(["-n", "-c", &bash])
        .output()
        .unwrap();
    assert!(out.status.success(), "bash -n: {}", text(&out));
    fails(dir.path(), &["completions", "tcsh"], 2);
}

#[test]
fn man_page_is_roff_that_names_every_command_and_renders() {
    let dir = tempfile::tempdir().unwrap();
    let page = ok(dir.path(), &["man"]);
    assert!(page.contains("\n.TH vbackup 1"), "{page}");
    assert!(
        page.contains(".SH SUBCOMMANDS") || page.contains(".SH COMMANDS"),
        "{page}"
    );
    for command in COMMANDS {
        assert!(
            page.contains(&format!("vbackup\\-{command}")),
            "man lacks {command}"
        );
    }
    assert!(!page.contains("synth"), "the hidden synth is in the page");
    let backup = ok(dir.path(), &["man", "backup"]);
    assert!(backup.contains(".TH vbackup-backup 1"), "{backup}");
    assert!(backup.contains("\\-\\-qmp"), "{backup}");
    let token = ok(dir.path(), &["man", "server", "token", "add"]);
    assert!(token.contains(".TH vbackup-server-token-add 1"), "{token}");
    let err = fails(dir.path(), &["man", "bakup"], 2);
    assert!(
        err.contains("no command 'bakup'") && err.contains("backup"),
        "{err}"
    );
    if Command::new("man").arg("--version").output().is_ok() {
        let mut child = Command::new("man")
            .args(["-l", "-"])
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(page.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "man -l -: {}", text(&out));
        assert!(
            shown.contains("NAME") && shown.contains("vbackup-backup"),
            "{shown}"
        );
    }
}

#[test]
fn storage_errors_name_a_repository_path_that_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, "x").unwrap();
    let err = fails(dir.path(), &["init", "--repo", s(&file)], 1);
    assert!(
        err.contains(&format!(
            "cannot create the repository at {}",
            file.display()
        )),
        "{err}"
    );
    assert!(err.contains(&format!("{}/config", file.display())), "{err}");
    assert!(err.contains("Not a directory"), "{err}");
    assert!(!err.contains("(object '')"), "{err}");
    let err = fails(dir.path(), &["snapshots", "--repo", s(&file)], 1);
    assert!(err.contains(&format!("{}/config", file.display())), "{err}");
    assert!(err.contains("Not a directory"), "{err}");
}

/// A read-only tmpfs mounted on a folder, unmounted when dropped.
struct ReadOnlyMount(std::path::PathBuf);

impl ReadOnlyMount {
    /// Mounts one on `dir`, or `None` where this process may not mount.
    fn on(dir: &Path) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", s(dir)])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        mounted.then(|| Self(dir.to_path_buf()))
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn storage_errors_name_a_read_only_location() {
    let dir = tempfile::tempdir().unwrap();
    // A read-only filesystem where this test may mount one (root ignores
    // permission bits); /sys, which refuses new folders to everyone, always.
    let mount = ReadOnlyMount::on(&dir.path().join("ro"));
    let mut targets = vec![(
        Path::new("/sys/vbackup-repo").to_path_buf(),
        "Operation not permitted",
    )];
    if let Some(mount) = &mount {
        targets.push((mount.0.join("repo"), "Read-only file system"));
    } else {
        eprintln!("cannot mount a read-only tmpfs here: only /sys is tried");
    }
    for (target, reason) in targets {
        let err = fails(dir.path(), &["init", "--repo", s(&target)], 1);
        let named = format!(
            "cannot create the repository at {}: creating the folder {}/",
            target.display(),
            target.display()
        );
        assert!(err.contains(&named), "{err}");
        assert!(err.contains(reason), "{err}");
        assert!(!err.contains("(object '')"), "{err}");
    }
}

/// A libvirt domain with the VM's qcow2 disk and a second disk that is
/// not backed up.
fn domain_xml(disk: &Path) -> String {
    format!(
        "<domain type='kvm'>
  <name>web1</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/other.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>
",
        disk.display()
    )
}

#[test]
fn driver_type_in_the_restored_definition_matches_the_restored_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("web1.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&image), "16M"],
    );
    guest_write(&image, 7, 0, 1 << 20);
    let config = dir.path().join("web1.xml");
    std::fs::write(&config, domain_xml(&image)).unwrap();
    ok(dir.path(), &["init"]);
    ok(
        dir.path(),
        &[
            "backup",
            "--vm",
            "web1",
            "--definition",
            s(&config),
            s(&image),
        ],
    );
    for format in ["raw", "qcow2"] {
        let target = dir.path().join(format!("restored-{format}"));
        ok(
            dir.path(),
            &[
                "restore",
                "latest",
                "--target",
                s(&target),
                "--format",
                format,
            ],
        );
        let restored = target.join(format!("web1.{format}"));
        let info = tool("qemu-img", &["info", "--output=json", s(&restored)]);
        assert!(
            info.contains(&format!("\"format\": \"{format}\"")),
            "{info}"
        );
        let xml = std::fs::read_to_string(target.join("web1.xml")).unwrap();
        let expected = domain_xml(&restored).replace(
            "<driver name='qemu' type='qcow2' cache='none'/>",
            &format!("<driver name='qemu' type='{format}' cache='none'/>"),
        );
        assert_eq!(xml, expected, "--format {format}");
    }
    // A relative --target still gives the hypervisor an absolute path.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vbackup"));
    local_env(&mut cmd, dir.path(), PASSWORD)
        .current_dir(dir.path())
        .args(["restore", "latest", "--target", "relative"]);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let xml = std::fs::read_to_string(dir.path().join("relative/web1.xml")).unwrap();
    let restored = dir.path().join("relative/web1.raw");
    assert!(
        xml.contains(&format!("<source file='{}'/>", restored.display())),
        "{xml}"
    );
}
