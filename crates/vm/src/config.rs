//! The configuration file: named repositories and VMs, in TOML.
//!
//! ```toml
//! [repository.local]
//! location = "/srv/vbackup"
//! password-file = "/etc/vbackup/pw"
//!
//! [vm.web1]
//! disks = ["/var/lib/libvirt/images/web1.qcow2"]   # or qmp = "/run/qemu/web1.qmp"
//! repository = "local"
//! ```
//!
//! The sections deserialize straight into the library's options structs
//! ([`vbackup_open::RepositoryOptions`], [`VmSource`]), the same ones the
//! CLI fills from its flags, so a key means one thing everywhere and a
//! flag overrides the key of the same name. Unknown keys are refused, with
//! the line, so a typo is not silently ignored. Relative paths are taken
//! from the file's folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vbackup_open::{Location, RepositoryOptions};

use crate::job::VmSource;
use crate::{Error, Result};

/// Where the configuration file is looked for when none is named:
/// `$XDG_CONFIG_HOME/vbackup/vbackup.toml` (else `~/.config/…`), then this.
pub const SYSTEM_CONFIG: &str = "/etc/vbackup/vbackup.toml";

/// A configuration file's content.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// Repositories by name (`[repository.NAME]`).
    #[serde(default)]
    pub repository: BTreeMap<String, RepositoryOptions>,
    /// VMs by name (`[vm.NAME]`).
    #[serde(default)]
    pub vm: BTreeMap<String, VmSource>,
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
        config.check().map_err(invalid)?;
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

    /// The VM named `name`.
    pub fn vm(&self, name: &str) -> Option<&VmSource> {
        self.vm.get(name)
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

    /// Refuses what deserializing cannot: empty names and locations,
    /// unsupported schemes, a VM naming a repository that is not defined,
    /// a VM without disks or QMP socket.
    fn check(&self) -> std::result::Result<(), String> {
        for (name, options) in &self.repository {
            if name.trim().is_empty() {
                return Err("a [repository] section has an empty name".into());
            }
            if options.location.is_empty() {
                return Err(format!("[repository.{name}] has no location"));
            }
            Location::parse(&options.location).map_err(|e| format!("[repository.{name}]: {e}"))?;
        }
        for (name, source) in &self.vm {
            if name.trim().is_empty() {
                return Err("a [vm] section has an empty name".into());
            }
            if let Some(repository) = &source.repository {
                if !self.repository.contains_key(repository) {
                    return Err(format!(
                        "[vm.{name}] names the repository '{repository}', which no [repository.{repository}] section defines"
                    ));
                }
            }
            source.validate().map_err(|e| format!("[vm.{name}]: {e}"))?;
        }
        Ok(())
    }

    /// Makes every relative path absolute against `folder`.
    fn resolve_paths(&mut self, folder: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = folder.join(&*path);
            }
        };
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
        for source in self.vm.values_mut() {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

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
        let cases = [
            (
                "[repository.local]\nlocation = \"/srv\"\npasword-file = \"x\"\n",
                "pasword-file",
            ),
            (
                "[repository.local]\nlocation = \"/srv\"\n[repository.local]\n",
                "line 3",
            ),
            (
                "[repository.local]\npassword-file = \"/pw\"\n",
                "has no location",
            ),
            (
                "[repository.r]\nlocation = \"sftp://host/x\"\n",
                "'sftp' scheme",
            ),
            (
                "[vm.web1]\ndisks = [\"/a.qcow2\"]\nrepository = \"nope\"\n",
                "'nope'",
            ),
            (
                "[vm.web1]\nrepository = \"r\"\n[repository.r]\nlocation = \"/r\"\n",
                "disk images",
            ),
            ("[vms.web1]\n", "vms"),
            ("<domain type='kvm'>\n", "backup --definition"),
        ];
        for (text, reason) in cases {
            let error = Config::parse(text, Path::new("/etc/vbackup/vbackup.toml")).unwrap_err();
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
