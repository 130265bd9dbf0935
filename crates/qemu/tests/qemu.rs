//! Integration tests against real `qemu-img`, `qemu-io` and `qemu-nbd`
//! processes. Every process a test starts is stopped by the end of it
//! (`QemuNbd` on drop, the others run to completion).

// Test helpers may panic: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;

use vbackup_core::source::{DiskSource, Extent, ExtentKind};
use vbackup_core::ErrorClass;
use vbackup_qemu::nbd::proto::{NBD_STATE_HOLE, NBD_STATE_ZERO};
use vbackup_qemu::nbd::BASE_ALLOCATION;
use vbackup_qemu::{
    create_target, img, open_disk, open_disk_with, ConnectOptions, NbdTarget, OpenDiskOptions,
    QemuNbd, QemuNbdOptions, RawFileTarget,
};

const MIB: u64 = 1 << 20;

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn create(path: &Path, format: &str, size: u64) {
    img::create(path, format, size).unwrap();
}

fn qemu_io(path: &Path, format: &str, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(path));
}

/// The pattern the tests write: 0xab at 1 MiB (64 KiB), 0xcd at 3 MiB (128 KiB).
const WRITES: [&str; 2] = ["write -P 0xab 1M 64k", "write -P 0xcd 3M 128k"];

fn expected_disk(size: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    v[MIB as usize..(MIB + 65536) as usize].fill(0xab);
    v[(3 * MIB) as usize..(3 * MIB + 131072) as usize].fill(0xcd);
    v
}

fn read_all(source: &dyn DiskSource) -> Vec<u8> {
    let mut reader = source.open_reader().unwrap();
    let mut buf = vec![0u8; source.virtual_size() as usize];
    reader.read_exact_at(&mut buf, 0).unwrap();
    buf
}

fn assert_tiles(extents: &[Extent], offset: u64, length: u64) {
    let mut pos = offset;
    for e in extents {
        assert_eq!(e.offset, pos, "gap or overlap in {extents:?}");
        assert!(e.length > 0);
        pos = e.end();
    }
    assert_eq!(
        pos,
        offset + length,
        "extents do not cover the range: {extents:?}"
    );
    for pair in extents.windows(2) {
        assert_ne!(pair[0].kind, pair[1].kind, "unmerged extents {extents:?}");
    }
}

/// Zero extents must really read as zero; written bytes must be in Data.
fn assert_extents_agree(extents: &[Extent], content: &[u8]) {
    for e in extents {
        let bytes = &content[e.offset as usize..e.end() as usize];
        if e.kind == ExtentKind::Zero {
            assert!(bytes.iter().all(|&b| b == 0), "non-zero bytes in {e:?}");
        }
    }
    for (i, &b) in content.iter().enumerate() {
        if b != 0 {
            let e = extents
                .iter()
                .find(|e| e.offset <= i as u64 && (i as u64) < e.end())
                .unwrap();
            assert_eq!(
                e.kind,
                ExtentKind::Data,
                "byte {i} is data but lies in {e:?}"
            );
        }
    }
}

fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn every_format_reads_back_what_qemu_io_wrote() {
    let dir = tmp();
    for format in ["qcow2", "vmdk", "vhdx", "vdi", "qed"] {
        let path = dir.path().join(format!("disk.{format}"));
        create(&path, format, 4 * MIB);
        qemu_io(&path, format, &WRITES);
        let source = open_disk(&path, None).unwrap();
        assert_eq!(source.format(), format);
        assert_eq!(source.virtual_size(), 4 * MIB, "{format}");
        let content = read_all(source.as_ref());
        assert!(
            content == expected_disk(4 * MIB),
            "{format}: content differs"
        );
        let extents = source.open_reader().unwrap().extents(0, 4 * MIB).unwrap();
        assert_tiles(&extents, 0, 4 * MIB);
        assert_extents_agree(&extents, &content);
    }
}

#[test]
fn qcow2_extents_report_holes_as_zero_and_writes_as_data() {
    let dir = tmp();
    let path = dir.path().join("disk.qcow2");
    create(&path, "qcow2", 4 * MIB);
    qemu_io(&path, "qcow2", &WRITES);
    let source = open_disk(&path, Some("qcow2")).unwrap();
    let mut reader = source.open_reader().unwrap();
    let z = |offset, length| Extent {
        offset,
        length,
        kind: ExtentKind::Zero,
    };
    let d = |offset, length| Extent {
        offset,
        length,
        kind: ExtentKind::Data,
    };
    assert_eq!(
        reader.extents(0, 4 * MIB).unwrap(),
        vec![
            z(0, MIB),
            d(MIB, 65536),
            z(MIB + 65536, 2 * MIB - 65536),
            d(3 * MIB, 131072),
            z(3 * MIB + 131072, MIB - 131072)
        ]
    );
    // Sub-ranges are clamped to what was asked.
    assert_eq!(
        reader.extents(MIB - 4096, 8192).unwrap(),
        vec![z(MIB - 4096, 4096), d(MIB, 4096)]
    );
    assert_eq!(reader.extents(5, 0).unwrap(), vec![]);
    assert!(reader.extents(4 * MIB - 1, 2).is_err());
}

#[test]
fn raw_images_are_read_directly_with_holes_as_zero() {
    let dir = tmp();
    let path = dir.path().join("disk.raw");
    create(&path, "raw", 4 * MIB);
    qemu_io(&path, "raw", &WRITES);
    let source = open_disk(&path, None).unwrap();
    assert_eq!(source.format(), "raw");
    assert_eq!(source.virtual_size(), 4 * MIB);
    assert!(read_all(source.as_ref()) == expected_disk(4 * MIB));
    let extents = source.open_reader().unwrap().extents(0, 4 * MIB).unwrap();
    assert_tiles(&extents, 0, 4 * MIB);
    assert_extents_agree(&extents, &expected_disk(4 * MIB));
    assert!(
        extents.iter().any(|e| e.kind == ExtentKind::Zero),
        "{extents:?}"
    );
    let mut reader = source.open_reader().unwrap();
    assert!(
        reader.read_exact_at(&mut [0; 2], 4 * MIB - 1).is_err(),
        "short read"
    );
}

#[test]
fn nbd_target_and_raw_target_restore_identical_disks() {
    let dir = tmp();
    let qcow2 = dir.path().join("restored.qcow2");
    let raw = dir.path().join("restored.raw");
    let content = expected_disk(8 * MIB);
    let nbd_target = NbdTarget::create(&qcow2, "qcow2", 8 * MIB, 4).unwrap();
    let raw_target = RawFileTarget::create(&raw, 8 * MIB).unwrap();
    let pid = nbd_target_pid(&qcow2);
    for target in [
        &nbd_target as &dyn vbackup_core::source::DiskTarget,
        &raw_target,
    ] {
        // Two writers in parallel, each its own connection / file.
        thread::scope(|s| {
            for half in 0..2u64 {
                let content = &content;
                let mut writer = target.open_writer().unwrap();
                s.spawn(move || {
                    let start = half * 4 * MIB;
                    for off in (start..start + 4 * MIB).step_by(MIB as usize) {
                        let piece = &content[off as usize..(off + MIB) as usize];
                        if piece.iter().any(|&b| b != 0) {
                            writer.write_all_at(piece, off).unwrap();
                        }
                    }
                    writer.flush().unwrap();
                });
            }
        });
        target.finish().unwrap();
    }
    assert!(
        !pid_exists(pid),
        "qemu-nbd {pid} still running after finish()"
    );
    assert!(
        img::compare(&qcow2, &raw).unwrap(),
        "qcow2 and raw restores differ"
    );
    let info = img::image_info(&qcow2).unwrap();
    assert_eq!(
        (info.format.as_str(), info.virtual_size, info.dirty),
        ("qcow2", 8 * MIB, false)
    );
    let other = dir.path().join("other.raw");
    create(&other, "raw", 8 * MIB);
    assert!(!img::compare(&qcow2, &other).unwrap());
    let source = open_disk(&qcow2, None).unwrap();
    assert!(read_all(source.as_ref()) == content);
}

/// The qemu-nbd serving `image`, found through /proc (NbdTarget keeps it private).
fn nbd_target_pid(image: &Path) -> u32 {
    let wanted = std::path::absolute(image).unwrap();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"qemu-nbd"))
            && args
                .iter()
                .any(|a| *a == wanted.as_os_str().as_encoded_bytes())
        {
            return pid;
        }
    }
    panic!("no qemu-nbd serving {}", image.display());
}

#[test]
fn create_target_dispatches_on_format() {
    let dir = tmp();
    for format in ["raw", "qcow2", "vmdk"] {
        let path = dir.path().join(format!("t.{format}"));
        let target = create_target(&path, format, 2 * MIB).unwrap();
        let mut w = target.open_writer().unwrap();
        w.write_all_at(&[0x5a; 4096], 65536).unwrap();
        w.flush().unwrap();
        drop(w);
        target.finish().unwrap();
        assert_eq!(img::image_info(&path).unwrap().format, format);
        let source = open_disk(&path, Some(format)).unwrap();
        let mut buf = [0u8; 4096];
        source
            .open_reader()
            .unwrap()
            .read_exact_at(&mut buf, 65536)
            .unwrap();
        assert_eq!(buf, [0x5a; 4096], "{format}");
    }
}

#[test]
fn corrupt_qcow2_header_error_carries_qemus_reason() {
    let dir = tmp();
    let path = dir.path().join("bad.qcow2");
    create(&path, "qcow2", 4 * MIB);
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all(b"garbage!garbage!").unwrap();
    drop(f);
    let err = open_disk(&path, Some("qcow2")).err().unwrap().to_string();
    assert!(err.contains("Image is not in qcow2 format"), "{err}");
    assert!(err.contains(&*path.to_string_lossy()), "{err}");
}

#[test]
fn damaged_qcow2_is_refused_with_qemus_reason_when_detected() {
    let dir = tmp();
    let path = dir.path().join("damaged.qcow2");
    create(&path, "qcow2", 4 * MIB);
    // Keep the magic, break cluster_bits (offset 20): detection says qcow2,
    // opening fails.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20..24].copy_from_slice(&99u32.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = open_disk(&path, None).err().unwrap().to_string();
    assert!(err.contains("Could not open"), "{err}");
    assert!(err.contains("luster size"), "{err}");
    assert!(err.contains(&*path.to_string_lossy()), "{err}");
}

#[test]
fn truncated_qcow2_is_refused_with_qemus_reason() {
    let dir = tmp();
    let path = dir.path().join("full.qcow2");
    create(&path, "qcow2", 4 * MIB);
    qemu_io(&path, "qcow2", &WRITES);
    let cut = dir.path().join("cut.qcow2");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&cut, &bytes[..1000]).unwrap();
    // qemu opens it and would read the lost clusters as zeroes: only
    // `qemu-img check` notices.
    for format in [None, Some("qcow2")] {
        let err = open_disk(&cut, format).err().unwrap();
        assert_eq!(err.class(), ErrorClass::Integrity, "issue 11: {err}");
        let err = err.to_string();
        assert!(err.contains(&*cut.to_string_lossy()), "{err}");
        assert!(err.contains("qemu-img check"), "{format:?}: {err}");
        assert!(
            err.contains("errors were found on the image"),
            "{format:?}: {err}"
        );
    }
    let unchecked = OpenDiskOptions {
        check: false,
        ..OpenDiskOptions::default()
    };
    assert!(
        open_disk_with(&cut, &unchecked).is_ok(),
        "qemu itself accepts it"
    );
    let lazy = OpenDiskOptions {
        lazy: true,
        ..OpenDiskOptions::default()
    };
    let source = open_disk_with(&cut, &lazy).expect("lazy opening defers the check");
    let err = source.open_reader().err().unwrap().to_string();
    assert!(err.contains("errors were found on the image"), "{err}");
}

#[test]
fn qemu_nbd_start_failure_shows_its_stderr() {
    let dir = tmp();
    let path = dir.path().join("notqcow2.img");
    std::fs::write(&path, vec![0u8; 65536]).unwrap();
    let opts = QemuNbdOptions {
        format: Some("qcow2".into()),
        ..QemuNbdOptions::new(&path)
    };
    let err = QemuNbd::start(&opts).unwrap_err().to_string();
    assert!(err.starts_with("qemu-nbd could not serve"), "{err}");
    assert!(err.contains("qemu-nbd exited"), "{err}");
    assert!(err.contains("Image is not in qcow2 format"), "{err}");
}

#[test]
fn missing_files_are_named_in_the_error() {
    let dir = tmp();
    let path = dir.path().join("nowhere.qcow2");
    for format in [None, Some("qcow2"), Some("raw")] {
        let err = open_disk(&path, format).err().unwrap();
        assert_eq!(
            err.class(),
            ErrorClass::Usage,
            "issue 11: {format:?}: {err}"
        );
        let err = err.to_string();
        assert!(err.contains(&*path.to_string_lossy()), "{format:?}: {err}");
        assert!(
            err.contains("No such file or directory"),
            "{format:?}: {err}"
        );
    }
    let err = img::image_info(&path).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Usage, "issue 11: {err}");
    let err = err.to_string();
    assert!(err.contains("qemu-img info"), "{err}");
}

#[test]
fn qemu_nbd_is_gone_after_drop() {
    let dir = tmp();
    let path = dir.path().join("d.qcow2");
    create(&path, "qcow2", MIB);
    let server = QemuNbd::start(&QemuNbdOptions::new(&path)).unwrap();
    let pid = server.pid();
    let socket = server.socket_path().to_owned();
    assert!(pid_exists(pid));
    let client = server.connect().unwrap();
    assert_eq!(client.size(), MIB);
    drop(client);
    drop(server);
    assert!(!pid_exists(pid), "qemu-nbd {pid} survived drop");
    assert!(!socket.exists());
    assert!(
        !socket.parent().unwrap().exists(),
        "socket directory left behind"
    );
}

#[test]
fn sources_stop_qemu_nbd_on_drop_even_with_readers_alive_until_they_go() {
    let dir = tmp();
    let path = dir.path().join("d.vmdk");
    create(&path, "vmdk", MIB);
    let source = open_disk(&path, None).unwrap();
    let reader = source.open_reader().unwrap();
    drop(source);
    // The reader keeps the server alive.
    let mut reader = reader;
    reader.read_exact_at(&mut [0; 512], 0).unwrap();
    let pid = nbd_target_pid(&path);
    drop(reader);
    assert!(!pid_exists(pid), "qemu-nbd {pid} survived its last reader");
}

#[test]
fn unknown_export_names_are_reported_by_the_server() {
    let dir = tmp();
    let path = dir.path().join("d.qcow2");
    create(&path, "qcow2", MIB);
    let server = QemuNbd::start(&QemuNbdOptions::new(&path)).unwrap();
    let opts = ConnectOptions {
        export_name: "nope".into(),
        ..ConnectOptions::default()
    };
    let err = server.connect_with(&opts).unwrap_err().to_string();
    // qemu-nbd refuses the name already at NBD_OPT_SET_META_CONTEXT.
    assert!(err.contains("for export 'nope'"), "{err}");
    assert!(err.contains("NBD_REP_ERR_UNKNOWN"), "{err}");
    // The server is still usable.
    assert_eq!(server.connect().unwrap().size(), MIB);
}

#[test]
fn writable_exports_support_zeroes_trim_flush_and_block_status() {
    let dir = tmp();
    let path = dir.path().join("w.qcow2");
    create(&path, "qcow2", 4 * MIB);
    let opts = QemuNbdOptions {
        format: Some("qcow2".into()),
        read_only: false,
        unmap_zeroes: true,
        ..QemuNbdOptions::new(&path)
    };
    let server = QemuNbd::start(&opts).unwrap();
    let mut c = server.connect().unwrap();
    let flags = c.export().flags;
    assert!(
        flags.can_flush() && flags.can_trim() && flags.can_write_zeroes() && !flags.read_only()
    );
    let ctx = c.context_id(BASE_ALLOCATION).unwrap();
    c.write_at(&vec![0x11; 2 * MIB as usize], 0).unwrap();
    c.write_zeroes(0, MIB, false).unwrap();
    c.trim(MIB, 65536).unwrap();
    c.flush().unwrap();
    let extents = c.block_status_range(ctx, 0, 4 * MIB).unwrap();
    assert_eq!(
        extents
            .first()
            .map(|e| (e.offset, e.flags & NBD_STATE_ZERO)),
        Some((0, NBD_STATE_ZERO))
    );
    let data = extents
        .iter()
        .find(|e| e.offset <= MIB + 65536 && MIB + 65536 < e.end())
        .unwrap();
    assert_eq!(
        data.flags & (NBD_STATE_ZERO | NBD_STATE_HOLE),
        0,
        "{extents:?}"
    );
    let mut buf = vec![0xff; 4096];
    c.read_at(&mut buf, 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    c.read_at(&mut buf, MIB + 65536).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
    c.disconnect().unwrap();
    server.stop().unwrap();
    assert!(img::image_info(&path).unwrap().actual_size.is_some());
}

#[test]
fn read_only_exports_refuse_writes_before_sending() {
    let dir = tmp();
    let path = dir.path().join("r.qcow2");
    create(&path, "qcow2", MIB);
    let server = QemuNbd::start(&QemuNbdOptions::new(&path)).unwrap();
    let mut c = server.connect().unwrap();
    assert!(c.export().flags.read_only());
    let err = c.write_at(&[1; 512], 0).unwrap_err().to_string();
    assert!(err.contains("read-only"), "{err}");
    c.read_at(&mut [0; 512], 0).unwrap();
}

#[test]
fn missing_meta_contexts_are_simply_absent() {
    let dir = tmp();
    let path = dir.path().join("m.qcow2");
    create(&path, "qcow2", MIB);
    let server = QemuNbd::start(&QemuNbdOptions::new(&path)).unwrap();
    let opts = ConnectOptions {
        meta_contexts: vec![BASE_ALLOCATION.into(), "qemu:dirty-bitmap:nope".into()],
        ..ConnectOptions::default()
    };
    let c = server.connect_with(&opts).unwrap();
    assert_eq!(
        c.meta_contexts().keys().collect::<Vec<_>>(),
        vec![BASE_ALLOCATION]
    );
}

#[test]
fn connection_limit_is_enforced_and_readers_work_in_parallel() {
    let dir = tmp();
    let path = dir.path().join("p.qcow2");
    create(&path, "qcow2", 4 * MIB);
    qemu_io(&path, "qcow2", &WRITES);
    let opts = OpenDiskOptions {
        connections: 2,
        ..OpenDiskOptions::default()
    };
    let source = open_disk_with(&path, &opts).unwrap();
    let readers: Vec<_> = (0..2).map(|_| source.open_reader().unwrap()).collect();
    let err = source.open_reader().err().unwrap().to_string();
    assert!(err.contains("all 2 connections"), "{err}");
    let expected = expected_disk(4 * MIB);
    thread::scope(|s| {
        for (i, mut reader) in readers.into_iter().enumerate() {
            let expected = &expected;
            s.spawn(move || {
                for round in 0..20u64 {
                    let off = ((round * 2 + i as u64) % 4) * MIB;
                    let mut buf = vec![0u8; MIB as usize];
                    reader.read_exact_at(&mut buf, off).unwrap();
                    assert!(buf[..] == expected[off as usize..(off + MIB) as usize]);
                }
            });
        }
    });
    // Readers dropped: a new one can be opened again.
    source.open_reader().unwrap();
}

#[test]
fn reads_larger_than_the_server_maximum_are_split() {
    let dir = tmp();
    let path = dir.path().join("big.qcow2");
    create(&path, "qcow2", 80 * MIB);
    qemu_io(
        &path,
        "qcow2",
        &["write -P 0x42 30M 4M", "write -P 0x43 70M 1M"],
    );
    let server = QemuNbd::start(&QemuNbdOptions::new(&path)).unwrap();
    let mut c = server.connect().unwrap();
    let max = c.export().block_size.map(|b| b.maximum);
    assert!(c.max_io() <= 32 * MIB as u32, "max {max:?}");
    let mut buf = vec![0xffu8; 80 * MIB as usize];
    c.read_at(&mut buf, 0).unwrap();
    let at = |o: u64| buf[o as usize];
    assert_eq!(
        (at(0), at(30 * MIB), at(34 * MIB - 1), at(34 * MIB)),
        (0, 0x42, 0x42, 0)
    );
    assert_eq!((at(70 * MIB), at(71 * MIB), at(80 * MIB - 1)), (0x43, 0, 0));
}

#[test]
fn image_info_convert_and_bitmaps() {
    let dir = tmp();
    let path = dir.path().join("i.qcow2");
    create(&path, "qcow2", 4 * MIB);
    qemu_io(&path, "qcow2", &WRITES);
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&path)
        .arg("b0"));
    let info = img::image_info(&path).unwrap();
    assert_eq!(
        (info.format.as_str(), info.virtual_size),
        ("qcow2", 4 * MIB)
    );
    assert_eq!(
        info.bitmaps
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>(),
        vec!["b0"]
    );
    assert_eq!(info.cluster_size, Some(65536));
    let vdi: PathBuf = dir.path().join("i.vdi");
    img::convert(&path, None, &vdi, "vdi").unwrap();
    assert!(img::compare(&path, &vdi).unwrap());
    let err = img::convert(&path, None, &dir.path().join("x"), "nonsense")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("qemu-img convert") && err.contains("nonsense"),
        "{err}"
    );
}

#[test]
fn direct_io_serves_unaligned_reads() {
    let dir = tmp();
    let path = dir.path().join("direct.qcow2");
    create(&path, "qcow2", 4 * MIB);
    qemu_io(&path, "qcow2", &WRITES);
    let opts = QemuNbdOptions {
        direct_io: true,
        ..QemuNbdOptions::new(&path)
    };
    let server = QemuNbd::start(&opts).unwrap();
    let mut c = server.connect().unwrap();
    // We never request NBD_INFO_BLOCK_SIZE, so qemu keeps a minimum of 1 and
    // handles the alignment O_DIRECT needs itself.
    assert_eq!(c.export().block_size.map(|b| b.minimum), Some(1));
    let mut buf = [0u8; 3];
    c.read_at(&mut buf, MIB - 1).unwrap();
    assert_eq!(buf, [0, 0xab, 0xab]);
}

/// A qemu-nbd on TCP, killed on drop.
struct TcpServer(std::process::Child);

impl Drop for TcpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tcp_connections_work() {
    let dir = tmp();
    let path = dir.path().join("tcp.qcow2");
    create(&path, "qcow2", 4 * MIB);
    qemu_io(&path, "qcow2", &WRITES);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("qemu-nbd")
        .args([
            "--persistent",
            "--read-only",
            "--format=qcow2",
            "--bind=127.0.0.1",
            "--export-name=disk",
        ])
        .arg(format!("--port={port}"))
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _server = TcpServer(child);
    let address = format!("127.0.0.1:{port}");
    let opts = ConnectOptions {
        export_name: "disk".into(),
        ..ConnectOptions::default()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut c = loop {
        match vbackup_qemu::NbdClient::connect_tcp(&address, &opts) {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
            Err(_) => thread::sleep(std::time::Duration::from_millis(20)),
        }
    };
    let mut buf = [0u8; 4];
    c.read_at(&mut buf, 3 * MIB).unwrap();
    assert_eq!(buf, [0xcd; 4]);
    let ctx = c.context_id(BASE_ALLOCATION).unwrap();
    let first = c.block_status(ctx, 0, 4096).unwrap();
    assert_eq!(first[0].flags & NBD_STATE_ZERO, NBD_STATE_ZERO);
}

/// `qemu-io -f raw PATH -c "write 0 4k"`, as a VM starting on the image
/// would open it: its exit status and stderr.
fn qemu_io_write(path: &Path) -> (bool, String) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x77 0 4k"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn attack_vm_started_during_an_offline_backup_or_a_restore_is_refused_by_qemu() {
    let dir = tmp();
    let path = dir.path().join("disk.raw");
    create(&path, "raw", 2 * MIB);
    // A backup reads the raw image: a VM starting now would change it.
    let source = open_disk(&path, Some("raw")).unwrap();
    let (ok, stderr) = qemu_io_write(&path);
    assert!(!ok && stderr.contains("\"write\" lock"), "{stderr}");
    assert!(read_all(source.as_ref()).iter().all(|&b| b == 0));
    drop(source);
    assert!(
        qemu_io_write(&path).0,
        "writable again once the backup is done"
    );
    // A restore writes it: a VM must not boot a half-written disk.
    let target = create_target(&path, "raw", 2 * MIB).unwrap();
    let (ok, stderr) = qemu_io_write(&path);
    assert!(!ok && stderr.contains("lock"), "{stderr}");
    target.finish().unwrap();
    assert!(
        qemu_io_write(&path).0,
        "usable once the restore is finished"
    );
}
