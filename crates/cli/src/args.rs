//! The command line, defined once: parsing, help and validation.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
#[command(name = "vbackup", version, max_term_width = 100, after_help = EXIT_CODES)]
pub struct Cli {
    /// Options every command shares.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The exit codes, shown under `--help`.
pub const EXIT_CODES: &str = "Exit codes:
  0    success
  1    the operation failed (I/O, storage, source image)
  2    bad usage: wrong arguments, no repository, unsupported format version
  3    damaged data found (verify) or met (restore)
  4    wrong or missing passphrase
  130  interrupted (Ctrl-C, SIGTERM); nothing was recorded";

/// Options shared by all commands.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Repository location (a folder).
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
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Worker threads for reading, compressing and storing (default: cores + 2).
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
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
    /// List snapshots.
    Snapshots(SnapshotsArgs),
    /// Read every chunk, authenticate and re-digest it; report what damage breaks.
    Verify,
    /// Show sizes, dedup and compression ratios.
    Stats,
    /// Manage the passphrases that open the repository.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Measure digest, cipher and compression throughput on this machine.
    Speed,
    /// Demonstrate vbackup end to end on a sample VM disk (no arguments needed).
    Quickstart(QuickstartArgs),
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
}

/// `vbackup backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Name of the VM (snapshots are grouped by it).
    #[arg(long)]
    pub vm: String,
    /// Disk images (raw, qcow2, vmdk, vhdx, vdi, ... anything qemu reads);
    /// with --qmp, the names of the devices or nodes to back up (default: all).
    #[arg(value_name = "DISK")]
    pub disks: Vec<PathBuf>,
    /// Back up a running VM through this QMP socket (QEMU or
    /// qemu-storage-daemon): all its disks at one instant, while it runs.
    #[arg(long, value_name = "SOCKET")]
    pub qmp: Option<PathBuf>,
    /// The guest agent's socket: freeze the guest's filesystems for the
    /// instant (application-consistent) and thaw them right after.
    #[arg(long, value_name = "SOCKET", requires = "qmp")]
    pub qga: Option<PathBuf>,
    /// The VM's own NBD server socket, if it already runs one (QEMU allows
    /// one); otherwise vbackup starts a private one for the backup.
    #[arg(long, value_name = "SOCKET", requires = "qmp")]
    pub nbd_socket: Option<PathBuf>,
    /// full: read everything; incremental: what changed since the VM's
    /// previous snapshot; differential: since its last full; auto:
    /// incremental when a valid base exists, else full. Changes come from
    /// vbackup's dirty bitmaps in qcow2 images or in the running VM.
    #[arg(long = "type", value_enum, default_value_t = BackupTypeArg::Auto)]
    pub backup_type: BackupTypeArg,
    /// Store this VM configuration with the snapshot (libvirt domain XML,
    /// a QEMU command line); restore writes it beside the disks.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
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
    /// Read every disk, even an image file unchanged (same inode, size,
    /// mtime and ctime) since the VM's previous snapshot.
    #[arg(long)]
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
    /// Folder to write the disks into, or `-` to stream one disk to stdout.
    #[arg(long, short = 't', value_name = "DIR|-")]
    pub target: String,
    /// Only snapshots of this VM (with `latest`).
    #[arg(long)]
    pub vm: Option<String>,
    /// Restore only this disk.
    #[arg(long)]
    pub disk: Option<String>,
    /// Output format (raw output is sparse; others are written through qemu).
    #[arg(long, default_value = "raw", value_name = "FMT")]
    pub format: String,
    /// Overwrite existing files in the target folder.
    #[arg(long)]
    pub force: bool,
}

/// `vbackup snapshots`.
#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// Only snapshots of this VM.
    #[arg(long)]
    pub vm: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("lots").is_err());
    }
}
