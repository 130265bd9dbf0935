//! vbackup's NBD server against real QEMU tools: `qemu-img compare`, `map`
//! and `convert` (several connections and requests in flight), `qemu-io`
//! writes. Each test serves an in-memory disk on a unix socket in a
//! temporary folder and stops the server at its end.

// Test helpers may panic: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use vbackup_qemu::nbd::{Allocation, ExportDisk, NbdServer};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const BLOCK: usize = 4096;

/// An in-memory disk: all-zero 4 KiB blocks are holes.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    writable: bool,
}

impl MemDisk {
    fn new(data: Vec<u8>, writable: bool) -> Arc<Self> {
        Arc::new(MemDisk {
            data: Mutex::new(data),
            writable,
        })
    }

    fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
}

impl ExportDisk for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let at = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[at..at + buf.len()]);
        Ok(())
    }

    fn allocation(&self, offset: u64, length: u64) -> io::Result<Vec<Allocation>> {
        let data = self.data.lock().unwrap();
        let end = (offset + length) as usize;
        let mut out: Vec<Allocation> = Vec::new();
        let mut at = offset as usize;
        while at < end {
            let block_end = ((at / BLOCK + 1) * BLOCK).min(end);
            let zero = data[at..block_end].iter().all(|&b| b == 0);
            let length = (block_end - at) as u64;
            match out.last_mut() {
                Some(last) if last.zero == zero => last.length += length,
                _ => out.push(Allocation {
                    length,
                    hole: zero,
                    zero,
                }),
            }
            at = block_end;
        }
        Ok(out)
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let at = offset as usize;
        self.data.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let at = offset as usize;
        self.data.lock().unwrap()[at..at + length as usize].fill(0);
        Ok(())
    }
}

/// 8 MiB: data in [0, 1 MiB), a hole to 3 MiB, 64 KiB of data, holes.
fn sample() -> Vec<u8> {
    let mut data = vec![0u8; 8 * MIB];
    for (i, b) in data[..MIB].iter_mut().enumerate() {
        *b = (i % 241) as u8 + 1;
    }
    data[3 * MIB..3 * MIB + 64 * KIB].fill(0x5a);
    data
}

/// A server on a socket in a temporary folder, running until dropped... or
/// rather until `run` returns: `run` gets the socket path.
fn serve(disk: Arc<MemDisk>, run: impl FnOnce(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let mut server = NbdServer::new();
    server.add_export("vm-disk", "a test disk", disk).unwrap();
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let serving = s.spawn(|| server.serve_unix(listener, &stop));
        // Stop the server even if `run` fails, so the scope can end.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&socket)));
        stop.store(true, Ordering::SeqCst);
        serving.join().unwrap().unwrap();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
}

fn url(socket: &Path) -> String {
    format!("nbd+unix:///vm-disk?socket={}", socket.display())
}

fn output(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn a qemu tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

#[test]
fn qemu_img_compare_finds_the_export_equal_to_its_content() {
    let data = sample();
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "same.raw", &data);
    serve(MemDisk::new(data, false), |socket| {
        output(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(url(socket))
                .arg(&file),
        );
    });
}

#[test]
fn qemu_img_map_shows_the_holes_as_holes() {
    serve(MemDisk::new(sample(), false), |socket| {
        let out = output(
            Command::new("qemu-img")
                .args(["map", "--output=json", "-f", "raw"])
                .arg(url(socket)),
        );
        let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let data_at = |offset: u64| {
            let entry = map
                .iter()
                .find(|e| {
                    let start = e["start"].as_u64().unwrap();
                    start <= offset && offset < start + e["length"].as_u64().unwrap()
                })
                .unwrap_or_else(|| panic!("no map entry at {offset}: {map:?}"));
            entry["data"].as_bool().unwrap()
        };
        let mib = MIB as u64;
        assert!(data_at(0) && data_at(mib - 1), "{map:?}");
        assert!(!data_at(mib) && !data_at(3 * mib - 1), "{map:?}");
        assert!(data_at(3 * mib), "{map:?}");
        assert!(!data_at(4 * mib) && !data_at(8 * mib - 1), "{map:?}");
    });
}

#[test]
fn qemu_io_writes_land_in_a_writable_export() {
    let disk = MemDisk::new(sample(), true);
    serve(disk.clone(), |socket| {
        output(
            Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0xab 0 64k",
                    "-c",
                    "write -z 3M 4k",
                    "-c",
                    "flush",
                ])
                .arg(url(socket)),
        );
    });
    let contents = disk.contents();
    assert!(contents[..64 * KIB].iter().all(|&b| b == 0xab));
    assert_eq!(contents[64 * KIB..MIB], sample()[64 * KIB..MIB]);
    assert!(contents[3 * MIB..3 * MIB + 4 * KIB].iter().all(|&b| b == 0));
}

#[test]
fn qemu_io_write_on_a_read_only_export_fails() {
    let disk = MemDisk::new(sample(), false);
    serve(disk.clone(), |socket| {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0xab 0 64k"])
            .arg(url(socket))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() || text.contains("ermission") || text.contains("read-only"),
            "{text}"
        );
    });
    assert_eq!(disk.contents(), sample());
}

#[test]
fn qemu_img_convert_with_parallel_requests_and_connections_copies_every_byte() {
    let data = sample();
    let dir = tempfile::tempdir().unwrap();
    serve(MemDisk::new(data.clone(), false), |socket| {
        // Several converts at once (qemu-nbd style multi-connection), each
        // with several coroutines in flight on its connection.
        let outs: Vec<PathBuf> = (0..3)
            .map(|i| dir.path().join(format!("out{i}.raw")))
            .collect();
        thread::scope(|s| {
            for out in &outs {
                s.spawn(move || {
                    output(
                        Command::new("qemu-img")
                            .args(["convert", "-m", "4", "-W", "-f", "raw", "-O", "raw"])
                            .arg(url(socket))
                            .arg(out),
                    );
                });
            }
        });
        for out in &outs {
            assert!(
                std::fs::read(out).unwrap() == data,
                "{} differs",
                out.display()
            );
        }
    });
}
