//! One function per command; each opens what it needs, runs the core
//! operation under a progress display and prints text or JSON.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Result};
use serde::Serialize;
use vbackup_core::crypto::{kdf::KdfParams, CipherKind, DigestKind};
use vbackup_core::format::DiskRecord;
use vbackup_core::{InitOptions, Repository, Snapshot};
use vbackup_daemon::config::Config;
use vbackup_open::{Purpose, RepositoryOptions};
use vbackup_vm::job::{BackupJob, BackupOutcome, VmSource};
use vbackup_vm::restore;

use crate::args::{
    BackupArgs, Cli, Command, DigestArg, EncryptionArg, GlobalArgs, InitArgs, KeyCommand,
    RestoreArgs, SnapshotsArgs,
};
use crate::ui::{human_bytes, human_rate, with_progress};
use crate::{ExitError, EXIT_USAGE};

/// What every command gets: the global options and the signal flag.
pub struct Context {
    /// Global options.
    pub global: GlobalArgs,
    /// Set by SIGINT / SIGTERM.
    pub signal: Arc<AtomicBool>,
    /// The VM the command is about, whose configuration section may name
    /// the repository.
    pub vm: Option<String>,
    /// The configuration file, once read (`None` inside: there is none).
    config: OnceLock<Option<Config>>,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let ctx = Context {
        global: cli.global,
        signal: crate::ui::install_signal_flag(),
        vm: commanded_vm(&cli.command),
        config: OnceLock::new(),
    };
    crate::server::check_role(&ctx, &cli.command)?;
    match cli.command {
        Command::Init(args) => init(&ctx, &args),
        Command::Backup(args) => backup(&ctx, &args),
        Command::Restore(args) => restore(&ctx, &args),
        Command::Serve(args) => crate::serve::run(&ctx, &args),
        Command::Snapshots(args) => snapshots(&ctx, &args),
        Command::Check(args) => crate::lifecycle::check(&ctx, &args),
        Command::Verify(args) => crate::recover::verify(&ctx, &args),
        Command::Recover(command) => crate::recover::recover(&ctx, &command),
        Command::Forget(args) => crate::lifecycle::forget(&ctx, &args),
        Command::Prune(args) => crate::lifecycle::prune(&ctx, &args),
        Command::Repair(args) => crate::lifecycle::repair(&ctx, &args),
        Command::Policy(command) => crate::lifecycle::policy(&ctx, &command),
        Command::Locks => crate::lifecycle::locks(&ctx),
        Command::Unlock(args) => crate::lifecycle::unlock(&ctx, &args),
        Command::Stats => stats(&ctx),
        Command::Key(command) => key(&ctx, &command),
        Command::Speed => speed(&ctx),
        Command::Quickstart(args) => crate::quickstart::run(&ctx, &args),
        Command::Server(args) => crate::server::run(&ctx, &args),
        Command::Daemon(args) => crate::daemon::daemon(&ctx, &args),
        Command::Jobs(args) => crate::daemon::jobs(&ctx, &args),
        Command::Completions(args) => crate::docs::completions(&args),
        Command::Man(args) => crate::docs::man(&args),
    }
}

/// The VM a command names with `--vm`, if any.
fn commanded_vm(command: &Command) -> Option<String> {
    match command {
        Command::Backup(args) => Some(args.vm.clone()),
        Command::Restore(args) => args.vm.clone(),
        Command::Snapshots(args) => args.vm.clone(),
        Command::Serve(args) => args.vm.clone(),
        Command::Verify(args) => args.vm.clone(),
        Command::Recover(crate::recover::RecoverCommand::Instant(args)) => args.vm.clone(),
        _ => None,
    }
}

pub(crate) fn usage_error(message: impl Into<String>) -> anyhow::Error {
    ExitError {
        code: EXIT_USAGE,
        message: message.into(),
    }
    .into()
}

impl Context {
    /// Worker threads to use.
    pub fn threads(&self) -> usize {
        self.global
            .threads
            .unwrap_or_else(vbackup_core::default_threads)
            .max(1)
    }

    /// Worker threads for work that mostly waits on `repo`'s backend
    /// (backup, restore, verify): see [`vbackup_open::io_threads`].
    pub fn io_threads(&self, repo: &Repository) -> usize {
        vbackup_open::io_threads(repo, self.global.threads)
    }

    /// The configuration file: `--config` / `VBACKUP_CONFIG`, else the
    /// user's or the system's if one exists; read once.
    pub fn config(&self) -> Result<Option<&Config>> {
        if let Some(config) = self.config.get() {
            return Ok(config.as_ref());
        }
        let path = match &self.global.config {
            Some(path) => Some(path.clone()),
            None => Config::default_path(),
        };
        let config = path.map(|path| Config::load(&path)).transpose()?;
        Ok(self.config.get_or_init(|| config).as_ref())
    }

    /// How to reach the repository: `--repo` / `VBACKUP_REPOSITORY` (a
    /// location, or the name of a configuration file section), else the
    /// section the command's VM names, else the file's only one; the
    /// flags and the environment over the section's keys, and the server
    /// token read from its file or variable only for a server.
    pub fn repository_options(&self) -> Result<RepositoryOptions> {
        let config = self.config()?;
        let named = self
            .global
            .repo
            .clone()
            .filter(|r| !r.is_empty())
            .or_else(|| {
                config
                    .and_then(|c| c.default_repository(self.vm.as_deref()))
                    .map(str::to_string)
            });
        let Some(named) = named else {
            return Err(usage_error(
                "no repository given: use --repo PATH or set VBACKUP_REPOSITORY \
                 (or name one in the configuration file, see --config)",
            ));
        };
        let flags = RepositoryOptions {
            location: String::new(),
            password_file: self.global.password_file.clone(),
            token: None,
            token_file: self.global.token_file.clone(),
            server_fingerprint: self.global.server_fingerprint.clone(),
            no_cache: self.global.no_cache,
            cache_dir: None,
            allow_unencrypted: self.global.allow_unencrypted,
            threads: self.global.threads,
        };
        let mut options = match config.and_then(|c| c.repository(&named)) {
            Some(section) => flags.over(section),
            None => RepositoryOptions {
                location: named,
                ..flags
            },
        };
        if options.location.starts_with("https://") {
            options.token = Some(crate::server::read_token(options.token_file.as_deref())?);
        }
        Ok(options)
    }

    /// This host's record of `repo` (forgotten snapshots, the newest
    /// policy), or an empty one with a warning when its file cannot be
    /// read: for commands that only warn.
    pub fn client_state(
        &self,
        repo: &Repository,
    ) -> Result<vbackup_core::client_state::ClientState> {
        let (state, warning) = vbackup_open::state::load(&self.repository_options()?, repo);
        if let Some(warning) = warning {
            eprintln!("vbackup: warning: {warning}");
        }
        Ok(state)
    }

    /// Opens the repository, asking for the passphrase only if needed.
    pub fn open(&self) -> Result<Repository> {
        self.open_for(Purpose::Use)
    }

    /// Opens the repository without the metadata cache: for the commands
    /// that judge what the storage itself holds (check, verify, repair).
    pub fn open_uncached(&self) -> Result<Repository> {
        self.open_for(Purpose::Judge)
    }

    fn open_for(&self, purpose: Purpose) -> Result<Repository> {
        let options = self.repository_options()?;
        let given = passphrase_given(&options);
        Ok(vbackup_open::open(&options, purpose, given, || {
            passphrase(&options, "Passphrase: ", false)
        })?)
    }

    /// Prints a line for people (not in --json or --quiet mode).
    pub fn say(&self, text: impl AsRef<str>) {
        if !self.global.json && !self.global.quiet {
            println!("{}", text.as_ref());
        }
    }

    /// Whether a command's text report is wanted: prints `value` as JSON
    /// instead with `--json`, and nothing with `--quiet` (the one output
    /// layer every reporting command goes through).
    pub fn text_wanted<T: Serialize>(&self, value: &T) -> Result<bool> {
        Ok(!self.json(value)? && !self.global.quiet)
    }

    /// Prints a value as JSON when --json was given; returns whether it did.
    pub fn json<T: Serialize>(&self, value: &T) -> Result<bool> {
        if self.global.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        }
        Ok(self.global.json)
    }
}

/// Whether a passphrase was supplied without a prompt (file or
/// environment): the user expects an encrypted repository.
fn passphrase_given(options: &RepositoryOptions) -> bool {
    options.password_file.is_some()
        || std::env::var_os("VBACKUP_PASSWORD").is_some_and(|v| !v.is_empty())
}

/// The passphrase of `options`: from its file (with a warning when others
/// can read it), else `VBACKUP_PASSWORD`, else a prompt on the terminal
/// (twice with `confirm`). `None` when there is no source (not a terminal).
pub fn passphrase(
    options: &RepositoryOptions,
    prompt: &str,
    confirm: bool,
) -> Result<Option<String>, vbackup_core::Error> {
    read_secret(
        options.password_file.as_deref(),
        "VBACKUP_PASSWORD",
        prompt,
        confirm,
    )
}

/// The new passphrase of `key add`: `VBACKUP_NEW_PASSWORD_FILE`, else
/// `VBACKUP_NEW_PASSWORD`, else a prompt, twice.
fn new_passphrase() -> Result<Option<String>, vbackup_core::Error> {
    let file = std::env::var_os("VBACKUP_NEW_PASSWORD_FILE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    read_secret(
        file.as_deref(),
        "VBACKUP_NEW_PASSWORD",
        "New passphrase: ",
        true,
    )
}

/// Reads a secret from `file` (with a warning when others can read it),
/// else the environment variable `env`, else a prompt on the terminal
/// (twice with `confirm`). `None` when there is no source (not a terminal).
fn read_secret(
    file: Option<&Path>,
    env: &str,
    prompt: &str,
    confirm: bool,
) -> Result<Option<String>, vbackup_core::Error> {
    if let Some(file) = file {
        if let Some(warning) = vbackup_open::secret_file_exposure(file, "passphrase") {
            eprintln!("vbackup: WARNING: {warning}");
        }
        return vbackup_open::read_secret_file(file, "passphrase").map(Some);
    }
    // Set but empty counts as unset, as for the options' variables.
    if let Some(value) = std::env::var(env).ok().filter(|v| !v.is_empty()) {
        return Ok(Some(value));
    }
    if !std::io::stdin().is_terminal() {
        return Ok(None);
    }
    let first = rpassword::prompt_password(prompt).map_err(|e| {
        vbackup_core::Error::InvalidInput(format!("cannot read the passphrase: {e}"))
    })?;
    if confirm {
        let second = rpassword::prompt_password("Repeat passphrase: ").map_err(|e| {
            vbackup_core::Error::InvalidInput(format!("cannot read the passphrase: {e}"))
        })?;
        if first != second {
            return Err(vbackup_core::Error::InvalidInput(
                "the passphrases do not match".to_string(),
            ));
        }
    }
    Ok(Some(first))
}

fn init_options(args: &InitArgs) -> Result<InitOptions> {
    let cipher = match args.encryption {
        EncryptionArg::Auto => CipherKind::default_for_cpu(),
        EncryptionArg::Aes256Gcm => CipherKind::Aes256Gcm,
        EncryptionArg::Chacha20Poly1305 => CipherKind::ChaCha20Poly1305,
        EncryptionArg::None => CipherKind::None,
    };
    let digest = match args.digest {
        DigestArg::Blake3 => DigestKind::Blake3Keyed,
        DigestArg::HmacSha256 => DigestKind::HmacSha256,
    };
    let chunk_size =
        u32::try_from(args.chunk_size).map_err(|_| usage_error("chunk size too large"))?;
    Ok(InitOptions {
        chunk_size,
        cipher,
        digest,
        compression_level: args.compression_level,
        kdf: kdf_params(),
        pack_size: args
            .pack_size
            .map(|size| u32::try_from(size).map_err(|_| usage_error("pack size too large")))
            .transpose()?,
        state_dir: None,
    })
}

/// Argon2id cost of new keys. `VBACKUP_KDF_MEMORY_KIB` lowers it for the
/// test suites, in debug builds only: in a release build it would let
/// whoever sets the environment make passphrases cheap to guess, so it is
/// ignored there, with a warning.
fn kdf_params() -> KdfParams {
    let value = std::env::var_os("VBACKUP_KDF_MEMORY_KIB");
    let (params, warning) = kdf_params_from(value.as_deref(), cfg!(debug_assertions));
    if let Some(warning) = warning {
        eprintln!("vbackup: warning: {warning}");
    }
    params
}

/// The Argon2id cost for a `VBACKUP_KDF_MEMORY_KIB` value, honoured only
/// when `debug_build`, and the warning to print, if any.
fn kdf_params_from(
    value: Option<&std::ffi::OsStr>,
    debug_build: bool,
) -> (KdfParams, Option<String>) {
    let mut params = KdfParams::default();
    let Some(value) = value else {
        return (params, None);
    };
    if !debug_build {
        let warning = format!(
            "VBACKUP_KDF_MEMORY_KIB is ignored by release builds; new keys use Argon2id with {} MiB",
            params.memory_kib / 1024
        );
        return (params, Some(warning));
    }
    match value.to_str().and_then(|v| v.parse().ok()) {
        Some(kib) => {
            params.memory_kib = kib;
            params.iterations = 1;
            (params, None)
        }
        None => (
            params,
            Some(format!(
                "VBACKUP_KDF_MEMORY_KIB={value:?} is not a number; ignored"
            )),
        ),
    }
}

#[derive(Serialize)]
struct InitOutput<'a> {
    repository: String,
    id: &'a str,
    chunk_size: u32,
    pack_size: u32,
    cipher: CipherKind,
    digest: DigestKind,
}

fn init(ctx: &Context, args: &InitArgs) -> Result<()> {
    let location = ctx.repository_options()?;
    let options = init_options(args)?;
    let passphrase = if options.cipher == CipherKind::None {
        if passphrase_given(&location) {
            return Err(usage_error("--encryption none was asked, but a passphrase is set (VBACKUP_PASSWORD or --password-file); every later command would refuse an unencrypted repository while it is set (so that storage cannot switch encryption off), so unset it, or drop --encryption none"));
        }
        None
    } else {
        let secret = passphrase(&location, "New passphrase: ", true)?;
        Some(secret.ok_or_else(|| {
            usage_error("a new encrypted repository needs a passphrase: set VBACKUP_PASSWORD or VBACKUP_PASSWORD_FILE, or run on a terminal (or choose --encryption none)")
        })?)
    };
    if passphrase.as_deref() == Some("") {
        return Err(usage_error("the passphrase is empty; choose a real one"));
    }
    let repo = vbackup_open::init(&location, passphrase.as_deref(), &options)
        .map_err(|e| creating_repository(e, &location.location))?;
    let config = repo.config();
    let output = InitOutput {
        repository: repo.location(),
        id: &config.id,
        chunk_size: config.chunk_size,
        pack_size: config.pack_size,
        cipher: config.cipher,
        digest: config.digest,
    };
    if !ctx.json(&output)? {
        ctx.say(format!(
            "created repository {} at {}\n  chunks: {} fixed, digest {}, cipher {}, zstd level {}",
            &config.id[..8],
            repo.location(),
            human_bytes(u64::from(config.chunk_size)),
            config.digest,
            config.cipher,
            config.compression_level
        ));
        ctx.say(match config.pack_size {
            0 => "  storage: one object per chunk".to_string(),
            size => format!(
                "  storage: chunks gathered in packs of about {} (few requests on object storage)",
                human_bytes(u64::from(size))
            ),
        });
        if config.cipher != CipherKind::None {
            ctx.say("  keep the passphrase safe: without it the backups cannot be read");
        }
    }
    Ok(())
}

/// A failed `init`: a storage failure says that the repository at
/// `location` could not be created (the storage error says which file
/// and why); other errors speak for themselves.
fn creating_repository(error: vbackup_core::Error, location: &str) -> anyhow::Error {
    match error {
        vbackup_core::Error::Storage(_) => {
            anyhow::Error::new(error).context(format!("cannot create the repository at {location}"))
        }
        other => other.into(),
    }
}

/// The VM's source: the flags, over its configuration file section.
fn vm_source(ctx: &Context, args: &BackupArgs) -> Result<VmSource> {
    let flags = VmSource {
        disks: args.disks.clone(),
        disk_names: args.disk_names.clone(),
        format: args.format.clone(),
        qmp: args.qmp.clone(),
        qga: args.qga.clone(),
        nbd_socket: args.nbd_socket.clone(),
        definition: args.definition.clone(),
        repository: None,
        tags: args.tags.clone(),
        host: args.host.clone(),
    };
    let section = ctx.config()?.and_then(|c| c.vm(&args.vm));
    Ok(match section {
        // A running VM's flags describe it whole: the file's disk paths
        // would be taken for node names.
        Some(section) if flags.qmp.is_none() || section.qmp.is_some() => flags.over(section),
        _ => flags,
    })
}

/// One qemu-nbd connection per worker thread.
fn connections(threads: usize) -> u32 {
    u32::try_from(threads).unwrap_or(u32::MAX).max(1)
}

/// Prints what a backup did besides its snapshot.
fn report_backup_outcome(outcome: &BackupOutcome) {
    for removed in &outcome.leftovers_removed {
        eprintln!("vbackup: removed from QEMU what an interrupted backup left: {removed}");
    }
    if let Some(error) = outcome.freeze.as_ref().and_then(|f| f.thaw_error.as_ref()) {
        eprintln!("vbackup: WARNING: thawing the guest's filesystems failed, the guest may still be frozen: {error}");
    }
    for warning in &outcome.warnings {
        eprintln!("vbackup: warning: {warning}");
    }
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct BackupOutput<'a> {
    snapshot: &'a str,
    vm: &'a str,
    time: &'a str,
    backup_type: vbackup_core::format::BackupType,
    consistency: Option<&'a str>,
    disks: &'a [DiskRecord],
    stats: &'a vbackup_core::format::BackupStats,
}

fn backup(ctx: &Context, args: &BackupArgs) -> Result<()> {
    let source = vm_source(ctx, args)?;
    source.validate()?;
    let repo = ctx.open()?;
    let job = BackupJob {
        vm: args.vm.clone(),
        source,
        requested: args.backup_type.into(),
        threads: ctx.io_threads(&repo),
        skip_unchanged: !args.force_read,
    };
    let quiet = ctx.global.quiet || ctx.global.json;
    let outcome = with_progress("backup", quiet, &ctx.signal, |progress| {
        vbackup_vm::job::backup(&repo, &job, progress)
    })?;
    report_backup_outcome(&outcome);
    let snapshot = outcome.snapshot;
    let m = &snapshot.manifest;
    let output = BackupOutput {
        snapshot: &snapshot.id,
        vm: &m.vm,
        time: &m.time,
        backup_type: m.backup_type,
        consistency: m.consistency.as_deref(),
        disks: &m.disks,
        stats: &m.stats,
    };
    if !ctx.json(&output)? {
        print_backup_summary(ctx, &snapshot);
    }
    Ok(())
}

/// The lines printed after a backup.
pub fn print_backup_summary(ctx: &Context, snapshot: &Snapshot) {
    let m = &snapshot.manifest;
    let s = &m.stats;
    let virtual_size: u64 = m.disks.iter().map(|d| d.virtual_size).sum();
    ctx.say(format!(
        "snapshot {} saved: {} backup of VM '{}', {} disk(s), {} virtual{}",
        snapshot.short_id(),
        m.backup_type,
        m.vm,
        m.disks.len(),
        human_bytes(virtual_size),
        m.consistency
            .as_deref()
            .map(|c| format!(", {c}"))
            .unwrap_or_default()
    ));
    ctx.say(format!(
        "  read {} of allocated data from the disks in {:.1} s ({})",
        human_bytes(s.bytes_read),
        s.duration_secs,
        human_rate(s.bytes_read, s.duration_secs),
    ));
    ctx.say(new_chunks_line(s));
    ctx.say(format!(
        "  chunks: {} new, {} already stored, {} holes (not read or stored)",
        s.chunks_new, s.chunks_reused, s.chunks_hole
    ));
    if s.chunks_unchanged > 0 {
        ctx.say(format!(
            "  {} chunks not read: unchanged since the base snapshot, per the dirty bitmap",
            s.chunks_unchanged
        ));
    }
    for disk in m.disks.iter().filter(|d| d.fallback_reason.is_some()) {
        ctx.say(format!(
            "  disk '{}' read in full: {}",
            disk.name,
            disk.fallback_reason.as_deref().unwrap_or_default()
        ));
    }
    if let Some(note) = &m.consistency_note {
        ctx.say(format!("  note: {note}"));
    }
    for disk in m.disks.iter().filter(|d| d.unchanged_since.is_some()) {
        ctx.say(format!(
            "  disk '{}' unchanged since snapshot {} (same file identity): not read (--force-read reads it)",
            disk.name,
            disk.unchanged_since.as_deref().map_or("", |id| &id[..8.min(id.len())])
        ));
    }
}

/// What the new chunks hold and what storing them took. `bytes_new`
/// counts whole chunks, while `bytes_read` counts only the allocated bytes
/// read: a chunk partly allocated is stored whole, its unallocated parts as
/// zeros, so the first can exceed the second; the line says so then.
fn new_chunks_line(s: &vbackup_core::format::BackupStats) -> String {
    let whole = match s.bytes_new > s.bytes_read {
        true => " (counted whole: their unallocated parts as zeros)",
        false => "",
    };
    format!(
        "  new chunks: {} before compression{whole}, stored as {} (compressed, encrypted)",
        human_bytes(s.bytes_new),
        human_bytes(s.bytes_stored)
    )
}

fn restore(ctx: &Context, args: &RestoreArgs) -> Result<()> {
    let repo = ctx.open()?;
    let snapshot = repo.find_snapshot(&args.snapshot, args.vm.as_deref())?;
    let disks = restore::selected_disks(&snapshot, args.disk.as_deref())?;
    if args.target == "-" {
        return restore_to_stdout(ctx, &repo, &snapshot, &disks);
    }
    let options = restore::RestoreOptions {
        format: args.format.clone(),
        force: args.force,
        threads: ctx.io_threads(&repo),
        connections: connections(ctx.threads()),
    };
    match restore::Target::for_path(Path::new(&args.target)) {
        restore::Target::Device(device) => {
            restore_to_device(ctx, &repo, &snapshot, &disks, &device, &options)
        }
        restore::Target::Folder(dir) => {
            restore_to_folder(ctx, &repo, &snapshot, &disks, &dir, &options)
        }
    }
}

/// Runs one disk's restore with a progress display.
fn with_restore_progress<T>(
    ctx: &Context,
    work: impl FnOnce(&vbackup_core::Progress) -> vbackup_vm::Result<T> + Send,
) -> Result<T>
where
    T: Send,
{
    Ok(with_progress(
        "restore",
        ctx.global.quiet || ctx.global.json,
        &ctx.signal,
        work,
    )?)
}

fn restore_to_folder(
    ctx: &Context,
    repo: &Repository,
    snapshot: &Snapshot,
    disks: &[&DiskRecord],
    dir: &Path,
    options: &restore::RestoreOptions,
) -> Result<()> {
    restore::prepare_folder(dir)?;
    let mut restored = Vec::new();
    for disk in disks {
        restored.push(with_restore_progress(ctx, |progress| {
            restore::restore_to_file(repo, disk, dir, options, progress)
        })?);
    }
    for written in restore::write_definition(snapshot, &restored, dir)? {
        ctx.say(format!("wrote the VM definition to {}", written.display()));
    }
    if !ctx.json(&restored)? {
        for r in &restored {
            ctx.say(format!(
                "restored disk '{}' of snapshot {} to {} ({}, {} of data, {:.1} s, {})",
                r.disk,
                snapshot.short_id(),
                r.path,
                r.format,
                human_bytes(r.stats.bytes_written),
                r.seconds,
                human_rate(r.stats.bytes_written, r.seconds)
            ));
        }
    }
    Ok(())
}

/// Writes one disk onto a block device (see
/// [`restore::restore_to_device`]).
fn restore_to_device(
    ctx: &Context,
    repo: &Repository,
    snapshot: &Snapshot,
    disks: &[&DiskRecord],
    device: &Path,
    options: &restore::RestoreOptions,
) -> Result<()> {
    let [disk] = disks else {
        bail!(usage_error(format!(
            "snapshot {} has {} disks; choose one with --disk to write onto a block device",
            snapshot.short_id(),
            disks.len()
        )));
    };
    let restored = [with_restore_progress(ctx, |progress| {
        restore::restore_to_device(repo, disk, device, options, progress)
    })?];
    if !ctx.json(&restored)? {
        ctx.say(format!(
            "restored disk '{}' of snapshot {} onto {} ({:.1} s)",
            disk.name,
            snapshot.short_id(),
            device.display(),
            restored[0].seconds
        ));
    }
    Ok(())
}

fn restore_to_stdout(
    ctx: &Context,
    repo: &Repository,
    snapshot: &Snapshot,
    disks: &[&DiskRecord],
) -> Result<()> {
    let [disk] = disks else {
        bail!(usage_error(format!(
            "snapshot {} has {} disks; choose one with --disk to stream to stdout",
            snapshot.short_id(),
            disks.len()
        )));
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    let result = with_progress("restore", true, &ctx.signal, |progress| {
        vbackup_core::restore_disk_to_writer(repo, disk, &mut out, ctx.io_threads(repo), progress)
    });
    match result {
        // The reader went away (`| head`): not an error, as for any Unix tool.
        Err(vbackup_core::Error::Target { source, .. })
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Ok(())
        }
        other => other.map(drop).map_err(Into::into),
    }
}

#[derive(Serialize)]
struct SnapshotRow<'a> {
    id: &'a str,
    time: &'a str,
    vm: &'a str,
    host: &'a str,
    tags: &'a [String],
    /// Full, incremental or differential.
    backup_type: vbackup_core::format::BackupType,
    /// offline, crash-consistent or application-consistent.
    consistency: Option<&'a str>,
    disks: &'a [DiskRecord],
    stats: &'a vbackup_core::format::BackupStats,
    damaged: bool,
    /// Dated later than this host's clock allows: not counted by retention.
    future_dated: bool,
    /// Forgotten on this host, yet stored again (a rollback).
    forgotten_here: bool,
    /// The newest boot verification (`verify --boot`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    boot: Option<&'a vbackup_core::boot_report::BootReport>,
}

fn snapshots(ctx: &Context, args: &SnapshotsArgs) -> Result<()> {
    let repo = ctx.open()?;
    let (all, damaged) = repo.list_snapshots_checked()?;
    let list: Vec<&Snapshot> = all
        .iter()
        .filter(|s| args.vm.as_ref().is_none_or(|vm| &s.manifest.vm == vm))
        .collect();
    for error in &damaged {
        eprintln!("vbackup: warning: {error}");
    }
    let state = ctx.client_state(&repo)?;
    let back: std::collections::HashSet<&str> = state
        .reappeared(all.iter().map(|s| s.id.as_str()))
        .into_iter()
        .map(|(id, f)| {
            eprintln!(
                "vbackup: warning: snapshot {id} (VM '{}', {}) was removed by `vbackup forget` on this host at {}, but the storage holds it again: the storage put back a removed manifest (rollback or replay); do not trust it (`vbackup check` reports it, `vbackup forget` removes it again)",
                f.vm, f.time, f.forgotten
            );
            id
        })
        .collect();
    let marked: std::collections::HashSet<String> =
        vbackup_core::marked_snapshots(&repo)?.into_iter().collect();
    let (boots, bad_boots) = vbackup_core::boot_report::latest_boot_reports(&repo)?;
    for key in &bad_boots {
        eprintln!("vbackup: warning: boot report {key} is damaged or of another snapshot; ignored");
    }
    let now = chrono::Utc::now();
    let rows: Vec<SnapshotRow> = list
        .iter()
        .map(|s| SnapshotRow {
            id: &s.id,
            time: &s.manifest.time,
            vm: &s.manifest.vm,
            host: &s.manifest.host,
            tags: &s.manifest.tags,
            backup_type: s.manifest.backup_type,
            consistency: s.manifest.consistency.as_deref(),
            disks: &s.manifest.disks,
            stats: &s.manifest.stats,
            damaged: marked.contains(&s.id),
            future_dated: s.is_future_dated(now),
            forgotten_here: back.contains(s.id.as_str()),
            boot: boots.get(&s.id),
        })
        .collect();
    let future = rows.iter().filter(|r| r.future_dated).count();
    if future > 0 {
        eprintln!(
            "vbackup: warning: {future} snapshot(s) dated later than this host's clock allows (forged, or a host with a wrong clock): marked FUTURE, never counted by retention rules nor used as a base"
        );
    }
    if !ctx.text_wanted(&rows)? {
        return Ok(());
    }
    println!(
        "{:<8}  {:<19}  {:<16}  {:<12}  {:<12}  {:<11}  {:>5}  {:>10}  {:>10}  {:<7}  {:<13}  TAGS",
        "ID",
        "TIME (UTC)",
        "VM",
        "HOST",
        "TYPE",
        "CONSISTENCY",
        "DISKS",
        "SIZE",
        "NEW",
        "STATUS",
        "BOOT"
    );
    for s in &list {
        let m = &s.manifest;
        let size: u64 = m.disks.iter().map(|d| d.virtual_size).sum();
        println!(
            "{:<8}  {:<19}  {:<16}  {:<12}  {:<12}  {:<11}  {:>5}  {:>10}  {:>10}  {:<7}  {:<13}  {}",
            s.short_id(),
            m.time.get(..19).unwrap_or(&m.time).replace('T', " "),
            m.vm,
            m.host,
            m.backup_type.to_string(),
            consistency_column(m.consistency.as_deref()),
            m.disks.len(),
            human_bytes(size),
            human_bytes(m.stats.bytes_stored),
            if back.contains(s.id.as_str()) {
                "FORGOT"
            } else if marked.contains(&s.id) {
                "DAMAGED"
            } else if s.is_future_dated(now) {
                "FUTURE"
            } else {
                "ok"
            },
            boot_column(boots.get(&s.id)),
            m.tags.join(",")
        );
    }
    println!("{} snapshot(s)", list.len());
    Ok(())
}

/// A snapshot's newest boot verification in the `snapshots` table:
/// `passed 4.2s`, `failed`, or `-` when it was never booted.
fn boot_column(report: Option<&vbackup_core::boot_report::BootReport>) -> String {
    match report {
        None => "-".into(),
        Some(r) => match r.seconds_to_heartbeat {
            Some(t) if r.passed => format!("passed {t:.1}s"),
            _ => r.verdict().into(),
        },
    }
}

/// A snapshot's consistency in the `snapshots` table: `offline`, `crash`
/// (crash-consistent: a running VM at one instant), `application`
/// (application-consistent: filesystems frozen by the guest agent), or `-`
/// when not recorded (snapshots of older versions).
fn consistency_column(consistency: Option<&str>) -> &str {
    match consistency {
        None => "-",
        Some(c) => c.strip_suffix("-consistent").unwrap_or(c),
    }
}

fn stats(ctx: &Context) -> Result<()> {
    let repo = ctx.open()?;
    let s = vbackup_core::stats(&repo)?;
    if !ctx.text_wanted(&s)? {
        return Ok(());
    }
    println!(
        "repository   {} ({})",
        repo.location(),
        &repo.config().id[..8]
    );
    println!("snapshots    {} of {} VM(s)", s.snapshots, s.vms);
    println!(
        "virtual      {}  (sum of disk sizes over all snapshots)",
        human_bytes(s.logical_bytes)
    );
    println!(
        "data         {}  (allocated, non-zero data over all snapshots)",
        human_bytes(s.referenced_bytes)
    );
    println!(
        "unique       {}  in {} chunks",
        human_bytes(s.unique_bytes),
        s.unique_chunks
    );
    println!(
        "stored       {}  (compressed and encrypted)",
        human_bytes(s.stored_bytes)
    );
    println!("dedup        {:.2}x", s.dedup_ratio);
    println!("compression  {:.2}x", s.compression_ratio);
    println!(
        "total        {:.2}x  (data / stored)",
        s.dedup_ratio * s.compression_ratio
    );
    if s.unreferenced_chunks > 0 {
        println!(
            "unreferenced {} chunk(s), {} (left by interrupted backups)",
            s.unreferenced_chunks,
            human_bytes(s.unreferenced_bytes)
        );
    }
    Ok(())
}

fn key(ctx: &Context, command: &KeyCommand) -> Result<()> {
    let repo = ctx.open()?;
    match command {
        KeyCommand::Add => {
            let passphrase = new_passphrase()?
                .ok_or_else(|| usage_error("no new passphrase: set VBACKUP_NEW_PASSWORD or VBACKUP_NEW_PASSWORD_FILE, or run on a terminal"))?;
            if passphrase.is_empty() {
                return Err(usage_error("the new passphrase is empty"));
            }
            let id = repo.add_key(&passphrase, kdf_params())?;
            if !ctx.json(&serde_json::json!({ "added": id }))? {
                ctx.say(format!("added key {}", &id[..8]));
            }
        }
        KeyCommand::List => {
            let keys = repo.list_keys()?;
            if ctx.text_wanted(&keys)? {
                println!(
                    "  {:<32}  {:<20}  {:<16}  USER",
                    "ID", "CREATED (UTC)", "HOST"
                );
                for k in keys {
                    let mark = if k.current { "*" } else { " " };
                    println!(
                        "{mark} {:<32}  {:<20}  {:<16}  {}",
                        k.id,
                        to_the_second(&k.created),
                        k.host,
                        if k.user.is_empty() { "-" } else { &k.user }
                    );
                }
            }
        }
        KeyCommand::Remove { id } => {
            let removed = repo.remove_key(id)?;
            if !ctx.json(&serde_json::json!({ "removed": removed }))? {
                ctx.say(format!("removed key {}", &removed[..8]));
            }
        }
    }
    Ok(())
}

/// An RFC 3339 time as RFC 3339 in UTC to the whole second
/// (`2026-12-01T21:13:32Z`); text that is no such time as it is.
fn to_the_second(time: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(time).map_or_else(
        |_| time.to_string(),
        |t| t.to_utc().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

fn speed(ctx: &Context) -> Result<()> {
    let results = vbackup_core::speed::measure(std::time::Duration::from_millis(700));
    if ctx.text_wanted(&results)? {
        println!("single-thread throughput on a 4 MiB chunk (half text, half random):");
        for r in results {
            println!("  {:<26} {:>8.0} MiB/s", r.name, r.mib_per_sec);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_summary_new_data_says_what_it_counts() {
        let stats = vbackup_core::format::BackupStats {
            bytes_read: 5 << 20,
            bytes_new: 8 << 20,
            bytes_stored: 388,
            ..Default::default()
        };
        let line = new_chunks_line(&stats);
        assert!(
            line.contains("new chunks: 8.0 MiB before compression")
                && line.contains("unallocated parts as zeros")
                && line.contains("stored as 388 B"),
            "{line}"
        );
        let reused = vbackup_core::format::BackupStats {
            bytes_new: 1 << 20,
            ..stats
        };
        assert!(!new_chunks_line(&reused).contains("zeros"));
    }

    #[test]
    fn key_list_times_are_whole_rfc3339_seconds_in_utc() {
        assert_eq!(
            to_the_second("2026-12-01T21:13:32.432661234+00:00"),
            "2026-12-01T21:13:32Z"
        );
        assert_eq!(
            to_the_second("2026-12-01T23:13:32+02:00"),
            "2026-12-01T21:13:32Z"
        );
        assert_eq!(to_the_second("yesterday"), "yesterday");
    }

    #[test]
    fn attack_kdf_memory_variable_weakens_new_keys_only_in_debug_builds() {
        let cheap = Some(std::ffi::OsStr::new("1024"));
        let (release, warning) = kdf_params_from(cheap, false);
        assert_eq!(release, KdfParams::default());
        assert!(warning.is_some_and(|w| w.contains("ignored by release builds")));
        let (debug, warning) = kdf_params_from(cheap, true);
        assert_eq!(
            (debug.memory_kib, debug.iterations, warning),
            (1024, 1, None)
        );
        assert_eq!(kdf_params_from(None, false), (KdfParams::default(), None));
        let (bad, warning) = kdf_params_from(Some(std::ffi::OsStr::new("lots")), true);
        assert_eq!((bad, warning.is_some()), (KdfParams::default(), true));
    }
}
