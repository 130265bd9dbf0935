//! Changed-block tracking and live backups against real processes:
//! `qemu-storage-daemon` standing in for a running VM (a "guest" writes
//! through its NBD exports), `qemu-img` / `qemu-nbd` for offline bitmaps,
//! and `qemu-ga` (with freezing disabled) for the guest agent protocol.
//! Every process a test starts is stopped by the end of it.

// Test helpers may panic: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::json;
use vbackup_core::source::DiskSource;
use vbackup_qemu::live::{discover_disks, LiveDiskPlan, LiveOptions, LiveSession};
use vbackup_qemu::qga::FreezeStatus;
use vbackup_qemu::{
    img, open_disk_with, Error, GuestAgent, NbdExportOptions, NbdExportSource, OpenDiskOptions,
    QemuNbd, QemuNbdOptions, QmpClient,
};
use vbackup_testkit::qemu::StorageDaemon;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const REGION: u64 = 64 * KIB;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("vbq-").tempdir().unwrap()
}

fn qcow2(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    img::create(&path, "qcow2", SIZE).unwrap();
    path
}

fn qemu_io(path: &Path, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest writes `byte` over `[offset, offset + len)` of disk `node`.
fn guest_write(qsd: &StorageDaemon, node: &str, offset: u64, len: u64, byte: u8) {
    let mut guest = qsd.guest(node).unwrap();
    guest.write_at(&vec![byte; len as usize], offset).unwrap();
    guest.flush().unwrap();
}

fn read(source: &dyn DiskSource, offset: u64, len: u64) -> Vec<u8> {
    let mut reader = source.open_reader().unwrap();
    let mut buf = vec![0u8; len as usize];
    reader.read_exact_at(&mut buf, offset).unwrap();
    buf
}

fn assert_filled(source: &dyn DiskSource, offset: u64, len: u64, byte: u8) {
    let data = read(source, offset, len);
    assert!(
        data.iter().all(|&b| b == byte),
        "expected {byte:#x} at {offset}+{len}, found {:#x}",
        data[0]
    );
}

/// The 64 KiB regions `changed()` reports, over the whole disk.
fn changed_regions(source: &dyn DiskSource) -> Vec<u64> {
    let mut reader = source.open_reader().unwrap();
    (0..source.virtual_size() / REGION)
        .map(|i| i * REGION)
        .filter(|&off| reader.changed(off, REGION).unwrap().unwrap())
        .collect()
}

fn regions(ranges: &[(u64, u64)]) -> Vec<u64> {
    let mut out: Vec<u64> = ranges
        .iter()
        .flat_map(|&(off, len)| (off / REGION..(off + len).div_ceil(REGION)).map(|r| r * REGION))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn bitmap(qmp: &mut QmpClient, node: &str, name: &str) -> Option<vbackup_qemu::live::LiveBitmap> {
    let disks = discover_disks(qmp).unwrap();
    let disk = disks.iter().find(|d| d.node == node).unwrap();
    disk.bitmap(name).cloned()
}

/// Nothing of a session is left in QEMU or on disk.
fn assert_clean(qmp: &mut QmpClient, work_dir: &Path) {
    let ours = |s: &str| s.starts_with("vbackup-");
    let exports = qmp.query_block_exports().unwrap();
    assert!(!exports.iter().any(|e| ours(&e.id)), "{exports:?}");
    let jobs = qmp.query_block_jobs().unwrap();
    assert!(jobs.is_empty(), "{jobs:?}");
    for node in qmp.query_named_block_nodes().unwrap() {
        let name = node.node_name.unwrap_or_default();
        assert!(!ours(&name), "node {name} left behind");
        for b in node.dirty_bitmaps {
            let b = b.name.unwrap_or_default();
            assert!(!ours(&b), "bitmap {b} left behind on {name}");
        }
    }
    assert!(!work_dir.exists(), "{} left behind", work_dir.display());
}

fn options_with_socket(qsd: &StorageDaemon) -> LiveOptions<'static> {
    LiveOptions {
        nbd_socket: qsd.guest_socket(),
        ..LiveOptions::default()
    }
}

#[test]
fn qmp_handshake_commands_and_errors() {
    let dir = tmp();
    let disk = qcow2(dir.path(), "d.qcow2");
    let qsd = StorageDaemon::start(&[("d0", &disk)], false).unwrap();
    let mut qmp = qsd.qmp().unwrap();
    assert!(qmp.version().unwrap().major >= 6);
    let version = qmp.execute("query-version", json!(null)).unwrap();
    assert!(version["qemu"]["major"].is_u64());

    let err = qmp.execute("no-such-command", json!({})).unwrap_err();
    assert!(matches!(&err, Error::Qmp { class, .. } if class == "CommandNotFound"));
    assert!(err.to_string().contains("'no-such-command'"), "{err}");

    let err = qmp.bitmap_remove("d0", "missing").unwrap_err().to_string();
    assert!(
        err.contains("'block-dirty-bitmap-remove'") && err.contains("missing"),
        "{err}"
    );
    let err = qmp
        .execute("query-version", json!([1]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("must be an object"), "{err}");

    // Still usable after errors; events wait with a timeout.
    qmp.bitmap_add("d0", "b0", false, false).unwrap();
    let err = qmp
        .wait_event("NO_SUCH_EVENT", |_| true, Duration::from_millis(100))
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert_eq!(
        bitmap(&mut qmp, "d0", "b0").map(|b| b.recording),
        Some(true)
    );
}

#[test]
fn discovery_lists_top_level_nodes_with_their_bitmaps() {
    let dir = tmp();
    let a = qcow2(dir.path(), "a.qcow2");
    let b = qcow2(dir.path(), "b.qcow2");
    let qsd = StorageDaemon::start(&[("da", &a), ("db", &b)], true).unwrap();
    let mut qmp = qsd.qmp().unwrap();
    qmp.bitmap_add("db", "daily", true, false).unwrap();
    qmp.bitmap_add("db", "frozen", false, true).unwrap();
    let disks = discover_disks(&mut qmp).unwrap();
    let nodes: Vec<&str> = disks.iter().map(|d| d.node.as_str()).collect();
    assert_eq!(nodes, ["da", "db"]);
    let db = &disks[1];
    assert_eq!(
        (db.name.as_str(), db.format.as_str(), db.size),
        ("db", "qcow2", SIZE)
    );
    assert!(db.filename.ends_with("b.qcow2"), "{}", db.filename);
    let daily = db.bitmap("daily").unwrap();
    assert!(daily.recording && daily.persistent && !daily.inconsistent && !daily.busy);
    assert_eq!(daily.granularity, REGION);
    let frozen = db.bitmap("frozen").unwrap();
    assert!(!frozen.recording && !frozen.persistent);
    assert!(disks[0].bitmaps.is_empty());
}

#[test]
fn offline_bitmaps_drive_changed_through_qemu_nbd() {
    let dir = tmp();
    let path = qcow2(dir.path(), "o.qcow2");
    qemu_io(&path, &["write -P 0xaa 1M 64k"]);
    img::bitmap_add(&path, "qcow2", "b1").unwrap();
    let info = img::image_info(&path).unwrap();
    let b1 = info.bitmap("b1").unwrap();
    assert!(b1.is_recording() && b1.is_consistent());
    // After b1: a region, an unaligned range over two regions, one byte.
    qemu_io(
        &path,
        &[
            "write -P 0xbb 4M 64k",
            "write -P 0xbb 9000k 100k",
            "write -P 0xbb 15M 1",
        ],
    );
    let opts = OpenDiskOptions {
        bitmap: Some("b1".into()),
        ..OpenDiskOptions::default()
    };
    let source = open_disk_with(&path, &opts).unwrap();
    let expected = regions(&[(4 * MIB, REGION), (9000 * KIB, 100 * KIB), (15 * MIB, 1)]);
    assert_eq!(changed_regions(source.as_ref()), expected);
    let mut reader = source.open_reader().unwrap();
    assert_eq!(reader.changed(0, 4 * MIB).unwrap(), Some(false));
    assert_eq!(reader.changed(0, SIZE).unwrap(), Some(true));
    assert_eq!(reader.changed(5 * MIB, 0).unwrap(), Some(false));
    drop((reader, source));

    // Without a bitmap, changed() says "not tracked".
    let plain = open_disk_with(&path, &OpenDiskOptions::default()).unwrap();
    assert_eq!(plain.open_reader().unwrap().changed(0, SIZE).unwrap(), None);
    drop(plain);

    // Disable, enable, merge, remove.
    img::bitmap_add(&path, "qcow2", "b2").unwrap();
    img::bitmap_disable(&path, "qcow2", "b2").unwrap();
    assert!(!img::image_info(&path)
        .unwrap()
        .bitmap("b2")
        .unwrap()
        .is_recording());
    img::bitmap_merge(&path, "qcow2", "b1", "b2").unwrap();
    img::bitmap_enable(&path, "qcow2", "b2").unwrap();
    img::bitmap_remove(&path, "qcow2", "b1").unwrap();
    let info = img::image_info(&path).unwrap();
    assert!(info.bitmap("b1").is_none() && info.bitmap("b2").unwrap().is_recording());
    let opts = OpenDiskOptions {
        bitmap: Some("b2".into()),
        ..OpenDiskOptions::default()
    };
    let merged = open_disk_with(&path, &opts).unwrap();
    assert_eq!(changed_regions(merged.as_ref()), expected);
}

#[test]
fn missing_bitmaps_are_errors_never_nothing_changed() {
    let dir = tmp();
    let path = qcow2(dir.path(), "m.qcow2");
    let opts = OpenDiskOptions {
        bitmap: Some("nope".into()),
        ..OpenDiskOptions::default()
    };
    let err = open_disk_with(&path, &opts).err().unwrap().to_string();
    assert!(err.contains("'nope'") && err.contains("m.qcow2"), "{err}");

    // qemu-nbd refuses it with its own message.
    let nbd_opts = QemuNbdOptions {
        bitmap: Some("nope".into()),
        ..QemuNbdOptions::new(&path)
    };
    let err = QemuNbd::start(&nbd_opts).unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");

    // A server that does not offer the context.
    let server = QemuNbd::start(&QemuNbdOptions::new(&path)).unwrap();
    let export = NbdExportOptions {
        bitmap: Some("b9".into()),
        ..NbdExportOptions::new("")
    };
    let err = NbdExportSource::open(server.socket_path(), export).unwrap_err();
    assert!(matches!(err, Error::MissingBitmap { .. }), "{err}");
    assert!(err.to_string().contains("qemu:dirty-bitmap:b9"), "{err}");
}

#[test]
fn qemu_img_bitmap_keeps_qemus_lock_message_while_the_image_is_in_use() {
    let dir = tmp();
    let path = qcow2(dir.path(), "l.qcow2");
    let _qsd = StorageDaemon::start(&[("d0", &path)], false).unwrap();
    let err = img::bitmap_add(&path, "qcow2", "b1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("lock") && err.contains("l.qcow2"), "{err}");
}

/// Guest writes A, bitmap b1, guest writes B, session (b1 read, b2
/// added), guest writes C during the session.
struct Incremental {
    _dir: tempfile::TempDir,
    qsd: StorageDaemon,
}

const A: (u64, u64) = (MIB, REGION);
const B1: (u64, u64) = (4 * MIB, REGION);
const B2: (u64, u64) = (8 * MIB + 32 * KIB, 100 * KIB);
const C1: (u64, u64) = (4 * MIB, REGION);
const C2: (u64, u64) = (12 * MIB, REGION);

impl Incremental {
    fn new() -> Self {
        let dir = tmp();
        let disk = qcow2(dir.path(), "inc.qcow2");
        let qsd = StorageDaemon::start(&[("d0", &disk)], true).unwrap();
        guest_write(&qsd, "d0", A.0, A.1, 0xaa);
        qsd.qmp()
            .unwrap()
            .bitmap_add("d0", "b1", true, false)
            .unwrap();
        guest_write(&qsd, "d0", B1.0, B1.1, 0xbb);
        guest_write(&qsd, "d0", B2.0, B2.1, 0xbb);
        Incremental { _dir: dir, qsd }
    }

    fn plan() -> LiveDiskPlan {
        LiveDiskPlan {
            read_bitmap: Some("b1".into()),
            add_bitmaps: vec!["b2".into()],
            remove_after: vec!["b1".into()],
            ..LiveDiskPlan::full("d0")
        }
    }

    /// Begins, writes C, checks the view and the changes, returns the
    /// session's work directory.
    fn during(&self, session: &LiveSession<'_>) -> PathBuf {
        guest_write(&self.qsd, "d0", C1.0, C1.1, 0xcc);
        guest_write(&self.qsd, "d0", C2.0, C2.1, 0xcc);
        let source = &session.sources()[0];
        assert_eq!((source.virtual_size(), source.format()), (SIZE, "qcow2"));
        assert_filled(source.as_ref(), A.0, A.1, 0xaa);
        assert_filled(source.as_ref(), B1.0, B1.1, 0xbb);
        assert_filled(source.as_ref(), B2.0, B2.1, 0xbb);
        assert_filled(source.as_ref(), C2.0, C2.1, 0);
        assert_eq!(changed_regions(source.as_ref()), regions(&[B1, B2]));
        // The extents still describe holes.
        let mut reader = source.open_reader().unwrap();
        let extents = reader.extents(12 * MIB, MIB).unwrap();
        assert_eq!(extents.len(), 1, "{extents:?}");
        assert!(!session.frozen());
        assert_eq!(
            session.freeze_report().reason.as_deref(),
            Some("no guest agent")
        );
        session.work_dir().unwrap().to_owned()
    }
}

#[test]
fn incremental_commit_reads_the_instant_and_rotates_bitmaps() {
    let t = Incremental::new();
    let mut qmp = t.qsd.qmp().unwrap();
    let session = LiveSession::begin(
        &mut qmp,
        &[Incremental::plan()],
        options_with_socket(&t.qsd),
    )
    .unwrap();
    let work_dir = t.during(&session);
    session.commit().unwrap();

    assert!(bitmap(&mut qmp, "d0", "b1").is_none());
    let b2 = bitmap(&mut qmp, "d0", "b2").unwrap();
    assert!(b2.recording && b2.persistent);
    assert_eq!(b2.dirty_bytes, 2 * REGION);
    assert_clean(&mut qmp, &work_dir);

    // b2 holds exactly C, and survives a clean restart.
    drop(qmp);
    let mut qsd = t.qsd;
    qsd.stop().unwrap();
    let path = t._dir.path().join("inc.qcow2");
    let opts = OpenDiskOptions {
        bitmap: Some("b2".into()),
        ..OpenDiskOptions::default()
    };
    let source = open_disk_with(&path, &opts).unwrap();
    assert_eq!(changed_regions(source.as_ref()), regions(&[C1, C2]));
}

#[test]
fn incremental_abort_merges_back_and_keeps_b1_recording() {
    let t = Incremental::new();
    let mut qmp = t.qsd.qmp().unwrap();
    let session = LiveSession::begin(
        &mut qmp,
        &[Incremental::plan()],
        options_with_socket(&t.qsd),
    )
    .unwrap();
    let work_dir = t.during(&session);
    session.abort().unwrap();

    assert!(bitmap(&mut qmp, "d0", "b2").is_none());
    let b1 = bitmap(&mut qmp, "d0", "b1").unwrap();
    assert!(b1.recording);
    // B and C: 4M (both), 8M+32K..8M+132K (two regions), 12M.
    assert_eq!(
        b1.dirty_bytes,
        regions(&[B1, B2, C1, C2]).len() as u64 * REGION
    );
    assert_clean(&mut qmp, &work_dir);

    // Still recording: a later write lands in b1.
    drop(qmp);
    guest_write(&t.qsd, "d0", 14 * MIB, 1, 0xdd);
    let mut qmp = t.qsd.qmp().unwrap();
    let b1 = bitmap(&mut qmp, "d0", "b1").unwrap();
    assert_eq!(
        b1.dirty_bytes,
        (regions(&[B1, B2, C1, C2]).len() as u64 + 1) * REGION
    );
}

#[test]
fn dropping_a_session_aborts_it() {
    let t = Incremental::new();
    let mut qmp = t.qsd.qmp().unwrap();
    let session = LiveSession::begin(
        &mut qmp,
        &[Incremental::plan()],
        options_with_socket(&t.qsd),
    )
    .unwrap();
    let work_dir = session.work_dir().unwrap().to_owned();
    let reader = session.sources()[0].open_reader().unwrap();
    drop(session);
    drop(reader);
    assert!(bitmap(&mut qmp, "d0", "b1").unwrap().recording);
    assert!(bitmap(&mut qmp, "d0", "b2").is_none());
    assert_clean(&mut qmp, &work_dir);
}

#[test]
fn two_disks_share_one_instant_with_full_and_differential_plans() {
    let dir = tmp();
    let a = qcow2(dir.path(), "a.qcow2");
    let b = qcow2(dir.path(), "b.qcow2");
    let qsd = StorageDaemon::start(&[("da", &a), ("db", &b)], true).unwrap();
    qsd.qmp()
        .unwrap()
        .bitmap_add("db", "since-full", true, false)
        .unwrap();
    guest_write(&qsd, "da", 0, REGION, 0x11);
    guest_write(&qsd, "db", 2 * MIB, REGION, 0x22);

    let mut qmp = qsd.qmp().unwrap();
    let plans = [
        LiveDiskPlan {
            add_bitmaps: vec!["since-full".into()],
            ..LiveDiskPlan::full("da")
        },
        LiveDiskPlan {
            freeze_copy_of: Some("since-full".into()),
            ..LiveDiskPlan::full("db")
        },
    ];
    let session = LiveSession::begin(&mut qmp, &plans, options_with_socket(&qsd)).unwrap();
    guest_write(&qsd, "da", 0, REGION, 0x33);
    guest_write(&qsd, "db", 2 * MIB, REGION, 0x44);
    guest_write(&qsd, "db", 6 * MIB, REGION, 0x44);
    let sources = session.sources();
    assert_filled(sources[0].as_ref(), 0, REGION, 0x11);
    assert_filled(sources[1].as_ref(), 2 * MIB, REGION, 0x22);
    assert_filled(sources[1].as_ref(), 6 * MIB, REGION, 0);
    assert_eq!(
        sources[0].open_reader().unwrap().changed(0, SIZE).unwrap(),
        None
    );
    assert_eq!(changed_regions(sources[1].as_ref()), vec![2 * MIB]);
    assert_eq!(
        session.export_names(),
        [
            format!("vbackup-{}-da", session.token()),
            format!("vbackup-{}-db", session.token())
        ]
    );
    let work_dir = session.work_dir().unwrap().to_owned();
    drop(sources);
    session.commit().unwrap();

    // The differential bitmap kept recording through the session.
    let since_full = bitmap(&mut qmp, "db", "since-full").unwrap();
    assert!(since_full.recording);
    assert_eq!(since_full.dirty_bytes, 2 * REGION);
    // The new bitmap on da saw only the write after the instant.
    assert_eq!(
        bitmap(&mut qmp, "da", "since-full").unwrap().dirty_bytes,
        REGION
    );
    assert_clean(&mut qmp, &work_dir);
}

#[test]
fn without_a_running_nbd_server_the_session_starts_and_stops_its_own() {
    let dir = tmp();
    let disk = qcow2(dir.path(), "own.qcow2");
    qemu_io(&disk, &["write -P 0x5a 3M 64k"]);
    let qsd = StorageDaemon::start(&[("d0", &disk)], false).unwrap();
    let mut qmp = qsd.qmp().unwrap();
    let session = LiveSession::begin(
        &mut qmp,
        &[LiveDiskPlan::full("d0")],
        LiveOptions::default(),
    )
    .unwrap();
    let socket = session.nbd_socket().to_owned();
    assert!(socket.starts_with(session.work_dir().unwrap()));
    let source = &session.sources()[0];
    assert_filled(source.as_ref(), 3 * MIB, REGION, 0x5a);
    assert_filled(source.as_ref(), 0, MIB, 0);
    let work_dir = session.work_dir().unwrap().to_owned();
    session.commit().unwrap();
    assert_clean(&mut qmp, &work_dir);
    // Our server is gone: QEMU accepts a new one.
    let again = dir.path().join("again.sock");
    qmp.nbd_server_start_unix(&again).unwrap();
    qmp.nbd_server_stop().unwrap();
}

#[test]
fn a_running_nbd_server_needs_its_socket_and_failures_leave_nothing() {
    let dir = tmp();
    let disk = qcow2(dir.path(), "busy.qcow2");
    let qsd = StorageDaemon::start(&[("d0", &disk)], true).unwrap();
    let mut qmp = qsd.qmp().unwrap();
    qmp.bitmap_add("d0", "b1", true, false).unwrap();
    let plan = LiveDiskPlan {
        read_bitmap: Some("b1".into()),
        add_bitmaps: vec!["b2".into()],
        ..LiveDiskPlan::full("d0")
    };
    let err = LiveSession::begin(
        &mut qmp,
        std::slice::from_ref(&plan),
        LiveOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("--nbd-socket") && err.contains("already running"),
        "{err}"
    );

    // A wrong socket: the export is added, then the probe fails; all undone.
    let wrong = QemuNbd::start(&QemuNbdOptions::new(qcow2(dir.path(), "other.qcow2"))).unwrap();
    let options = LiveOptions {
        nbd_socket: Some(wrong.socket_path().to_owned()),
        ..LiveOptions::default()
    };
    let err = LiveSession::begin(&mut qmp, &[plan], options)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("disk d0") && err.contains("socket of this QEMU"),
        "{err}"
    );
    let b1 = bitmap(&mut qmp, "d0", "b1").unwrap();
    assert!(b1.recording, "b1 must record again after a failed begin");
    assert!(bitmap(&mut qmp, "d0", "b2").is_none());
    let exports = qmp.query_block_exports().unwrap();
    assert!(
        exports.iter().all(|e| !e.id.starts_with("vbackup-")),
        "{exports:?}"
    );
    assert!(qmp.query_block_jobs().unwrap().is_empty());
}

#[test]
fn bad_plans_are_refused_naming_disk_and_bitmap() {
    let dir = tmp();
    let disk = qcow2(dir.path(), "p.qcow2");
    let mut qsd = StorageDaemon::start(&[("d0", &disk)], true).unwrap();
    let mut qmp = qsd.qmp().unwrap();
    let refuse = |qmp: &mut QmpClient, plan: LiveDiskPlan| {
        LiveSession::begin(qmp, &[plan], LiveOptions::default())
            .err()
            .unwrap()
            .to_string()
    };
    let err = refuse(&mut qmp, LiveDiskPlan::full("nope"));
    assert!(err.contains("'nope'") && err.contains("d0"), "{err}");
    let missing = LiveDiskPlan {
        read_bitmap: Some("b1".into()),
        ..LiveDiskPlan::full("d0")
    };
    let err = refuse(&mut qmp, missing.clone());
    assert!(err.starts_with("disk d0:") && err.contains("'b1'"), "{err}");

    qmp.bitmap_add("d0", "off", true, true).unwrap();
    let disabled = LiveDiskPlan {
        read_bitmap: Some("off".into()),
        ..LiveDiskPlan::full("d0")
    };
    let err = refuse(&mut qmp, disabled);
    assert!(err.contains("not recording"), "{err}");

    // A bitmap stored in the image and recording when QEMU died is
    // inconsistent; one added since and never stored is simply gone.
    qmp.bitmap_add("d0", "volatile", true, false).unwrap();
    drop(qmp);
    qsd.stop().unwrap();
    img::bitmap_remove(&disk, "qcow2", "volatile").unwrap();
    img::bitmap_add(&disk, "qcow2", "b1").unwrap();
    qsd.restart().unwrap();
    qsd.qmp()
        .unwrap()
        .bitmap_add("d0", "volatile", true, false)
        .unwrap();
    qsd.kill();
    assert!(!img::image_info(&disk)
        .unwrap()
        .bitmap("b1")
        .unwrap()
        .is_consistent());
    qsd.restart().unwrap();
    let mut qmp = qsd.qmp().unwrap();
    let b1 = bitmap(&mut qmp, "d0", "b1").unwrap();
    assert!(b1.inconsistent, "{b1:?}");
    assert!(bitmap(&mut qmp, "d0", "volatile").is_none());
    let err = refuse(&mut qmp, missing);
    assert!(err.contains("inconsistent"), "{err}");
}

#[test]
fn non_persistent_bitmaps_are_lost_on_restart_persistent_ones_kept() {
    let dir = tmp();
    let disk = qcow2(dir.path(), "r.qcow2");
    let mut qsd = StorageDaemon::start(&[("d0", &disk)], true).unwrap();
    let mut qmp = qsd.qmp().unwrap();
    qmp.bitmap_add("d0", "keep", true, false).unwrap();
    qmp.bitmap_add("d0", "lose", false, false).unwrap();
    drop(qmp);
    guest_write(&qsd, "d0", 0, 1, 1);
    qsd.restart().unwrap();
    let mut qmp = qsd.qmp().unwrap();
    let keep = bitmap(&mut qmp, "d0", "keep").unwrap();
    assert!(keep.recording && !keep.inconsistent && keep.dirty_bytes == REGION);
    assert!(bitmap(&mut qmp, "d0", "lose").is_none());
}

/// A `qemu-ga` on a unix socket with every freeze RPC disabled: it must
/// never freeze this machine's file systems.
struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Option<Agent> {
        let dir = tmp();
        let socket = dir.path().join("qga.sock");
        let blocked = "guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw,\
                       guest-shutdown,guest-suspend-disk,guest-suspend-ram,guest-suspend-hybrid,\
                       guest-exec,guest-file-open,guest-set-user-password,guest-fstrim,\
                       guest-set-vcpus,guest-set-memory-blocks,guest-set-time";
        let child = Command::new("qemu-ga")
            .args(["-m", "unix-listen", "-p"])
            .arg(&socket)
            .arg("-f")
            .arg(dir.path().join("qga.pid"))
            .arg("-t")
            .arg(dir.path())
            .arg(format!("--block-rpcs={blocked}"))
            .spawn();
        let Ok(child) = child else {
            eprintln!("qemu-ga not installed: skipping the guest agent test");
            return None;
        };
        let agent = Agent {
            child,
            socket,
            _dir: dir,
        };
        for _ in 0..500 {
            if agent.socket.exists() {
                return Some(agent);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("qemu-ga did not create its socket");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_refused_freeze_is_reported_as_crash_consistent() {
    let Some(agent) = Agent::start() else {
        return;
    };
    let mut ga = GuestAgent::connect(&agent.socket).unwrap();
    ga.ping().unwrap();
    assert_eq!(ga.fsfreeze_status().unwrap(), FreezeStatus::Thawed);
    ga.sync().unwrap();
    let err = ga.fsfreeze_freeze().unwrap_err();
    assert!(matches!(err, Error::GuestAgent { .. }), "{err}");
    assert!(err.to_string().contains("disabled"), "{err}");

    let dir = tmp();
    let disk = qcow2(dir.path(), "g.qcow2");
    let qsd = StorageDaemon::start(&[("d0", &disk)], false).unwrap();
    let mut qmp = qsd.qmp().unwrap();
    let options = LiveOptions {
        guest_agent: Some(&mut ga),
        ..LiveOptions::default()
    };
    let session = LiveSession::begin(&mut qmp, &[LiveDiskPlan::full("d0")], options).unwrap();
    assert!(!session.frozen());
    let report = session.freeze_report().clone();
    session.commit().unwrap();
    let reason = report.reason.unwrap();
    assert!(
        reason.contains("guest-fsfreeze-freeze") && reason.contains("disabled"),
        "{reason}"
    );
    assert_eq!(report.thaw_error, None);
    assert_eq!(ga.fsfreeze_status().unwrap(), FreezeStatus::Thawed);
}

#[test]
fn leftovers_of_a_killed_session_are_removed() {
    let t = Incremental::new();
    let mut qmp = t.qsd.qmp().unwrap();
    let plan = LiveDiskPlan {
        freeze_copy_of: Some("b1".into()),
        ..LiveDiskPlan::full("d0")
    };
    let session = LiveSession::begin(&mut qmp, &[plan], options_with_socket(&t.qsd)).unwrap();
    let work_dir = session.work_dir().unwrap().to_owned();
    // As if vbackup were killed: nothing is cleaned up.
    std::mem::forget(session);
    assert!(work_dir.exists());
    let removed = vbackup_qemu::live::cleanup_leftovers(&mut qmp, Duration::from_secs(10)).unwrap();
    let text = removed.join("\n");
    for what in [
        "NBD export",
        "block job",
        "block node",
        "dirty bitmap vbackup-tmp-",
        "folder",
    ] {
        assert!(text.contains(what), "{what} missing from:\n{text}");
    }
    assert_clean(&mut qmp, &work_dir);
    assert!(bitmap(&mut qmp, "d0", "b1").unwrap().recording);
    assert!(
        vbackup_qemu::live::cleanup_leftovers(&mut qmp, Duration::from_secs(1))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn leftovers_include_our_own_nbd_server() {
    let dir = tmp();
    let disk = qcow2(dir.path(), "own.qcow2");
    let qsd = StorageDaemon::start(&[("d0", &disk)], false).unwrap();
    let mut qmp = qsd.qmp().unwrap();
    let session = LiveSession::begin(
        &mut qmp,
        &[LiveDiskPlan::full("d0")],
        LiveOptions::default(),
    )
    .unwrap();
    let work_dir = session.work_dir().unwrap().to_owned();
    std::mem::forget(session);
    let removed = vbackup_qemu::live::cleanup_leftovers(&mut qmp, Duration::from_secs(10)).unwrap();
    assert!(
        removed.iter().any(|r| r.starts_with("NBD server")),
        "{removed:?}"
    );
    assert_clean(&mut qmp, &work_dir);
    let again = dir.path().join("again.sock");
    qmp.nbd_server_start_unix(&again).unwrap();
    qmp.nbd_server_stop().unwrap();
}
