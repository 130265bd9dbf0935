//! The configuration file: the daemon, named repositories, VMs and their
//! jobs, in TOML.
//!
//! ```toml
//! [daemon]
//! state = "/var/lib/vbackup"        # SQLite history and job state
//! socket = "/run/vbackup.sock"      # the API for `vbackup jobs ...`
//!
//! [repository.local]
//! location = "/srv/vbackup"
//! password-file = "/etc/vbackup/pw"
//!
//! [vm.web1]
//! disks = ["/var/lib/libvirt/images/web1.qcow2"]   # or qmp = "/run/qemu/web1.qmp"
//! repository = "local"
//! schedule = "hourly"
//! keep = { last = 24, daily = 7 }
//!
//! [verify.local]
//! schedule = "weekly"
//! read-data-subset = "10%"
//!
//! [prune.local]
//! schedule = "daily 04:00"
//! ```
//!
//! The sections deserialize straight into the library's options structs
//! ([`vbackup_open::RepositoryOptions`], [`vbackup_vm::job::VmSource`]),
//! the same ones the CLI fills from its flags, so a key means one thing
//! everywhere and a flag overrides the key of the same name. Unknown keys,
//! bad values and references to undefined repositories are refused with
//! the line (or the section) and the reason. Relative paths are taken from
//! the file's folder. The CLI reads `[repository]` and `[vm]`; the daemon
//! reads everything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vbackup_core::format::lifecycle::KeepRules;
use vbackup_core::ReadData;
use vbackup_open::{Location, RepositoryOptions};
use vbackup_vm::job::VmSource;

use crate::backup_type::BackupTypeSetting;
use crate::schedule::Schedule;
use crate::{Error, Result};

/// Where the configuration file is looked for when none is named:
/// `$XDG_CONFIG_HOME/vbackup/vbackup.toml` (else `~/.config/…`), then this.
pub const SYSTEM_CONFIG: &str = "/etc/vbackup/vbackup.toml";

/// A configuration file's content.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// The daemon's own settings (`[daemon]`).
    #[serde(default)]
    pub daemon: DaemonSection,
    /// Repositories by name (`[repository.NAME]`).
    #[serde(default)]
    pub repository: BTreeMap<String, RepositoryOptions>,
    /// VMs by name (`[vm.NAME]`).
    #[serde(default)]
    pub vm: BTreeMap<String, VmSection>,
    /// Verify jobs by repository name (`[verify.NAME]`).
    #[serde(default)]
    pub verify: BTreeMap<String, VerifySection>,
    /// Prune jobs by repository name (`[prune.NAME]`).
    #[serde(default)]
    pub prune: BTreeMap<String, PruneSection>,
    /// Where failures and RPO breaches are reported (`[notify]`).
    #[serde(default)]
    pub notify: crate::notify::NotifySection,
}

/// `[daemon]`: where the daemon keeps its state and listens, and how many
/// jobs it runs at once.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DaemonSection {
    /// The folder of the SQLite job history and state.
    #[serde(default = "default_state")]
    pub state: PathBuf,
    /// The unix socket of the API (`vbackup jobs`), for local root only.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// `HOST:PORT` for the dashboard, the REST API and `/metrics`.
    #[serde(default)]
    pub listen: Option<String>,
    /// Jobs running at once on this host.
    #[serde(default = "default_max_jobs")]
    pub max_jobs: usize,
    /// Jobs running at once on one repository.
    #[serde(default = "default_max_jobs_per_repository")]
    pub max_jobs_per_repository: usize,
    /// Attempts after a failed run, with a doubling delay.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The delay before the first retry (`30s`, `5m`).
    #[serde(default = "default_retry_delay", with = "humantime_serde")]
    pub retry_delay: Duration,
    /// The longest a run may take before it is cancelled (`12h`).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for DaemonSection {
    fn default() -> Self {
        Self {
            state: default_state(),
            socket: default_socket(),
            listen: None,
            max_jobs: default_max_jobs(),
            max_jobs_per_repository: default_max_jobs_per_repository(),
            retries: default_retries(),
            retry_delay: default_retry_delay(),
            timeout: default_timeout(),
        }
    }
}

fn default_state() -> PathBuf {
    PathBuf::from("/var/lib/vbackup")
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/vbackup.sock")
}

fn default_max_jobs() -> usize {
    2
}

fn default_max_jobs_per_repository() -> usize {
    2
}

fn default_retries() -> u32 {
    2
}

fn default_retry_delay() -> Duration {
    Duration::from_secs(60)
}

fn default_timeout() -> Duration {
    Duration::from_secs(12 * 3600)
}

/// Durations in the file: `90s`, `15m`, `2h`, `1d`.
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*value).to_string())
    }

    /// The same for optional durations.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let text = Option::<String>::deserialize(d)?;
            text.map(|t| super::super::parse_duration(&t))
                .transpose()
                .map_err(serde::de::Error::custom)
        }

        pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match value {
                Some(v) => s.serialize_str(&humantime::format_duration(*v).to_string()),
                None => s.serialize_none(),
            }
        }
    }
}

/// A duration like `2h`, `90s` or `1d 12h`, above zero.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|e| format!("'{text}' is not a duration like 90s, 15m, 2h or 1d: {e}"))?;
    match duration.is_zero() {
        true => Err(format!("'{text}': the duration must be above zero")),
        false => Ok(duration),
    }
}

/// `[vm.NAME]`: where the VM's disks are (the keys of
/// [`VmSource`]) and, for the daemon, when and how it is backed up.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmSection {
    /// When its backups run; none: only on demand (`vbackup jobs run`).
    #[serde(default)]
    pub schedule: Option<Schedule>,
    /// The backup type: `auto`, `full`, `incremental` or `differential`,
    /// or a pattern (`{ full = "Sun", differential = "daily" }`).
    #[serde(default, rename = "type")]
    pub backup_type: BackupTypeSetting,
    /// Retention, applied by the repository's prune job (and only to this
    /// VM's snapshots).
    #[serde(default)]
    pub keep: Option<KeepRules>,
    /// The recovery point objective: warn, and back up early, when the
    /// newest good snapshot is older than this.
    #[serde(default, with = "humantime_serde::option")]
    pub rpo: Option<Duration>,
    /// Where its disks are, and its repository.
    #[serde(flatten)]
    pub source: VmSource,
    /// Keys no part knows: refused, named.
    #[serde(flatten, skip_serializing)]
    unknown: BTreeMap<String, toml::Value>,
}

impl VmSection {
    /// A section for `source`, without schedule or policy.
    pub fn new(source: VmSource) -> Self {
        Self {
            source,
            ..Self::default()
        }
    }
}

/// `[verify.NAME]`: a scheduled verification of repository NAME.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VerifySection {
    /// When it runs.
    pub schedule: Schedule,
    /// Which chunks each run reads and authenticates: `10%` (a different
    /// sample each run would need `N/M`; a percentage is the same sample),
    /// `all` (the default), or `none` for the structure only.
    #[serde(default = "default_read_data", with = "read_data_serde")]
    pub read_data_subset: ReadData,
}

fn default_read_data() -> ReadData {
    ReadData::All
}

/// `read-data-subset` values.
mod read_data_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use vbackup_core::ReadData;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ReadData, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "all" => Ok(ReadData::All),
            "none" => Ok(ReadData::None),
            other => other.parse().map_err(serde::de::Error::custom),
        }
    }

    pub fn serialize<S: Serializer>(value: &ReadData, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&match value {
            ReadData::All => "all".to_string(),
            ReadData::None => "none".to_string(),
            ReadData::Subset { n, m } => format!("{n}/{m}"),
            ReadData::Percent(p) => format!("{p}%"),
        })
    }
}

/// `[prune.NAME]`: scheduled retention and garbage collection of
/// repository NAME: each VM's `keep` rules, then the unreferenced data.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PruneSection {
    /// When it runs.
    pub schedule: Schedule,
    /// How long unreferenced data waits before it is deleted (`30m`).
    #[serde(default, with = "humantime_serde::option")]
    pub grace: Option<Duration>,
}

impl Config {
    /// Reads and checks the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            file: path.to_path_buf(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks `text`, the content of the file at `origin`
    /// (named in errors; relative paths are taken from its folder).
    pub fn parse(text: &str, origin: &Path) -> Result<Config> {
        let invalid = |message: String| Error::Config {
            file: origin.to_path_buf(),
            message,
        };
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let mut message = e.to_string().trim_end().to_string();
            if text.trim_start().starts_with('<') {
                message.push_str(
                    "\n(this looks like XML: a VM definition is stored with `backup --definition FILE`)",
                );
            }
            invalid(message)
        })?;
        config.check(text).map_err(invalid)?;
        if let Some(folder) = origin.parent() {
            config.resolve_paths(folder);
        }
        Ok(config)
    }

    /// The configuration file to read when none is named: the user's,
    /// else the system's, whichever exists first.
    pub fn default_path() -> Option<PathBuf> {
        let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let user = non_empty("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| non_empty("HOME").map(|home| PathBuf::from(home).join(".config")))
            .map(|folder| folder.join("vbackup/vbackup.toml"));
        user.into_iter()
            .chain([PathBuf::from(SYSTEM_CONFIG)])
            .find(|path| path.is_file())
    }

    /// The repository named `name`.
    pub fn repository(&self, name: &str) -> Option<&RepositoryOptions> {
        self.repository.get(name)
    }

    /// The source of the VM named `name`.
    pub fn vm(&self, name: &str) -> Option<&VmSource> {
        self.vm.get(name).map(|section| &section.source)
    }

    /// The repository a command means when it names none: the VM's, else
    /// the only one the file defines.
    pub fn default_repository(&self, vm: Option<&str>) -> Option<&str> {
        if let Some(name) = vm.and_then(|vm| self.vm(vm)?.repository.as_deref()) {
            return Some(name);
        }
        match self.repository.len() {
            1 => self.repository.keys().next().map(String::as_str),
            _ => None,
        }
    }

    /// The repository a VM's backups go to: its own, else the only one.
    pub fn vm_repository(&self, vm: &str) -> Option<&str> {
        self.default_repository(Some(vm))
    }

    /// Refuses what deserializing cannot: empty names and locations,
    /// unsupported schemes, unknown keys in VM sections, sections naming a
    /// repository that is not defined, a VM without disks or QMP socket.
    fn check(&self, text: &str) -> std::result::Result<(), String> {
        if let Some(email) = &self.notify.email {
            email.check()?;
        }
        if let Some(url) = &self.notify.webhook {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "[notify] webhook '{url}' is not an http:// or https:// URL"
                ));
            }
        }
        if self.daemon.max_jobs == 0 || self.daemon.max_jobs_per_repository == 0 {
            return Err("[daemon] max-jobs and max-jobs-per-repository must be at least 1".into());
        }
        for (name, options) in &self.repository {
            if name.trim().is_empty() {
                return Err("a [repository] section has an empty name".into());
            }
            if options.location.is_empty() {
                return Err(format!("[repository.{name}] has no location"));
            }
            Location::parse(&options.location).map_err(|e| format!("[repository.{name}]: {e}"))?;
        }
        for (name, section) in &self.vm {
            self.check_vm(name, section, text)?;
        }
        for (kind, names) in [
            ("verify", self.verify.keys().collect::<Vec<_>>()),
            ("prune", self.prune.keys().collect()),
        ] {
            for name in names {
                if !self.repository.contains_key(name) {
                    return Err(format!(
                        "[{kind}.{name}] is for the repository '{name}', which no [repository.{name}] section defines"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks one `[vm.NAME]` section.
    fn check_vm(
        &self,
        name: &str,
        section: &VmSection,
        text: &str,
    ) -> std::result::Result<(), String> {
        if name.trim().is_empty() {
            return Err("a [vm] section has an empty name".into());
        }
        if let Some(key) = section.unknown.keys().next() {
            let line = key_line(text, &format!("vm.{name}"), key)
                .map(|n| format!("line {n}: "))
                .unwrap_or_default();
            return Err(format!(
                "{line}[vm.{name}] has the unknown key '{key}' (known: disks, disk-names, format, qmp, qga, nbd-socket, definition, repository, tags, host, schedule, type, keep, rpo)"
            ));
        }
        if let Some(repository) = &section.source.repository {
            if !self.repository.contains_key(repository) {
                return Err(format!(
                    "[vm.{name}] names the repository '{repository}', which no [repository.{repository}] section defines"
                ));
            }
        }
        if section.schedule.is_some() && self.vm_repository(name).is_none() {
            return Err(format!(
                "[vm.{name}] has a schedule but no repository: add repository = \"NAME\""
            ));
        }
        section
            .source
            .validate()
            .map_err(|e| format!("[vm.{name}]: {e}"))
    }

    /// Makes every relative path absolute against `folder`.
    fn resolve_paths(&mut self, folder: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = folder.join(&*path);
            }
        };
        resolve(&mut self.daemon.state);
        resolve(&mut self.daemon.socket);
        for options in self.repository.values_mut() {
            if let Ok(Location::Folder(path)) = options.location() {
                if path.is_relative() {
                    options.location = folder.join(path).to_string_lossy().into_owned();
                }
            }
            options
                .password_file
                .iter_mut()
                .chain(options.token_file.iter_mut())
                .chain(options.cache_dir.iter_mut())
                .for_each(resolve);
        }
        for section in self.vm.values_mut() {
            let source = &mut section.source;
            let live = source.qmp.is_some();
            source
                .qmp
                .iter_mut()
                .chain(source.qga.iter_mut())
                .chain(source.nbd_socket.iter_mut())
                .chain(source.definition.iter_mut())
                .for_each(resolve);
            // With QMP, "disks" are device or node names, not paths.
            if !live {
                source.disks.iter_mut().for_each(resolve);
            }
        }
    }
}

/// The line (from 1) where `key` is set in the table `[table]` of `text`,
/// for messages about keys found unknown after parsing.
fn key_line(text: &str, table: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            current = header.trim_end_matches(']').trim().replace('"', "");
            continue;
        }
        let assigned = line
            .split_once('=')
            .map(|(k, _)| k.trim().trim_matches('"'));
        if current == table && assigned == Some(key) {
            return Some(n + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The daemon issue's minimal configuration, as written there.
    const ISSUE_EXAMPLE: &str = r#"
[daemon]
state = "/var/lib/vbackup"        # SQLite history and job state
socket = "/run/vbackup.sock"      # the API for `vbackup jobs ...` (local root)
listen = "127.0.0.1:8470"         # web dashboard, REST API and /metrics

[repository.local]
location = "/srv/vbackup"
password-file = "/etc/vbackup/pw"

[vm.web1]
disks = ["/var/lib/libvirt/images/web1.qcow2"]   # or qmp = "/run/qemu/web1.qmp", qga = "..."
repository = "local"
schedule = "hourly"               # also "daily 02:30", "Mon..Fri 22:00", "*:0/15", or a cron expression
type = "auto"
keep = { last = 24, daily = 7, weekly = 4, monthly = 12 }
rpo = "2h"                        # warn, and run early, when the newest good snapshot is older than this

[verify.local]
schedule = "weekly"
read-data-subset = "10%"

[prune.local]
schedule = "daily 04:00"
"#;

    const EXAMPLE: &str = r#"
[repository.local]
location = "/srv/vbackup"
password-file = "pw"

[repository.offsite]
location = "s3:https://s3.example.net/backups/vbackup"
no-cache = true

[vm.web1]
disks = ["/var/lib/libvirt/images/web1.qcow2"]
repository = "local"
definition = "/etc/libvirt/qemu/web1.xml"

[vm.db]
qmp = "/run/qemu/db.qmp"
disks = ["virtio0"]
repository = "offsite"
"#;

    #[test]
    fn the_daemon_issue_example_parses_as_written() {
        let config = Config::parse(ISSUE_EXAMPLE, Path::new("/etc/vbackup/vbackup.toml")).unwrap();
        assert_eq!(config.daemon.listen.as_deref(), Some("127.0.0.1:8470"));
        assert_eq!(config.daemon.socket, PathBuf::from("/run/vbackup.sock"));
        let web1 = &config.vm["web1"];
        assert_eq!(web1.schedule.as_ref().unwrap().as_str(), "hourly");
        assert_eq!(
            web1.backup_type,
            BackupTypeSetting::Fixed(crate::backup_type::FixedType::Auto)
        );
        assert_eq!(web1.keep.as_ref().unwrap().last, Some(24));
        assert_eq!(web1.rpo, Some(Duration::from_secs(7200)));
        assert_eq!(
            config.verify["local"].read_data_subset,
            ReadData::Percent(10.0)
        );
        assert_eq!(config.prune["local"].schedule.as_str(), "daily 04:00");
    }

    #[test]
    fn the_documented_example_parses_into_the_options_structs() {
        let config = Config::parse(EXAMPLE, Path::new("/etc/vbackup/vbackup.toml")).unwrap();
        let local = config.repository("local").unwrap();
        assert_eq!(local.location, "/srv/vbackup");
        assert_eq!(local.password_file, Some("/etc/vbackup/pw".into()));
        assert!(config.repository("offsite").unwrap().no_cache);
        let web1 = config.vm("web1").unwrap();
        assert_eq!(web1.repository.as_deref(), Some("local"));
        assert_eq!(web1.disk_names(), ["web1"]);
        let db = config.vm("db").unwrap();
        assert_eq!(
            db.disks,
            [PathBuf::from("virtio0")],
            "node names stay names"
        );
        assert_eq!(config.default_repository(Some("db")), Some("offsite"));
        assert_eq!(config.default_repository(None), None, "two repositories");
        assert_eq!(config.daemon.max_jobs, 2, "defaults");
    }

    #[test]
    fn a_single_repository_is_the_default() {
        let config = Config::parse(
            "[repository.only]\nlocation = \"r\"\n",
            Path::new("/cfg/v.toml"),
        )
        .unwrap();
        assert_eq!(config.default_repository(Some("web1")), Some("only"));
        assert_eq!(config.repository("only").unwrap().location, "/cfg/r");
    }

    #[test]
    fn broken_files_are_refused_with_the_line_and_the_reason() {
        let r = "[repository.r]\nlocation = \"/r\"\n";
        let cases = [
            (
                "[repository.local]\nlocation = \"/srv\"\npasword-file = \"x\"\n".to_string(),
                "pasword-file",
            ),
            (
                "[repository.local]\nlocation = \"/srv\"\n[repository.local]\n".into(),
                "line 3",
            ),
            (
                "[repository.local]\npassword-file = \"/pw\"\n".into(),
                "has no location",
            ),
            (
                "[repository.r]\nlocation = \"sftp://host/x\"\n".into(),
                "'sftp' scheme",
            ),
            (
                "[vm.web1]\ndisks = [\"/a.qcow2\"]\nrepository = \"nope\"\n".into(),
                "'nope'",
            ),
            (format!("[vm.web1]\nrepository = \"r\"\n{r}"), "disk images"),
            (
                format!("{r}[vm.web1]\ndisks = [\"/a\"]\nschedul = \"hourly\"\n"),
                "line 5: [vm.web1] has the unknown key 'schedul'",
            ),
            (
                format!("{r}[vm.web1]\ndisks = [\"/a\"]\nschedule = \"dialy\"\n"),
                "line 5",
            ),
            (
                format!("{r}[vm.web1]\ndisks = [\"/a\"]\nrpo = \"soon\"\n"),
                "not a duration",
            ),
            (
                format!("{r}[vm.web1]\ndisks = [\"/a\"]\ntype = \"weekly\"\n"),
                "line 5",
            ),
            (
                format!("{r}[vm.web1]\ndisks = [\"/a\"]\nkeep = {{ lats = 3 }}\n"),
                "lats",
            ),
            (
                format!("{r}[verify.r]\nschedule = \"weekly\"\nread-data-subset = \"200%\"\n"),
                "at most 100",
            ),
            ("[prune.nas]\nschedule = \"daily\"\n".into(), "'nas'"),
            ("[daemon]\nmax-jobs = 0\n".into(), "at least 1"),
            (
                "[notify]\nemail = { to = [\"not an address\"], from = \"v@h\", smtp = \"smtp://localhost\" }\n".into(),
                "'not an address'",
            ),
            (
                "[notify]\nemail = { to = [\"ops@example.com\"], from = \"v@h\" }\n".into(),
                "exactly one of smtp",
            ),
            ("[notify]\nwebhook = \"ftp://x\"\n".into(), "not an http"),
            ("[vms.web1]\n".into(), "vms"),
            ("<domain type='kvm'>\n".into(), "backup --definition"),
        ];
        for (text, reason) in cases {
            let error = Config::parse(&text, Path::new("/etc/vbackup/vbackup.toml")).unwrap_err();
            let message = error.to_string();
            assert!(message.contains("/etc/vbackup/vbackup.toml"), "{message}");
            assert!(message.contains(reason), "{reason}: {message}");
            assert_eq!(error.class(), vbackup_core::ErrorClass::Usage);
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = Config::load(Path::new("/nonexistent/vbackup.toml")).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/vbackup.toml"));
        assert_eq!(error.class(), vbackup_core::ErrorClass::Usage);
    }
}
