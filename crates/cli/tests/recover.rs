//! Issue 13: boot verification and instant recovery of the real test
//! guest (Debian's cloud kernel, busybox and qemu-ga; see
//! `docs/test-guest.md`), booted under qemu-system with TCG from its
//! backup: a good snapshot passes and a broken one fails with the reason;
//! instant recovery reaches the heartbeat, the guest writes while its disk
//! is moved, the live restore completes, the guest runs on, and the
//! restored disk holds what it wrote; killed commands leave nothing.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vbackup_qemu::qga::GuestAgent;
use vbackup_testkit::cli::CliEnv;
use vbackup_testkit::guest::{self, GuestImage};
use vbackup_testkit::util::{s, text, tool, walk};

const VBACKUP: &str = env!("CARGO_BIN_EXE_vbackup");

/// A repository holding one backup of the guest's disk (a copy in the
/// test folder, `vda.raw`) with its QEMU command line as the definition;
/// `broken` zeroes the disk's ext4 superblock first.
struct Env {
    cli: CliEnv,
    image: GuestImage,
}

impl Env {
    fn new() -> Self {
        let cli = CliEnv::new(VBACKUP);
        cli.ok(&["init"]);
        std::fs::create_dir_all(cli.path("tmp")).unwrap();
        Self {
            cli,
            image: guest::image(),
        }
    }

    fn disk(&self) -> PathBuf {
        self.cli.path("vda.raw")
    }

    /// Backs up the guest's disk as VM `vm`; returns the snapshot id.
    fn backup(&self, vm: &str, broken: bool) -> String {
        std::fs::copy(&self.image.disk, self.disk()).unwrap();
        if broken {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(self.disk())
                .unwrap();
            std::os::unix::fs::FileExt::write_all_at(&file, &[0u8; 1024], 1024).unwrap();
        }
        let definition = self.cli.path("vm.sh");
        std::fs::write(
            &definition,
            format!(
                "qemu-system-x86_64 -machine q35 -m 256 -nodefaults -no-reboot \\\n  -kernel {} -initrd {} -append '{}' \\\n  -drive file={},format=raw,if=virtio \\\n  -chardev socket,path=/run/web1-qga.sock,server=on,wait=off,id=qga0 \\\n  -device virtio-serial-pci -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \\\n  -nic user\n",
                s(&self.image.kernel),
                s(&self.image.initrd),
                self.image.append,
                s(&self.disk()),
            ),
        )
        .unwrap();
        let out = self.cli.json(&[
            "backup",
            "--vm",
            vm,
            "--definition",
            s(&definition),
            s(&self.disk()),
        ]);
        out["snapshot"].as_str().unwrap().to_string()
    }

    /// vbackup with TCG (this machine's /dev/kvm does not boot guests) and
    /// temporary files in the test folder.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.cli.command(args);
        cmd.env("VBACKUP_ACCEL", "tcg")
            .env("TMPDIR", self.cli.path("tmp"));
        cmd
    }

    fn tmp_is_empty(&self) -> bool {
        std::fs::read_dir(self.cli.path("tmp"))
            .unwrap()
            .next()
            .is_none()
    }
}

/// The pids of qemu-system processes whose command line mentions `needle`.
fn qemu_processes(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("qemu-system") && cmdline.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn boot_verification_passes_on_a_good_backup_and_fails_with_the_reason_on_a_broken_one() {
    let env = Env::new();
    let good = env.backup("web1", false);
    let out = env
        .command(&[
            "verify",
            "--boot",
            &good,
            "--check",
            "test -x /sbin/init && echo fine",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("passed") && stdout.contains("tcg"),
        "{stdout}"
    );

    // The console as heartbeat, and a check that fails.
    let out = env
        .command(&[
            "verify",
            "--boot",
            &good,
            "--expect-console",
            guest::READY,
            "--check",
            "exit 7",
            "--no-record",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("exited with 7"), "{}", text(&out));

    let broken = env.backup("web1", true);
    let out = env
        .command(&["verify", "--boot", &broken, "--timeout", "120"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not pass boot verification") && err.contains(guest::ROOT_FAILED),
        "{err}"
    );

    // Recorded with the snapshots; nothing left behind.
    let list = env.cli.json(&["snapshots"]);
    let boot = |id: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()["boot"]
            .clone()
    };
    assert_eq!(boot(&good)["passed"], true, "{list}");
    assert!(boot(&good)["seconds-to-heartbeat"].as_f64().unwrap() > 0.0);
    assert_eq!(boot(&good)["check-exit"], 0);
    assert_eq!(boot(&broken)["passed"], false, "{list}");
    assert!(boot(&broken)["reason"]
        .as_str()
        .unwrap()
        .contains("cannot mount root"));
    let table = env.cli.ok(&["snapshots"]);
    assert!(
        table.contains("BOOT") && table.contains("passed ") && table.contains("failed"),
        "{table}"
    );
    assert!(env.tmp_is_empty(), "the run folder was removed");
    assert!(
        qemu_processes(s(env.cli.dir())).is_empty(),
        "no QEMU is left"
    );
    // The boot reports go with their snapshots.
    env.cli.ok(&["forget", "--keep-last", "1", "--vm", "web1"]);
    let reports = walk(&env.cli.repo().join("verified"));
    assert_eq!(
        reports.len(),
        1,
        "only the kept snapshot's report is left: {reports:?}"
    );
    assert!(s(&reports[0]).contains(&broken), "{reports:?}");
}

#[test]
fn a_live_backup_leaves_a_canary_that_boot_verification_reads_back() {
    let env = Env::new();
    env.backup("web1", false); // writes the disk copy and the definition
    let running = guest::RunningGuest::boot(&env.image, &env.disk(), "raw");
    assert!(
        running.wait_console(guest::READY, Duration::from_secs(120)),
        "{}",
        running.console()
    );
    let out = env.cli.json(&[
        "backup",
        "--vm",
        "live1",
        "--qmp",
        s(running.qmp_socket()),
        "--qga",
        s(running.qga_socket()),
        "--definition",
        s(&env.cli.path("vm.sh")),
    ]);
    let id = out["snapshot"].as_str().unwrap().to_string();
    drop(running);
    let out = env.command(&["verify", "--boot", &id]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("canary matched"),
        "{}",
        text(&out)
    );
    let list = env.cli.json(&["snapshots", "--vm", "live1"]);
    assert_eq!(list[0]["boot"]["canary"], "matched", "{list}");
}

/// Reads one JSON line from a running `vbackup --json recover instant`.
fn json_line(reader: &mut impl BufRead) -> Value {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

fn agent(socket: &Path) -> GuestAgent {
    let mut agent = GuestAgent::connect_with_timeout(socket, Duration::from_secs(10)).unwrap();
    agent.sync().unwrap();
    agent
}

#[test]
fn instant_recovery_live_restores_while_the_guest_runs_and_keeps_what_it_wrote() {
    let env = Env::new();
    let id = env.backup("web1", false);
    let dir = env.cli.path("recovered");
    let disks = dir.join("disks");
    let mut child = env
        .command(&[
            "--json",
            "recover",
            "instant",
            &id,
            "--dir",
            s(&dir),
            "--live-restore",
            s(&disks),
            "--no-network",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let running = json_line(&mut stdout);
    let running = &running["running"];
    assert!(
        running["seconds-to-heartbeat"].as_f64().unwrap() > 0.0,
        "{running}"
    );
    let pid = running["pid"].as_u64().unwrap() as u32;
    let socket = PathBuf::from(running["agent"].as_str().unwrap());
    // The guest writes while its disk is being moved.
    let mut guest = agent(&socket);
    let status = guest
        .run(
            "/bin/sh",
            &["-c", "echo written-during-recovery > /root/mark; sync"],
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(status.success(), "{status:?}");
    drop(guest);
    let finished = json_line(&mut stdout);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let finished = &finished["finished"];
    assert!(
        finished["seconds-to-restored"].as_f64().unwrap()
            >= running["seconds-to-running"].as_f64().unwrap()
    );
    assert_eq!(finished["needs-exports"], false);
    // The guest runs on, no longer needing vbackup.
    assert!(alive(pid), "the VM keeps running after vbackup ended");
    let mut guest = agent(&socket);
    guest.ping().unwrap();
    let info = tool(
        "qemu-img",
        &["info", "-U", "--output=json", s(&disks.join("vda.qcow2"))],
    );
    assert!(
        !info.contains("backing-filename"),
        "the restored disk stands alone: {info}"
    );
    guest.shutdown().unwrap();
    wait_until("the guest to power off", Duration::from_secs(60), || {
        !alive(pid)
    });

    // The restored disk holds the file and is otherwise the snapshot's.
    let raw = env.cli.path("restored.raw");
    tool(
        "qemu-img",
        &["convert", "-O", "raw", s(&disks.join("vda.qcow2")), s(&raw)],
    );
    let mark = tool("debugfs", &["-R", "cat /root/mark", s(&raw)]);
    assert!(mark.contains("written-during-recovery"), "{mark}");
    let check = Command::new("e2fsck")
        .args(["-fn", s(&raw)])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the restored file system is clean: {}",
        text(&check)
    );
    let (before, after) = (
        std::fs::read(env.disk()).unwrap(),
        std::fs::read(&raw).unwrap(),
    );
    assert_eq!(before.len(), after.len());
    let changed = before
        .chunks(4096)
        .zip(after.chunks(4096))
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        changed * 4096 < 4 << 20,
        "only what the guest wrote differs ({changed} blocks)"
    );
    assert!(qemu_processes(s(env.cli.dir())).is_empty());
}

#[test]
fn instant_recovery_mirrors_onto_a_raw_target_and_pivots_the_running_guest() {
    let env = Env::new();
    let id = env.backup("web1", false);
    let target = env.cli.path("target.raw");
    let size = std::fs::metadata(env.disk()).unwrap().len();
    std::fs::File::create(&target)
        .unwrap()
        .set_len(size)
        .unwrap();
    let dir = env.cli.path("recovered");
    let out = env
        .command(&[
            "--json",
            "recover",
            "instant",
            &id,
            "--dir",
            s(&dir),
            "--live-restore",
            s(&target),
            "--no-network",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let finished: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let finished = &finished["finished"];
    assert_eq!(
        finished["disks"][0].as_str(),
        Some(s(&target)),
        "{finished}"
    );
    let pid = finished["pid"].as_u64().unwrap() as u32;
    assert!(alive(pid));
    // The guest now writes onto the target itself.
    let mut guest = agent(Path::new(finished["agent"].as_str().unwrap()));
    let status = guest
        .run(
            "/bin/sh",
            &["-c", "echo after-the-pivot > /root/pivot; sync"],
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(status.success(), "{status:?}");
    guest.shutdown().unwrap();
    wait_until("the guest to power off", Duration::from_secs(60), || {
        !alive(pid)
    });
    let mark = tool("debugfs", &["-R", "cat /root/pivot", s(&target)]);
    assert!(mark.contains("after-the-pivot"), "{mark}");
    let check = Command::new("e2fsck")
        .args(["-fn", s(&target)])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    // A target too small, or one too few, is refused before anything starts.
    let small = env.cli.path("small.raw");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(size / 2)
        .unwrap();
    let out = env
        .command(&[
            "recover",
            "instant",
            &id,
            "--dir",
            s(&env.cli.path("r2")),
            "--live-restore",
            s(&small),
            s(&target),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("give as many live-restore targets"),
        "{}",
        text(&out)
    );
}

#[test]
fn instant_recovery_gives_the_disks_to_a_qemu_that_already_runs() {
    let env = Env::new();
    let id = env.backup("web1", false);
    // A QEMU started by someone else, paused, with no disk yet.
    let (qmp, qga) = (env.cli.path("own-qmp.sock"), env.cli.path("own-qga.sock"));
    let mut args = guest::qemu_args(
        &env.image,
        &env.disk(),
        "raw",
        &qmp,
        &qga,
        &env.cli.path("own-console.log"),
    );
    let at = args.iter().position(|a| a == "-drive").unwrap();
    args.drain(at..at + 2);
    for a in args.iter_mut() {
        if a.starts_with("q35") {
            *a = a.replacen("q35", "pc", 1);
        }
    }
    args.push("-S".into());
    let mut qemu = Command::new(vbackup_testkit::qemu::StorageDaemon::qemu_system())
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the QMP socket", Duration::from_secs(30), || qmp.exists());
    let dir = env.cli.path("attached");
    let out = env
        .command(&[
            "--json",
            "recover",
            "instant",
            &id,
            "--dir",
            s(&dir),
            "--qmp",
            s(&qmp),
            "--qga",
            s(&qga),
            "--live-restore",
            s(&dir.join("disks")),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let finished: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(
        finished["finished"]["seconds-to-heartbeat"]
            .as_f64()
            .is_some(),
        "{finished}"
    );
    assert_eq!(finished["finished"]["needs-exports"], false);
    // The VM is still the one we started, running on the restored disk.
    assert!(
        qemu.try_wait().unwrap().is_none(),
        "vbackup did not stop a VM it did not start"
    );
    let mut guest = agent(&qga);
    guest.ping().unwrap();
    guest.shutdown().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while qemu.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if qemu.try_wait().unwrap().is_none() {
        let _ = qemu.kill();
        panic!("the guest did not power off");
    }
}

#[test]
fn killed_recoveries_and_verifications_leave_no_process_or_run_folder() {
    let env = Env::new();
    let id = env.backup("web1", false);
    // A verification killed while its VM boots.
    let mut verify = env
        .command(&[
            "verify",
            "--boot",
            &id,
            "--expect-console",
            "never-printed",
            "--timeout",
            "600",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the verification's VM", Duration::from_secs(60), || {
        !qemu_processes(s(env.cli.dir())).is_empty()
    });
    kill_hard(&mut verify);
    wait_until("the sentinel to stop QEMU", Duration::from_secs(30), || {
        qemu_processes(s(env.cli.dir())).is_empty()
    });
    wait_until("the run folder to go", Duration::from_secs(30), || {
        env.tmp_is_empty()
    });

    // An instant recovery (serving its exports) killed while the VM runs.
    let dir = env.cli.path("rec");
    let mut recover = env
        .command(&[
            "--json",
            "recover",
            "instant",
            &id,
            "--dir",
            s(&dir),
            "--no-network",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = json_line(&mut BufReader::new(recover.stdout.take().unwrap()));
    let pid = running["running"]["pid"].as_u64().unwrap() as u32;
    kill_hard(&mut recover);
    wait_until(
        "the sentinel to stop the VM",
        Duration::from_secs(30),
        || !alive(pid),
    );
    wait_until("the run folder to go", Duration::from_secs(30), || {
        !dir.join(".vbackup-run").exists()
    });
    assert!(dir.join("vda.qcow2").exists(), "the VM's writes are kept");
}

fn kill_hard(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}
