//! The test guest (`scripts/guest.sh`) boots under QEMU, its agent
//! answers, runs commands and powers the guest off, and what a command
//! wrote is on the disk afterwards; a disk that cannot be mounted ends the
//! boot quickly with a clear console line.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use vbackup_qemu::GuestAgent;
use vbackup_testkit::guest::{self, RunningGuest, READY, ROOT_FAILED};
use vbackup_testkit::util::{s, tool};

/// Booting under TCG on a loaded 2-core machine takes a while.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// A qcow2 overlay of the pristine guest disk in `dir`.
fn overlay(dir: &Path, base: &Path) -> std::path::PathBuf {
    let disk = dir.join("guest.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(base),
            "-F",
            "raw",
            s(&disk),
        ],
    );
    disk
}

/// Connects to the agent, retrying while it starts (the socket accepts
/// before qemu-ga in the guest reads, so the first syncs may time out).
fn agent(vm: &RunningGuest, deadline: Instant) -> GuestAgent {
    loop {
        match GuestAgent::connect_with_timeout(vm.qga_socket(), Duration::from_secs(5)) {
            Ok(agent) => return agent,
            Err(e) if Instant::now() < deadline => eprintln!("agent not ready yet: {e}"),
            Err(e) => panic!("guest agent: {e}\nconsole:\n{}", vm.console()),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn guest_boots_runs_a_command_through_the_agent_and_powers_off() {
    let image = guest::image();
    let dir = tempfile::tempdir().unwrap();
    let disk = overlay(dir.path(), &image.disk);
    let start = Instant::now();
    let mut vm = RunningGuest::boot(&image, &disk, "qcow2");
    assert!(
        vm.wait_console(READY, BOOT_TIMEOUT),
        "no '{READY}' within {BOOT_TIMEOUT:?}\nconsole:\n{}\nqemu:\n{}",
        vm.console(),
        vm.qemu_log()
    );
    let ready = start.elapsed();
    let mut agent = agent(&vm, start + BOOT_TIMEOUT);
    agent.ping().unwrap();
    let pinged = start.elapsed();
    let accel = vbackup_qemu::QmpClient::connect(vm.qmp_socket())
        .and_then(|mut qmp| qmp.execute("query-kvm", serde_json::json!({})))
        .map(|v| if v["enabled"] == true { "KVM" } else { "TCG" })
        .unwrap_or("unknown");
    eprintln!(
        "guest boot ({accel}): console ready after {ready:?}, first guest-ping after {pinged:?}"
    );

    let wrote = agent
        .run(
            "/bin/sh",
            &[
                "-c",
                "echo hi from the guest > /root/written; sync; cat /root/written",
            ],
            Duration::from_secs(30),
        )
        .unwrap();
    assert!(wrote.success(), "{wrote:?}");
    assert_eq!(wrote.stdout, b"hi from the guest\n");
    let failed = agent
        .run(
            "/bin/sh",
            &["-c", "echo no >&2; exit 3"],
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(
        (failed.exit_code, failed.stderr.as_slice()),
        (Some(3), &b"no\n"[..])
    );

    agent.shutdown().unwrap();
    let status = vm.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "QEMU did not power off after guest-shutdown: {status:?}\nconsole:\n{}",
        vm.console()
    );
    drop(vm);

    let raw = dir.path().join("after.raw");
    tool(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", s(&disk), s(&raw)],
    );
    let file = tool("debugfs", &["-R", "cat /root/written", s(&raw)]);
    assert_eq!(file, "hi from the guest\n");
}

#[test]
fn a_disk_without_a_file_system_ends_the_boot_with_a_clear_line() {
    let image = guest::image();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("broken.raw");
    std::fs::copy(&image.disk, &disk).unwrap();
    // The ext4 superblock: 1024 bytes at offset 1024.
    let mut f = OpenOptions::new().write(true).open(&disk).unwrap();
    f.seek(SeekFrom::Start(1024)).unwrap();
    f.write_all(&[0u8; 1024]).unwrap();
    drop(f);

    let start = Instant::now();
    let mut vm = RunningGuest::boot(&image, &disk, "raw");
    assert!(
        vm.wait_console(ROOT_FAILED, BOOT_TIMEOUT),
        "no '{ROOT_FAILED}'\nconsole:\n{}\nqemu:\n{}",
        vm.console(),
        vm.qemu_log()
    );
    let status = vm.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some(),
        "QEMU still runs after the guest failed to mount its root\nconsole:\n{}",
        vm.console()
    );
    assert!(!vm.console().contains(READY));
    eprintln!("broken root disk: QEMU exited after {:?}", start.elapsed());
}
