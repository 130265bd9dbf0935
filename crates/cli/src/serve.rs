//! `vbackup serve`: a snapshot's disks as NBD exports until Ctrl-C or
//! SIGTERM; `vbackup serve --commit-overlay FILE...` records what was
//! written to writable exports as a new snapshot.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use vbackup_core::reader::ReaderOptions;
use vbackup_vm::sentinel::Sentinel;
use vbackup_vm::serve::{commit_overlays, ExportInfo, Exports, Listen, Listener, ServeOptions};

use crate::commands::{usage_error, Context};
use crate::ui::{human_bytes, with_progress};

/// `vbackup serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Snapshot: `latest`, an id, or a unique id prefix.
    #[arg(required_unless_present = "commit_overlay")]
    pub snapshot: Option<String>,
    /// Only snapshots of this VM (with `latest`).
    #[arg(long, value_parser = crate::args::parse_vm_name)]
    pub vm: Option<String>,
    /// Export only this disk (repeat for several; default: all).
    #[arg(long)]
    pub disk: Vec<String>,
    /// Where to listen: `unix:PATH` (made 0600) or `tcp:127.0.0.1:PORT`.
    /// Each disk is an export named after it: `nbd+unix:///DISK?socket=PATH`.
    #[arg(
        long,
        value_name = "unix:PATH|tcp:HOST:PORT",
        required_unless_present = "commit_overlay"
    )]
    pub listen: Option<String>,
    /// Accept writes; they go to --overlay, never into the repository.
    #[arg(long, requires = "overlay")]
    pub writable: bool,
    /// The overlay file holding the writes (a folder of DISK.overlay
    /// files when several disks are exported). An existing overlay of
    /// the same snapshot is served again with its writes.
    #[arg(long, value_name = "FILE", requires = "writable")]
    pub overlay: Option<PathBuf>,
    /// Decoded chunks kept in memory, shared by all disks and connections.
    #[arg(long, value_name = "MiB", default_value_t = 256)]
    pub cache_size: u64,
    /// Chunks read ahead of a sequential reader (0: none).
    #[arg(long, value_name = "CHUNKS", default_value_t = 4)]
    pub readahead: usize,
    /// Serve on a TCP address that is not loopback (NBD has no
    /// authentication: only behind a firewall).
    #[arg(long)]
    pub allow_remote: bool,
    /// Record the writes in these overlay files as a new snapshot of the
    /// snapshot they were made over (then delete them yourself).
    #[arg(
        long,
        value_name = "FILE",
        num_args = 1..,
        conflicts_with_all = ["snapshot", "listen", "writable", "overlay", "disk"]
    )]
    pub commit_overlay: Vec<PathBuf>,
}

/// What `serve --json` prints once listening.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Serving<'a> {
    snapshot: &'a str,
    vm: &'a str,
    exports: Vec<ServedExport<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ServedExport<'a> {
    #[serde(flatten)]
    export: &'a ExportInfo,
    uri: String,
}

/// What `serve --commit-overlay --json` prints.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Committed<'a> {
    snapshot: &'a str,
    parent: &'a str,
    bytes_read: u64,
    bytes_stored: u64,
}

/// Runs `vbackup serve`.
pub fn run(ctx: &Context, args: &ServeArgs) -> Result<()> {
    if !args.commit_overlay.is_empty() {
        return commit(ctx, args);
    }
    let (Some(spec), Some(listen)) = (&args.snapshot, &args.listen) else {
        return Err(usage_error(
            "give a SNAPSHOT and --listen unix:PATH|tcp:HOST:PORT",
        ));
    };
    let listen = Listen::parse(listen)?;
    let repo = Arc::new(ctx.open()?);
    let snapshot = repo.find_snapshot(spec, args.vm.as_deref())?;
    let options = ServeOptions {
        disks: args.disk.clone(),
        writable: args.writable,
        overlay: args.overlay.clone(),
        cache_bytes: args.cache_size.saturating_mul(1 << 20),
        reader: ReaderOptions {
            readahead: args.readahead,
            prefetch_threads: ctx.threads().clamp(1, 4),
        },
    };
    let exports = Exports::open(Arc::clone(&repo), &snapshot, &options)?;
    // Before the socket exists: a SIGKILL after this leaves no socket file.
    let mut sentinel = Sentinel::start()?;
    if let Listen::Unix(path) = &listen {
        sentinel.remove_on_kill(path)?;
    }
    let listener = Listener::bind(&listen, args.allow_remote)?;
    let bound = listener.listen()?;
    report_serving(ctx, &exports, &bound)?;
    let served = exports.serve(listener, &ctx.signal);
    let stats = exports.cache().stats();
    sentinel.done();
    served?;
    ctx.say(format!(
        "stopped; chunk cache: {} hits, {} misses",
        stats.hits, stats.misses
    ));
    for export in exports.exports().iter().filter(|e| e.writable) {
        if let Some(overlay) = &export.overlay {
            ctx.say(format!(
                "the writes to '{}' are in {} (vbackup serve --commit-overlay {} records them)",
                export.name,
                overlay.display(),
                overlay.display()
            ));
        }
    }
    Ok(())
}

fn report_serving(ctx: &Context, exports: &Exports, bound: &Listen) -> Result<()> {
    let snapshot = exports.snapshot();
    let serving = Serving {
        snapshot: &snapshot.id,
        vm: &snapshot.manifest.vm,
        exports: exports
            .exports()
            .iter()
            .map(|export| ServedExport {
                export,
                uri: bound.uri(&export.name),
            })
            .collect(),
    };
    if ctx.global.json {
        // One line, so a program reading stdout gets it whole.
        println!("{}", serde_json::to_string(&serving)?);
    } else if !ctx.global.quiet {
        println!(
            "serving snapshot {} of VM '{}' ({} export(s)); stop with Ctrl-C",
            snapshot.short_id(),
            snapshot.manifest.vm,
            serving.exports.len()
        );
        for e in &serving.exports {
            let mode = match &e.export.overlay {
                Some(overlay) => format!("writable, writes in {}", overlay.display()),
                None => "read-only".to_string(),
            };
            println!("  {}  {} ({mode})", e.uri, human_bytes(e.export.size));
        }
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    Ok(())
}

fn commit(ctx: &Context, args: &ServeArgs) -> Result<()> {
    let repo = Arc::new(ctx.open()?);
    let threads = ctx.io_threads(&repo);
    let snapshot = with_progress(
        "commit",
        ctx.global.quiet || ctx.global.json,
        &ctx.signal,
        |progress| commit_overlays(Arc::clone(&repo), &args.commit_overlay, threads, progress),
    )?;
    let parent = snapshot
        .manifest
        .disks
        .iter()
        .find_map(|d| d.base_snapshot.clone())
        .unwrap_or_default();
    let stats = &snapshot.manifest.stats;
    let report = Committed {
        snapshot: &snapshot.id,
        parent: &parent,
        bytes_read: stats.bytes_read,
        bytes_stored: stats.bytes_stored,
    };
    if ctx.text_wanted(&report)? {
        println!(
            "snapshot {} saved: snapshot {} with the overlays' writes ({} read, {} stored)",
            snapshot.short_id(),
            &parent.get(..8).unwrap_or(&parent),
            human_bytes(stats.bytes_read),
            human_bytes(stats.bytes_stored)
        );
    }
    Ok(())
}
