//! The command line, defined once: parsing, help and validation.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vbackup_core::format::lifecycle::{CalendarSpan, GroupBy, KeepRules};
use vbackup_core::ReadData;

/// Backup and disaster recovery for QEMU/KVM virtual machines.
///
/// vbackup stores VM disks in a repository that deduplicates identical 4 MiB
/// chunks, compresses them with zstd and encrypts them with AES-256-GCM (or
/// ChaCha20-Poly1305). Every snapshot restores on its own.
///
/// Start with:  vbackup init --repo /srv/vbackup
///        then  vbackup backup --repo /srv/vbackup --vm web1 /var/lib/libvirt/images/web1.qcow2
///        then  vbackup restore --repo /srv/vbackup latest --vm web1 --target /tmp/restored
#[derive(Debug, Parser)]
#[command(
    name = "vbackup",
    version,
    max_term_width = 100,
    after_help = EXIT_CODES,
    verbatim_doc_comment
)]
pub struct Cli {
    /// Options every command shares.
    #[command(flatten, next_help_heading = "Global options")]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The exit codes, shown under `--help`.
pub const EXIT_CODES: &str = "Exit codes:
  0    success
  1    the operation failed (I/O, storage, source image, a lock held by
       another process: e.g. a backup while a prune has an S3 repository)
  2    bad usage: wrong arguments, no repository, unsupported format version,
       a disk image that does not exist
  3    damaged data found (check, verify) or met (restore, or a source image
       qemu-img check finds corrupt); prune refused because snapshots or
       indexes are unreadable (run repair first); repair refused to
       quarantine on S3
  4    wrong or missing passphrase
  70   internal error: vbackup itself failed (please report it)
  130  interrupted (Ctrl-C, SIGTERM); nothing was recorded
  141  the reader of the output went away (a closed pipe)";

/// Options shared by all commands.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Repository location: a folder, s3:https://HOST:PORT/BUCKET/PREFIX on
    /// S3-compatible storage, or https://HOST:PORT/NAME on a `vbackup server`;
    /// or the name of a repository in the configuration file.
    #[arg(
        short = 'r',
        long,
        env = "VBACKUP_REPOSITORY",
        global = true,
        value_name = "REPO"
    )]
    pub repo: Option<String>,
    /// Read the passphrase from the first line of this file
    /// (else VBACKUP_PASSWORD, else a prompt on a terminal).
    #[arg(
        long,
        env = "VBACKUP_PASSWORD_FILE",
        global = true,
        value_name = "FILE"
    )]
    pub password_file: Option<PathBuf>,
    /// Read named repositories and VMs from this TOML file (default:
    /// ~/.config/vbackup/vbackup.toml, else /etc/vbackup/vbackup.toml, if
    /// one exists). `--repo NAME` then picks its `[repository.NAME]`, and
    /// `backup --vm NAME` takes the disks of its `[vm.NAME]`; flags win.
    #[arg(long, env = "VBACKUP_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Worker threads for reading, compressing and storing (default: cores + 2).
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    /// For https:// repositories: read the server token from the first
    /// line of this file (else VBACKUP_TOKEN).
    #[arg(long, env = "VBACKUP_TOKEN_FILE", global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// For https:// repositories: trust the server certificate with this
    /// SHA-256 fingerprint (`vbackup server` prints it), for self-signed ones.
    #[arg(
        long,
        env = "VBACKUP_SERVER_FINGERPRINT",
        global = true,
        value_name = "HEX"
    )]
    pub server_fingerprint: Option<String>,
    /// For remote repositories: do not keep a local copy of snapshot
    /// manifests and indexes (kept by default in VBACKUP_CACHE_DIR, else
    /// $XDG_CACHE_HOME/vbackup or ~/.cache/vbackup, so a backup does not
    /// fetch every manifest again). check, verify and repair never use it.
    #[arg(long, env = "VBACKUP_NO_CACHE", global = true)]
    pub no_cache: bool,
    /// Accept a repository without encryption (anyone with access to its
    /// storage can read and change it). Needed once per host and location:
    /// without it, an unencrypted config is refused, so storage cannot
    /// switch encryption off behind your back.
    #[arg(long, env = "VBACKUP_ALLOW_UNENCRYPTED", global = true)]
    pub allow_unencrypted: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new repository.
    Init(InitArgs),
    /// Back up the disks of one VM as one snapshot.
    Backup(BackupArgs),
    /// Restore the disks of a snapshot.
    Restore(RestoreArgs),
    /// Serve a snapshot's disks over NBD, straight from the repository
    /// (instant access: `qemu-img`, `qemu-system -blockdev`, `nbd-client`).
    Serve(crate::serve::ServeArgs),
    /// List snapshots.
    Snapshots(SnapshotsArgs),
    /// Check the repository: structure, and with --read-data the data too.
    Check(CheckArgs),
    /// Read every chunk, authenticate and re-digest it (the same as `check --read-data`);
    /// with --boot SNAPSHOT, boot the snapshot in isolation and wait for its heartbeat.
    Verify(crate::recover::VerifyArgs),
    /// Recover a VM from a snapshot without restoring it first.
    #[command(subcommand)]
    Recover(crate::recover::RecoverCommand),
    /// Remove snapshots by retention rules (UTC time buckets), per VM by default.
    Forget(ForgetArgs),
    /// Delete the chunks and indexes no snapshot references; safe while backups run
    /// (on S3: takes the repository to itself, refusing backups meanwhile).
    Prune(PruneArgs),
    /// Mark damaged snapshots, move damaged objects to quarantine/, clear healed markers.
    Repair(RepairArgs),
    /// Show, set or clear the retention policy stored in the repository.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// List locks and running backups' leases.
    Locks,
    /// Remove stale locks (all stale ones, or the given ids).
    Unlock(UnlockArgs),
    /// Show sizes, dedup and compression ratios.
    Stats,
    /// Manage the passphrases that open the repository.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Measure digest, cipher and compression throughput on this machine.
    Speed,
    /// Demonstrate vbackup end to end on a sample VM disk (no arguments needed).
    Quickstart(QuickstartArgs),
    /// Serve repositories over HTTPS to other hosts' vbackup (and manage its tokens).
    Server(crate::server::ServerArgs),
    /// Run the scheduler: the jobs of the configuration file (--config, default
    /// /etc/vbackup/vbackup.toml) on time, their history, the API for `jobs`.
    Daemon(crate::daemon::DaemonArgs),
    /// Ask the daemon: list, run, status, history, cancel.
    Jobs(crate::daemon::JobsArgs),
    /// Print a shell completion script (e.g. `vbackup completions bash > /etc/bash_completion.d/vbackup`).
    Completions(CompletionsArgs),
    /// Print the manual page in roff (e.g. `vbackup man | man -l -`).
    Man(ManArgs),
}

/// `vbackup completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `vbackup man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// The page of this command (`backup`, `server token add`, ...) instead
    /// of the page of vbackup itself.
    #[arg(value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// The globals that only a client of a repository uses: `vbackup server`
/// serves repositories and never opens one, so its help leaves them out.
const CLIENT_ONLY_GLOBALS: [&str; 7] = [
    "config",
    "password_file",
    "threads",
    "no_cache",
    "token_file",
    "server_fingerprint",
    "allow_unencrypted",
];

/// The one definition of the command line, built (global options copied
/// into every subcommand) and with the repository-client globals hidden
/// under `vbackup server`: what parsing, help, completions and the manual
/// page all use.
pub fn command() -> clap::Command {
    built(<Cli as clap::CommandFactory>::command())
}

/// `cmd` built, then with the repository-client globals hidden under
/// `server`. Only changes that keep every argument in its place (`hide`,
/// help text) are made after the build: clap indexes the arguments then.
fn built(mut cmd: clap::Command) -> clap::Command {
    cmd.build();
    cmd.mut_subcommands(|sub| match sub.get_name() {
        "server" => hide_client_globals(sub),
        _ => sub,
    })
}

/// `cmd` and its subcommands without the repository-client globals in
/// their help; `--repo` is described as what it means there (the
/// repository a token opens) or hidden where it means nothing.
fn hide_client_globals(cmd: clap::Command) -> clap::Command {
    let names_repository = cmd.get_name() == "add";
    cmd.mut_args(|arg| {
        let id = arg.get_id().as_str();
        if CLIENT_ONLY_GLOBALS.contains(&id) || (id == "repo" && !names_repository) {
            arg.hide(true)
        } else if id == "repo" {
            arg.help("The repository the token opens on this server (`*` for all)")
                .long_help(None::<&str>)
                .value_name("NAME")
        } else {
            arg
        }
    })
    .mut_subcommands(hide_client_globals)
}

/// The cipher to choose at `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EncryptionArg {
    /// AES-256-GCM where the CPU has AES instructions, else ChaCha20-Poly1305.
    Auto,
    /// AES-256-GCM.
    Aes256Gcm,
    /// ChaCha20-Poly1305.
    Chacha20Poly1305,
    /// No encryption (data readable by anyone with access to the storage).
    None,
}

/// The chunk digest to choose at `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DigestArg {
    /// Keyed BLAKE3 (fastest).
    Blake3,
    /// HMAC-SHA-256.
    HmacSha256,
}

/// `vbackup init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Chunk size: a power of two from 64K to 64M (suffixes K, M).
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Encryption of all data and metadata.
    #[arg(long, value_enum, default_value_t = EncryptionArg::Auto)]
    pub encryption: EncryptionArg,
    /// How chunks are named (a keyed digest of their content).
    #[arg(long, value_enum, default_value_t = DigestArg::Blake3)]
    pub digest: DigestArg,
    /// zstd compression level for chunks (1 = fastest, 19 = smallest).
    #[arg(long, default_value_t = 3)]
    pub compression_level: i32,
    /// Store new chunks in pack objects of about this size (1M to 512M), or
    /// 0 for one object per chunk. Default: 16M on S3, where every object
    /// costs requests; one object per chunk on local disks and servers.
    #[arg(long, value_parser = parse_size)]
    pub pack_size: Option<u64>,
}

/// `vbackup backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Name of the VM (snapshots are grouped by it).
    #[arg(long, value_parser = parse_vm_name)]
    pub vm: String,
    /// Disk images (raw, qcow2, vmdk, vhdx, vdi, ... anything qemu reads);
    /// with --qmp, the names of the devices or nodes to back up (default: all).
    /// Default: the disks of the VM's section in the configuration file.
    #[arg(value_name = "DISK")]
    pub disks: Vec<PathBuf>,
    /// Back up a running VM through this QMP socket (QEMU or
    /// qemu-storage-daemon): all its disks at one instant, while it runs.
    #[arg(help_heading = "Live VM", long, value_name = "SOCKET")]
    pub qmp: Option<PathBuf>,
    /// The guest agent's socket: freeze the guest's filesystems for the
    /// instant (application-consistent) and thaw them right after.
    #[arg(
        help_heading = "Live VM",
        long,
        value_name = "SOCKET",
        requires = "qmp"
    )]
    pub qga: Option<PathBuf>,
    /// The VM's own NBD server socket, if it already runs one (QEMU allows
    /// one); otherwise vbackup starts a private one for the backup.
    #[arg(
        help_heading = "Live VM",
        long,
        value_name = "SOCKET",
        requires = "qmp"
    )]
    pub nbd_socket: Option<PathBuf>,
    /// full: read everything; incremental: what changed since the VM's
    /// previous snapshot; differential: since its last full; auto:
    /// incremental when a valid base exists, else full. Changes come from
    /// vbackup's dirty bitmaps in qcow2 images or in the running VM.
    #[arg(
        help_heading = "Changed-block tracking",
        long = "type",
        value_name = "TYPE",
        value_enum,
        default_value_t = BackupTypeArg::Auto
    )]
    pub backup_type: BackupTypeArg,
    /// Store this VM definition with the snapshot (libvirt domain XML,
    /// a QEMU command line); restore writes it beside the disks.
    #[arg(long, value_name = "FILE")]
    pub definition: Option<PathBuf>,
    /// Image format of the disks (default: detected by qemu-img).
    #[arg(long, value_name = "FMT")]
    pub format: Option<String>,
    /// Names for the disks, in order (default: file names without extension).
    #[arg(long = "disk-name", value_name = "NAME")]
    pub disk_names: Vec<String>,
    /// Tag the snapshot (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Host name to record (default: this machine's).
    #[arg(long)]
    pub host: Option<String>,
    /// Look at every disk, even an image file whose fingerprint (inode,
    /// size, mtime, ctime) is unchanged since the VM's previous snapshot.
    /// Changed-block tracking still applies; `--type full` reads everything.
    #[arg(help_heading = "Changed-block tracking", long)]
    pub force_read: bool,
}

/// The backup type asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackupTypeArg {
    /// Incremental when a valid base exists, else full.
    Auto,
    /// Read every allocated byte.
    Full,
    /// Read what changed since the VM's previous snapshot.
    Incremental,
    /// Read what changed since the VM's last full snapshot.
    Differential,
}

impl From<BackupTypeArg> for vbackup_vm::Requested {
    fn from(arg: BackupTypeArg) -> Self {
        match arg {
            BackupTypeArg::Auto => Self::Auto,
            BackupTypeArg::Full => Self::Full,
            BackupTypeArg::Incremental => Self::Incremental,
            BackupTypeArg::Differential => Self::Differential,
        }
    }
}

/// `vbackup restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot: `latest`, an id, or a unique id prefix.
    pub snapshot: String,
    /// Folder to write the disks into, `-` to stream one disk to stdout,
    /// or a block device (an LVM volume, say) to write one disk onto (with
    /// --force); the device's old content is overwritten, holes included.
    /// A device that is mounted or in use is always refused.
    #[arg(long, short = 't', value_name = "DIR|-|DEVICE")]
    pub target: String,
    /// Only snapshots of this VM (with `latest`).
    #[arg(long, value_parser = parse_vm_name)]
    pub vm: Option<String>,
    /// Restore only this disk.
    #[arg(long)]
    pub disk: Option<String>,
    /// Output format (raw output is sparse; others are written through qemu).
    #[arg(long, default_value = "raw", value_name = "FMT")]
    pub format: String,
    /// Overwrite existing files in the target folder, or the block device
    /// given as --target.
    #[arg(long)]
    pub force: bool,
}

/// `vbackup snapshots`.
#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// Only snapshots of this VM.
    #[arg(long, value_parser = parse_vm_name)]
    pub vm: Option<String>,
}

/// Retention rules, shared by `forget` and `policy set`.
#[derive(Debug, Clone, Args)]
pub struct KeepArgs {
    /// Keep the newest N snapshots.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N hours (UTC) that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the last N days (UTC) that have one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the last N years that have one.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Keep every snapshot younger than SPAN before the group's newest one
    /// (e.g. 7d, 2w, 1y6m, 36h; m = months).
    #[arg(long, value_name = "SPAN", value_parser = parse_calendar_span)]
    pub keep_within: Option<CalendarSpan>,
    /// Keep every snapshot with this tag (repeatable).
    #[arg(long = "keep-tag", value_name = "TAG")]
    pub keep_tags: Vec<String>,
    /// Thin out each group on its own: any of host, vm, tags, comma-separated (default: vm).
    #[arg(long, value_name = "host,vm,tags", value_parser = parse_group_by)]
    pub group_by: Option<GroupBy>,
}

impl KeepArgs {
    /// The rules given, or `None` when no --keep-* option was given.
    pub fn rules(&self) -> Option<KeepRules> {
        let rules = KeepRules {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
            within: self.keep_within,
            tags: self.keep_tags.clone(),
        };
        (rules != KeepRules::default()).then_some(rules)
    }
}

/// Garbage-collection timing, shared by `prune` and `forget --prune`.
#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    /// Delete only objects an earlier prune marked at least this long ago
    /// (e.g. 30m, 2h; 0 deletes what this run marks, once no running backup
    /// predates it). Not used on S3, where prune has the repository to
    /// itself and deletes at once.
    #[arg(long, default_value = "30m", value_name = "DURATION", value_parser = parse_duration)]
    pub grace: Duration,
    /// Treat locks not refreshed for this long as stale (default: each
    /// lock's own limit, 10m). On S3 it can only lengthen the limits.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub stale_after: Option<Duration>,
}

/// `vbackup forget`.
#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// Forget these snapshots (ids or unique id prefixes) instead of
    /// applying rules.
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// Only this VM's snapshots.
    #[arg(long, value_name = "NAME", value_parser = parse_vm_name)]
    pub vm: Option<String>,
    /// Remove every snapshot of a VM without asking, when that is what the
    /// rules or ids say (otherwise asked on a terminal, refused elsewhere).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// The rules (without any, the policy stored with `vbackup policy set`).
    #[command(flatten)]
    pub keep: KeepArgs,
    /// Print the plan (which snapshot each rule keeps), remove nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Run `prune` afterwards.
    #[arg(long)]
    pub prune: bool,
    /// Timing of the prune.
    #[command(flatten)]
    pub gc: GcArgs,
}

/// `vbackup prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Print what would be marked and deleted, change nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Timing.
    #[command(flatten)]
    pub gc: GcArgs,
}

/// `vbackup check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Also read, authenticate and re-digest every chunk.
    #[arg(long)]
    pub read_data: bool,
    /// Read only a subset: N/M (part N of M, by chunk id) or X% (a
    /// deterministic sample). Implies --read-data.
    #[arg(long, value_name = "N/M|X%", value_parser = parse_read_data)]
    pub read_data_subset: Option<ReadData>,
    /// Treat locks not refreshed for this long as stale.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub stale_after: Option<Duration>,
}

impl CheckArgs {
    /// Which chunks to read.
    pub fn read_data(&self) -> ReadData {
        match (self.read_data_subset, self.read_data) {
            (Some(subset), _) => subset,
            (None, true) => ReadData::All,
            (None, false) => ReadData::None,
        }
    }
}

/// `vbackup repair`.
#[derive(Debug, Args)]
pub struct RepairArgs {
    /// Also put back quarantined indexes that are intact, and explain for
    /// each missing index what can rebuild it.
    #[arg(long)]
    pub index: bool,
    /// Print what would be done, change nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Find damaged chunks by reading only a subset (N/M or X%).
    #[arg(long, value_name = "N/M|X%", value_parser = parse_read_data, conflicts_with = "no_read_data")]
    pub read_data_subset: Option<ReadData>,
    /// Do not read chunks: handle missing objects only.
    #[arg(long)]
    pub no_read_data: bool,
}

/// `vbackup unlock`.
#[derive(Debug, Args)]
pub struct UnlockArgs {
    /// Lock ids or unique prefixes (default: every stale lock).
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// Refuse to remove a lock that is not stale.
    #[arg(long)]
    pub stale_only: bool,
}

/// `vbackup policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Show the stored policy.
    Show,
    /// Store retention rules that `forget` applies when given none.
    Set(KeepArgs),
    /// Remove the stored policy.
    Clear,
}

/// `vbackup key ...`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Add a passphrase (asked for, or read from VBACKUP_NEW_PASSWORD[_FILE]).
    Add,
    /// List the keys.
    List,
    /// Remove a key by id or unique id prefix.
    Remove {
        /// The key id.
        id: String,
    },
}

/// `vbackup quickstart`.
#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Work in this folder instead of a temporary one (kept afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Size of the sample disk in MiB.
    #[arg(long, default_value_t = 512)]
    pub size_mib: u64,
    /// Keep the temporary folder afterwards (without --dir it is removed
    /// at the end).
    #[arg(long)]
    pub keep: bool,
}

/// Parses the command line. An option's environment variable that is set
/// but empty (`VBACKUP_PASSWORD_FILE=`) counts as unset, as it does for a
/// shell user: otherwise clap reports a missing value for a flag
/// (`--password-file`) that was never typed.
pub fn parse() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    // Environment variables are detached before the build, which indexes
    // the arguments (see [`built`]).
    let matches = built(without_empty_env(Cli::command(), &|name| {
        std::env::var_os(name).is_some_and(|v| v.is_empty())
    }))
    .get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// `command` with the environment variables for which `empty` holds
/// detached from their options, in every subcommand too.
fn without_empty_env(
    command: clap::Command,
    empty: &dyn Fn(&std::ffi::OsStr) -> bool,
) -> clap::Command {
    let ids: Vec<clap::Id> = command
        .get_arguments()
        .filter(|a| a.get_env().is_some_and(empty))
        .map(|a| a.get_id().clone())
        .collect();
    ids.into_iter()
        .fold(command, |command, id| {
            command.mut_arg(id, |a| a.env(None::<&str>))
        })
        .mut_subcommands(|sub| without_empty_env(sub, empty))
}

/// Parses sizes like `4M`, `64K`, `1G` or plain bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, multiplier) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&text[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size like 4M, 512K or 1048576"))?;
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// Parses durations like `30m`, `90s`, `2h`, `1d`, `1h30m` or `0`
/// (here `m` is minutes).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("'{text}' is not a duration like 30m, 90s, 2h, 1d or 0");
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0u64;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() || text.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// A VM name: not empty, not only spaces (snapshots are grouped and
/// found by it).
pub(crate) fn parse_vm_name(text: &str) -> Result<String, String> {
    match text.trim().is_empty() {
        true => Err("a VM needs a name, e.g. --vm web1".to_string()),
        false => Ok(text.to_string()),
    }
}

fn parse_calendar_span(text: &str) -> Result<CalendarSpan, String> {
    text.parse()
}

fn parse_group_by(text: &str) -> Result<GroupBy, String> {
    text.parse()
}

fn parse_read_data(text: &str) -> Result<ReadData, String> {
    text.parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
        command().debug_assert();
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "10", "5x", "m"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn empty_env_password_file_counts_as_unset() {
        let command = without_empty_env(Cli::command(), &|name| {
            name == "VBACKUP_PASSWORD_FILE" || name == "VBACKUP_REPOSITORY"
        });
        let password = command
            .get_arguments()
            .find(|a| a.get_id() == "password_file")
            .unwrap();
        assert_eq!(password.get_env(), None);
        let token = command
            .get_arguments()
            .find(|a| a.get_id() == "token_file")
            .unwrap();
        assert_eq!(
            token.get_env(),
            Some(std::ffi::OsStr::new("VBACKUP_TOKEN_FILE"))
        );
    }

    #[test]
    fn keep_rules_come_from_the_options() {
        let cli = Cli::parse_from([
            "vbackup",
            "forget",
            "--keep-daily",
            "7",
            "--keep-within",
            "2w",
            "--keep-tag",
            "x",
        ]);
        let Command::Forget(args) = cli.command else {
            panic!("not forget");
        };
        let rules = args.keep.rules().unwrap();
        assert_eq!((rules.daily, rules.within.unwrap().days), (Some(7), 14));
        let cli = Cli::parse_from(["vbackup", "forget", "--group-by", "host,vm"]);
        let Command::Forget(args) = cli.command else {
            panic!("not forget");
        };
        assert!(args.keep.rules().is_none());
        assert_eq!(args.gc.grace, Duration::from_secs(1800));
    }
}
