#!/usr/bin/env python3
"""Issue 13 benchmark: recovery time (RTO) as time to heartbeat.

For the test guest (scripts/guest.sh) on a disk of each size in
BENCH_RTO_SIZES (default "4G 64G"; the 4 GiB disk also holds
BENCH_RTO_DATA_MIB MiB of random data past the guest's file system, the
64 GiB one only the guest: sparse), backed up into an encrypted vbackup
repository, it measures:

- local boot: QEMU booting the disk image itself, start to guest-agent ping
  (the floor);
- instant recovery: `vbackup recover instant`, start to heartbeat;
- restore, then boot: `vbackup restore` (until durable) plus a local boot of
  the restored disk; and the same with restic and borg where installed
  (they restore the raw image file);
- live restore: `vbackup recover instant --live-restore`, start to every
  disk fully restored, against the plain restore;
- reads through the export: `qemu-img convert` of the NBD export, cold (a
  fresh `vbackup serve`) and warm (again, same server, cache large enough).

Prints a markdown report and writes bench/results/rto-latest.md. Needs the
environment of scripts/qemu-system.sh (VBACKUP_QEMU_SYSTEM, ...); uses TCG
unless BENCH_RTO_ACCEL=kvm. No timing is asserted anywhere: this only
measures.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VBACKUP = os.environ.get("VBACKUP", str(ROOT / "target/release/vbackup"))
QEMU = os.environ.get("VBACKUP_QEMU_SYSTEM", "qemu-system-x86_64")
ACCEL = os.environ.get("BENCH_RTO_ACCEL", "tcg")
SIZES = os.environ.get("BENCH_RTO_SIZES", "4G 64G").split()
DATA_MIB = int(os.environ.get("BENCH_RTO_DATA_MIB", "1024"))
MIB = 1 << 20


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def guest():
    subprocess.run([str(ROOT / "scripts/guest.sh"), str(ROOT / "target/guest")], check=True,
                   stdout=subprocess.DEVNULL)
    env = {}
    for line in (ROOT / "target/guest/guest.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            env[k] = v.strip("'")
    g = ROOT / "target/guest"
    return g / env["KERNEL"], g / env["INITRD"], g / env["DISK"], env["APPEND"]


def size_bytes(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def definition(kernel, initrd, append, disk):
    return (f"qemu-system-x86_64 -machine q35 -m 256 -nodefaults -no-reboot "
            f"-kernel {kernel} -initrd {initrd} -append '{append}' "
            f"-drive file={disk},format=raw,if=virtio "
            f"-chardev socket,path=/run/bench-qga.sock,server=on,wait=off,id=qga0 "
            f"-device virtio-serial-pci -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 "
            f"-nic none\n")


def ping(sock_path, timeout=1.0):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(b'{"execute":"guest-sync","arguments":{"id":4242}}\n')
        data = b""
        while b"4242" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return False
            data += chunk
        s.sendall(b'{"execute":"guest-ping"}\n')
        data = s.recv(4096)
        s.close()
        return b"return" in data
    except OSError:
        return False


def local_boot(kernel, initrd, append, disk, work):
    """Seconds from starting QEMU on `disk` to the first agent ping."""
    qga = work / "local-qga.sock"
    if qga.exists():
        qga.unlink()
    args = [QEMU, "-machine", "q35", "-m", "256", "-nodefaults", "-no-reboot", "-display", "none",
            "-accel", ACCEL, "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
            "-drive", f"file={disk},format=raw,if=virtio",
            "-chardev", f"socket,path={qga},server=on,wait=off,id=qga0",
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0", "-nic", "none"]
    for d in filter(None, os.environ.get("VBACKUP_QEMU_FIRMWARE", "").split(":")):
        args += ["-L", d]
    started = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not ping(qga):
            if proc.poll() is not None or time.monotonic() - started > 300:
                raise RuntimeError("the local boot never reached its heartbeat")
            time.sleep(0.05)
        return time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait()


def vb(args, env, **kw):
    return run([VBACKUP] + args, env=env, **kw)


def recover(snapshot, env, work, live):
    d = work / ("live" if live else "instant")
    shutil.rmtree(d, ignore_errors=True)
    args = [VBACKUP, "--json", "recover", "instant", snapshot, "--dir", str(d), "--no-network"]
    if live:
        args += ["--live-restore", str(d / "disks")]
    started = time.monotonic()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    running = json.loads(proc.stdout.readline())["running"]
    if not live:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        return running["seconds-to-heartbeat"], None
    finished = json.loads(proc.stdout.readline())["finished"]
    proc.wait()
    total = time.monotonic() - started
    pid = finished["pid"]
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    return running["seconds-to-heartbeat"], finished.get("seconds-to-restored", total)


def timed(fn):
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def export_reads(snapshot, env, work, size):
    sock = work / "serve.sock"
    proc = subprocess.Popen([VBACKUP, "--json", "serve", snapshot, "--listen", f"unix:{sock}",
                             "--cache-size", str(size // MIB + 64)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    uri = json.loads(proc.stdout.readline())["exports"][0]["uri"]
    out = work / "export-copy.raw"
    results = []
    for _ in ("cold", "warm"):
        if out.exists():
            out.unlink()
        results.append(timed(lambda: run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)])))
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    out.unlink()
    return results


def peer_restore_then_boot(tool, disk, work, kernel, initrd, append):
    repo = work / f"{tool}-repo"
    target = work / f"{tool}-restored"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    env = dict(os.environ, RESTIC_PASSWORD="pw", BORG_PASSPHRASE="pw", BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")
    if tool == "restic":
        run(["restic", "-r", str(repo), "init"], env=env)
        run(["restic", "-r", str(repo), "backup", str(disk)], env=env)
        restore = ["restic", "-r", str(repo), "restore", "latest", "--target", str(target)]
        restored = target / str(disk).lstrip("/")
        seconds = timed(lambda: run(restore, env=env))
    else:
        run(["borg", "init", "-e", "repokey", str(repo)], env=env)
        run(["borg", "create", "--compression", "zstd,1", f"{repo}::a", str(disk)], env=env)
        target.mkdir()
        seconds = timed(lambda: run(["borg", "extract", "--sparse", f"{repo}::a"], env=env, cwd=target))
        restored = target / str(disk).lstrip("/")
    run(["sync"])
    boot = local_boot(kernel, initrd, append, restored, work)
    shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    return seconds, boot


def main():
    kernel, initrd, pristine, append = guest()
    base = Path(os.environ.get("BENCH_DIR_WORK", tempfile.mkdtemp(prefix="vbackup-rto-")))
    peers = [t for t in ("restic", "borg") if shutil.which(t)]
    lines = ["# RTO: time to heartbeat (issue 13)", "",
             f"Test guest ({kernel.name}, busybox, qemu-ga), 256 MiB, `-accel {ACCEL}`; "
             f"repository encrypted, local folder. Peers: {', '.join(peers) or 'none installed'}.", ""]
    for size_text in SIZES:
        size = size_bytes(size_text)
        work = base / size_text
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        disk = work / "vda.raw"
        shutil.copyfile(pristine, disk)
        os.truncate(disk, size)
        data_mib = DATA_MIB if size <= (8 << 30) else 0
        if data_mib:
            with open(disk, "r+b") as f:
                f.seek(256 * MIB)
                for _ in range(data_mib):
                    f.write(os.urandom(MIB))
        (work / "vm.sh").write_text(definition(kernel, initrd, append, disk))
        env = dict(os.environ, VBACKUP_REPOSITORY=str(work / "repo"), VBACKUP_PASSWORD="pw",
                   VBACKUP_CONFIG="/dev/null", VBACKUP_ACCEL=ACCEL, VBACKUP_CACHE_DIR=str(work / "cache"),
                   TMPDIR=str(work))
        vb(["init"], env)
        snap = json.loads(vb(["--json", "backup", "--vm", "bench", "--definition", str(work / "vm.sh"), str(disk)], env).stdout)["snapshot"]
        floor = local_boot(kernel, initrd, append, disk, work)
        instant, _ = recover(snap, env, work, live=False)
        restore_dir = work / "restored"
        restore = timed(lambda: vb(["restore", snap, "--target", str(restore_dir)], env))
        run(["sync"])
        after_restore = local_boot(kernel, initrd, append, restore_dir / "vda.raw", work)
        shutil.rmtree(restore_dir)
        live_beat, live_total = recover(snap, env, work, live=True)
        cold, warm = export_reads(snap, env, work, size)
        lines += [f"## {size_text} disk ({data_mib} MiB of data beyond the guest's {pristine.stat().st_size // MIB} MiB file system)", "",
                  "| | time to heartbeat | vs local boot |", "|---|---:|---:|",
                  f"| local boot of the image (floor) | {floor:.2f} s | 1.00x |",
                  f"| vbackup recover instant | {instant:.2f} s | {instant / floor:.2f}x |",
                  f"| vbackup restore ({restore:.2f} s), then boot | {restore + after_restore:.2f} s | {(restore + after_restore) / floor:.2f}x |"]
        if size > (8 << 30) and peers:
            lines.append(f"| restic, borg | skipped | restic 0.14 restores every zero of a sparse image ({size_text} written), borg reads them all |")
        for tool in (peers if size <= (8 << 30) else []):
            seconds, boot = peer_restore_then_boot(tool, disk, work, kernel, initrd, append)
            lines.append(f"| {tool} restore ({seconds:.2f} s), then boot | {seconds + boot:.2f} s | {(seconds + boot) / floor:.2f}x |")
        lines += ["", "| live restore against restore-then-boot | VM up (heartbeat) | all data on local disks |", "|---|---:|---:|",
                  f"| `vbackup recover instant --live-restore` | {live_beat:.2f} s | {live_total:.2f} s |",
                  f"| `vbackup restore`, then boot | {restore + after_restore:.2f} s | {restore:.2f} s |",
                  f"| ratio (live / restore-then-boot) | {live_beat / (restore + after_restore):.2f}x | {live_total / restore:.2f}x |",
                  "", "| reads through the export (`qemu-img convert`) | seconds | throughput |", "|---|---:|---:|",
                  f"| cold cache (fresh `vbackup serve`) | {cold:.2f} | {size / MIB / cold:.0f} MiB/s of virtual disk |",
                  f"| warm cache (again, same server) | {warm:.2f} | {cold / warm:.2f}x the cold speed |", ""]
        shutil.rmtree(work, ignore_errors=True)
    report = "\n".join(lines)
    print(report)
    out = ROOT / "bench/results/rto-latest.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(report + "\n")


if __name__ == "__main__":
    sys.exit(main())
