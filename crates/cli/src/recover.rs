//! `vbackup verify --boot` and `vbackup recover instant`: boot a snapshot
//! from the backup (see `vbackup_vm::recover`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use vbackup_vm::boot::{BootOptions, Heartbeat};
use vbackup_vm::recover::{
    recover_instant, verify_boot, InstantRecovery, LiveRestore, RecoveryReport, VerifyBoot,
};

use crate::commands::{usage_error, Context};
use crate::{ExitError, EXIT_DAMAGE};

/// How to start QEMU: shared by `verify --boot` and `recover instant`.
#[derive(Debug, Args)]
pub struct QemuArgs {
    /// The QEMU binary (default: the stored command line's, else
    /// qemu-system-x86_64).
    #[arg(long, env = "VBACKUP_QEMU_SYSTEM", value_name = "PATH")]
    pub qemu: Option<PathBuf>,
    /// A firmware folder for QEMU (`-L`).
    #[arg(long, env = "VBACKUP_QEMU_FIRMWARE", value_name = "DIR")]
    pub firmware: Option<PathBuf>,
    /// Accelerator: kvm or tcg (default: kvm where /dev/kvm opens, else tcg).
    #[arg(long, env = "VBACKUP_ACCEL", value_parser = ["kvm", "tcg"])]
    pub accel: Option<String>,
    /// Heartbeat: this text on the serial console (default: the guest agent answers).
    #[arg(long, value_name = "TEXT")]
    pub expect_console: Option<String>,
    /// Seconds to wait for the VM and its heartbeat.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub timeout: u64,
    /// Decoded chunks kept in memory.
    #[arg(long, value_name = "MiB", default_value_t = 256)]
    pub cache_size: u64,
}

impl QemuArgs {
    fn boot(&self, isolate: bool) -> BootOptions {
        BootOptions {
            qemu: self.qemu.clone(),
            firmware: self.firmware.clone(),
            isolate,
            accel: self.accel.clone(),
        }
    }

    fn heartbeat(&self) -> Heartbeat {
        match &self.expect_console {
            Some(text) => Heartbeat::Console(text.clone()),
            None => Heartbeat::Agent,
        }
    }
}

/// `vbackup verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Boot this snapshot in isolation (no network, throwaway overlays)
    /// and wait for its heartbeat, instead of reading every chunk.
    #[arg(long, value_name = "SNAPSHOT")]
    pub boot: Option<String>,
    /// Only snapshots of this VM (with `--boot latest`).
    #[arg(long, value_parser = crate::args::parse_vm_name, requires = "boot")]
    pub vm: Option<String>,
    /// A command run in the booted guest through its agent; it must exit 0
    /// (e.g. "is the database answering").
    #[arg(long, value_name = "CMD", requires = "boot")]
    pub check: Option<String>,
    /// Do not record the result with the snapshot.
    #[arg(long, requires = "boot")]
    pub no_record: bool,
    /// How to start QEMU.
    #[command(flatten)]
    pub qemu: QemuArgs,
}

/// `vbackup recover`.
#[derive(Debug, Subcommand)]
pub enum RecoverCommand {
    /// Start the VM from its backup at once; with --live-restore, move
    /// its disks to local files while it runs.
    Instant(InstantArgs),
}

/// `vbackup recover instant`.
#[derive(Debug, Args)]
pub struct InstantArgs {
    /// Snapshot: `latest`, an id, or a unique id prefix.
    pub snapshot: String,
    /// The VM (required with `latest`).
    #[arg(long, value_parser = crate::args::parse_vm_name)]
    pub vm: Option<String>,
    /// Folder for the VM's overlays (its writes) and run files.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
    /// Move the disks while the VM runs, then drop the exports; the VM
    /// never stops. A folder: the disks become DISK.qcow2 there. Or one
    /// raw target per disk, in order (block devices or existing files,
    /// overwritten): the VM is mirrored and pivoted onto them.
    #[arg(long, value_name = "TARGET_DIR|DEVICE", num_args = 1..)]
    pub live_restore: Vec<PathBuf>,
    /// Start the VM without any network.
    #[arg(long)]
    pub no_network: bool,
    /// Give the disks to a QEMU that already runs (started with the
    /// devices it needs, paused with -S or not) instead of starting one:
    /// each disk is added as a block node and plugged in as --device.
    #[arg(long, value_name = "SOCKET")]
    pub qmp: Option<PathBuf>,
    /// With --qmp: its guest agent socket (heartbeat); without, the
    /// heartbeat is not waited for.
    #[arg(long, value_name = "SOCKET", requires = "qmp")]
    pub qga: Option<PathBuf>,
    /// With --qmp: the device model the disks are plugged in as.
    #[arg(
        long,
        value_name = "DRIVER",
        default_value = "virtio-blk-pci",
        requires = "qmp"
    )]
    pub device: String,
    /// How to start QEMU.
    #[command(flatten)]
    pub qemu: QemuArgs,
}

/// Paths as one comma-separated line.
fn list(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

/// Runs `vbackup verify`.
pub fn verify(ctx: &Context, args: &VerifyArgs) -> Result<()> {
    let Some(spec) = &args.boot else {
        return crate::lifecycle::verify(ctx);
    };
    let repo = Arc::new(ctx.open()?);
    let snapshot = repo.find_snapshot(spec, args.vm.as_deref())?;
    let request = VerifyBoot {
        heartbeat: args.qemu.heartbeat(),
        check: args.check.clone(),
        timeout: Duration::from_secs(args.qemu.timeout),
        boot: args.qemu.boot(true),
        cache_bytes: args.qemu.cache_size.saturating_mul(1 << 20),
        record: !args.no_record,
    };
    ctx.say(format!(
        "booting snapshot {} of VM '{}' in isolation...",
        snapshot.short_id(),
        snapshot.manifest.vm
    ));
    let report = verify_boot(Arc::clone(&repo), &snapshot, &request, &ctx.signal)?;
    if ctx.text_wanted(&report)? {
        match (&report.reason, report.seconds_to_heartbeat) {
            (None, Some(t)) => println!(
                "boot verification of snapshot {} passed: heartbeat ({}) after {t:.1} s ({}){}{}",
                snapshot.short_id(),
                report.heartbeat,
                report.accelerator,
                match &report.check {
                    Some(c) => format!(", check '{c}' exited 0"),
                    None => String::new(),
                },
                match report.canary.as_deref() {
                    Some("matched") =>
                        ", canary matched: the disk is this snapshot's point in time".to_string(),
                    Some(other) => format!(", canary {other}"),
                    None => String::new(),
                }
            ),
            (reason, _) => println!(
                "boot verification of snapshot {} FAILED: {}",
                snapshot.short_id(),
                reason.as_deref().unwrap_or("no heartbeat")
            ),
        }
    }
    if !report.passed {
        return Err(ExitError {
            code: EXIT_DAMAGE,
            message: format!(
                "snapshot {} did not pass boot verification: {}",
                snapshot.short_id(),
                report.reason.as_deref().unwrap_or("no heartbeat")
            ),
        }
        .into());
    }
    Ok(())
}

/// Runs `vbackup recover`.
pub fn recover(ctx: &Context, command: &RecoverCommand) -> Result<()> {
    let RecoverCommand::Instant(args) = command;
    if args.snapshot == "latest" && args.vm.is_none() {
        return Err(usage_error("recover instant latest needs --vm VM"));
    }
    let repo = Arc::new(ctx.open()?);
    let snapshot = repo.find_snapshot(&args.snapshot, args.vm.as_deref())?;
    let request = InstantRecovery {
        dir: args.dir.clone(),
        live_restore: match args.live_restore.is_empty() {
            true => None,
            false => Some(LiveRestore::from_paths(&args.live_restore)?),
        },
        boot: args.qemu.boot(args.no_network),
        heartbeat: match (&args.qmp, &args.qga, &args.qemu.expect_console) {
            (Some(_), None, _) | (Some(_), _, Some(_)) => None,
            _ => Some(args.qemu.heartbeat()),
        },
        timeout: Duration::from_secs(args.qemu.timeout),
        cache_bytes: args.qemu.cache_size.saturating_mul(1 << 20),
        attach: args.qmp.clone().map(|qmp| vbackup_vm::recover::Attach {
            qmp,
            agent: args.qga.clone(),
            device: args.device.clone(),
        }),
    };
    let json = ctx.global.json;
    let quiet = ctx.global.quiet;
    let mut on_running = |report: &RecoveryReport| {
        if json {
            if let Ok(line) = serde_json::to_string(&serde_json::json!({"running": report})) {
                println!("{line}");
            }
        } else if !quiet {
            println!(
                "VM of snapshot {} running (pid {}) after {:.1} s{}; QMP {}, disks {}",
                &report.snapshot[..8.min(report.snapshot.len())],
                report.pid.map_or("?".into(), |p| p.to_string()),
                report.seconds_to_running,
                report
                    .seconds_to_heartbeat
                    .map_or(String::new(), |t| format!(", heartbeat after {t:.1} s")),
                report.qmp.display(),
                list(&report.disks)
            );
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    };
    let report = recover_instant(repo, &snapshot, &request, &ctx.signal, &mut on_running);
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            return Err(anyhow::Error::from(e).context(format!(
                "instant recovery of snapshot {} failed; any writes of the VM are in the overlays under {}",
                snapshot.short_id(),
                match &request.live_restore {
                    Some(LiveRestore::Dir(dir)) => dir.display(),
                    _ => args.dir.display(),
                }
            )))
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({"finished": &report}))?
        );
    } else if !quiet {
        match (report.seconds_to_restored, &report.error) {
            (Some(t), _) => println!(
                "live restore complete after {t:.1} s: the VM (pid {}) runs on {} and no longer needs vbackup",
                report.pid.map_or("?".into(), |p| p.to_string()),
                list(&report.disks)
            ),
            (None, Some(error)) => println!(
                "{error}; the VM's writes are kept in {}",
                list(&report.disks)
            ),
            (None, None) => println!(
                "the VM stopped; its writes are kept in {}",
                list(&report.disks)
            ),
        }
    }
    match report.error {
        Some(error) => Err(anyhow::anyhow!(error)),
        None => Ok(()),
    }
}
