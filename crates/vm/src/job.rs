//! "Back up this VM": one request for every front end, whether the VM is
//! stopped (its disk images) or running (its QMP socket).
//!
//! [`VmSource`] says where a VM's disks are. It is the `[vm.NAME]` section
//! of a configuration file ([`crate::config`]) and what the CLI's backup
//! flags fill in; [`backup`] turns it into an offline or a live backup,
//! with the disk names, the stored definition and the engine options
//! derived the same way for all of them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vbackup_core::format::{ConfigFile, VmDefinition};
use vbackup_core::{BackupOptions, Progress, Repository, Snapshot};
use vbackup_qemu::live::FreezeReport;

use crate::offline::Image;
use crate::{Error, Requested, Result};

/// Where a VM's disks are and what to record with them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VmSource {
    /// Disk images (any format qemu reads); for a running VM (`qmp`), the
    /// device or node names to back up, empty for all.
    #[serde(default)]
    pub disks: Vec<PathBuf>,
    /// Names for the disks, in order; default: the file names without
    /// extension, made unique.
    #[serde(default)]
    pub disk_names: Vec<String>,
    /// The images' format; default: detected by qemu-img.
    #[serde(default)]
    pub format: Option<String>,
    /// The QMP socket of the QEMU (or qemu-storage-daemon) running the VM:
    /// back it up live, all disks at one instant.
    #[serde(default)]
    pub qmp: Option<PathBuf>,
    /// The guest agent's socket, to freeze the guest's filesystems at the
    /// instant (application-consistent).
    #[serde(default)]
    pub qga: Option<PathBuf>,
    /// The VM's own NBD server socket, when it already runs one.
    #[serde(default)]
    pub nbd_socket: Option<PathBuf>,
    /// A file to store with each snapshot: the libvirt domain XML or the
    /// QEMU command line; restores write it beside the disks.
    #[serde(default)]
    pub definition: Option<PathBuf>,
    /// The configuration file's name for the repository this VM is backed
    /// up to (`[repository.NAME]`).
    #[serde(default)]
    pub repository: Option<String>,
    /// Tags for every snapshot.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The host name to record; default: this machine's.
    #[serde(default)]
    pub host: Option<String>,
}

impl VmSource {
    /// This source, with what it leaves unset taken from `lower` (a
    /// configuration file's section under the command line's flags):
    /// lists and optional values where this one has none.
    pub fn over(self, lower: &VmSource) -> Self {
        let list = |mine: Vec<PathBuf>, theirs: &Vec<PathBuf>| match mine.is_empty() {
            true => theirs.clone(),
            false => mine,
        };
        let names = |mine: Vec<String>, theirs: &Vec<String>| match mine.is_empty() {
            true => theirs.clone(),
            false => mine,
        };
        Self {
            disks: list(self.disks, &lower.disks),
            disk_names: names(self.disk_names, &lower.disk_names),
            format: self.format.or_else(|| lower.format.clone()),
            qmp: self.qmp.or_else(|| lower.qmp.clone()),
            qga: self.qga.or_else(|| lower.qga.clone()),
            nbd_socket: self.nbd_socket.or_else(|| lower.nbd_socket.clone()),
            definition: self.definition.or_else(|| lower.definition.clone()),
            repository: self.repository.or_else(|| lower.repository.clone()),
            tags: names(self.tags, &lower.tags),
            host: self.host.or_else(|| lower.host.clone()),
        }
    }

    /// Refuses a source that cannot be backed up: no disks and no QMP
    /// socket, a guest agent or NBD socket without QMP, disk names that do
    /// not match the disks.
    pub fn validate(&self) -> Result<()> {
        if self.qmp.is_none() {
            if self.disks.is_empty() {
                return Err(Error::Invalid(
                    "name the VM's disk images (or, for a running VM, its QMP socket)".into(),
                ));
            }
            for (what, given) in [("guest agent", &self.qga), ("NBD", &self.nbd_socket)] {
                if given.is_some() {
                    return Err(Error::Invalid(format!(
                        "a {what} socket is only used to back up a running VM: give its QMP socket too"
                    )));
                }
            }
        }
        if !self.disk_names.is_empty() && self.disk_names.len() != self.disks.len() {
            return Err(Error::Invalid(format!(
                "{} disk names for {} disks; give one per disk or none",
                self.disk_names.len(),
                self.disks.len()
            )));
        }
        Ok(())
    }

    /// The disks' names in the VM: the ones given, else the file names
    /// without extension, made unique (`disk`, `disk-2`).
    pub fn disk_names(&self) -> Vec<String> {
        if !self.disk_names.is_empty() {
            return self.disk_names.clone();
        }
        let mut names: Vec<String> = Vec::new();
        for path in &self.disks {
            let stem = path
                .file_stem()
                .map_or("disk".into(), |s| s.to_string_lossy().into_owned());
            let mut name = stem.clone();
            let mut n = 1;
            while names.contains(&name) {
                n += 1;
                name = format!("{stem}-{n}");
            }
            names.push(name);
        }
        names
    }

    /// The disk images with their names in the VM.
    pub fn images(&self) -> Vec<Image> {
        self.disks
            .iter()
            .zip(self.disk_names())
            .map(|(path, name)| Image {
                name,
                path: path.clone(),
                format: self.format.clone(),
            })
            .collect()
    }

    /// The definition file's content, to store with the snapshot.
    pub fn definition_file(&self) -> Result<Option<ConfigFile>> {
        let Some(path) = &self.definition else {
            return Ok(None);
        };
        read_definition(path).map(Some)
    }
}

/// Reads the VM definition at `path`, named by its file name.
fn read_definition(path: &Path) -> Result<ConfigFile> {
    let content = std::fs::read_to_string(path).map_err(|source| Error::Io {
        context: format!("cannot read the VM definition {}", path.display()),
        source,
    })?;
    let name = path
        .file_name()
        .map_or("vm-config".into(), |n| n.to_string_lossy().into_owned());
    Ok(ConfigFile { name, content })
}

/// A backup to run: the VM, its source, and how.
#[derive(Debug, Clone)]
pub struct BackupJob {
    /// The VM's name in the repository.
    pub vm: String,
    /// Where its disks are.
    pub source: VmSource,
    /// The backup type asked for.
    pub requested: Requested,
    /// Worker threads (see `vbackup_open::io_threads`).
    pub threads: usize,
    /// Reuse the previous snapshot's index for image files whose
    /// fingerprint is unchanged (off: read every disk).
    pub skip_unchanged: bool,
}

/// What a backup did: the snapshot, and for a live backup what happened
/// in QEMU and the guest besides.
#[derive(Debug)]
pub struct BackupOutcome {
    /// The recorded snapshot.
    pub snapshot: Snapshot,
    /// Objects an earlier, killed vbackup had left in QEMU and that were
    /// removed (live backups).
    pub leftovers_removed: Vec<String>,
    /// The guest agent's part (live backups with a guest agent).
    pub freeze: Option<FreezeReport>,
    /// Problems after the snapshot was safely recorded (clean-up).
    pub warnings: Vec<String>,
}

/// Runs `job`: a live backup when its source names a QMP socket, else an
/// offline backup of its images.
pub fn backup(repo: &Repository, job: &BackupJob, progress: &Progress) -> Result<BackupOutcome> {
    job.source.validate()?;
    let options = BackupOptions {
        vm: job.vm.clone(),
        tags: job.source.tags.clone(),
        host: job.source.host.clone(),
        threads: job.threads.max(1),
        skip_unchanged: job.skip_unchanged,
    };
    let config_file = job.source.definition_file()?;
    match &job.source.qmp {
        Some(qmp) => {
            let request = crate::live::LiveBackup {
                vm: job.vm.clone(),
                qmp_socket: qmp.clone(),
                guest_agent: job.source.qga.clone(),
                nbd_socket: job.source.nbd_socket.clone(),
                only: job
                    .source
                    .disks
                    .iter()
                    .map(|d| d.to_string_lossy().into_owned())
                    .collect(),
                requested: job.requested,
                options,
                config_file,
                canary: Some(crate::live::DEFAULT_CANARY_PATH.to_string()),
            };
            let outcome = crate::live::backup(repo, &request, progress)?;
            Ok(BackupOutcome {
                snapshot: outcome.snapshot,
                leftovers_removed: outcome.leftovers_removed,
                freeze: Some(outcome.freeze),
                warnings: outcome.warnings,
            })
        }
        None => {
            let request = crate::offline::OfflineBackup {
                vm: job.vm.clone(),
                images: job.source.images(),
                requested: job.requested,
                options,
                definition: config_file.map(|file| VmDefinition {
                    qmp: None,
                    config_file: Some(file),
                }),
            };
            Ok(BackupOutcome {
                snapshot: crate::offline::backup(repo, &request, progress)?,
                leftovers_removed: Vec::new(),
                freeze: None,
                warnings: Vec::new(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn source(disks: &[&str]) -> VmSource {
        VmSource {
            disks: disks.iter().map(PathBuf::from).collect(),
            ..VmSource::default()
        }
    }

    #[test]
    fn disk_names_default_to_unique_file_stems() {
        let s = source(&["/a/root.qcow2", "/b/root.raw", "/c/data.img", "/d/root"]);
        assert_eq!(s.disk_names(), ["root", "root-2", "data", "root-3"]);
        let named = VmSource {
            disk_names: vec!["os".into(), "db".into()],
            ..source(&["/a/x.qcow2", "/b/y.qcow2"])
        };
        assert_eq!(named.disk_names(), ["os", "db"]);
        assert_eq!(named.images()[1].name, "db");
    }

    #[test]
    fn sources_that_cannot_be_backed_up_are_refused_with_the_reason() {
        let cases = [
            (VmSource::default(), "disk images"),
            (
                VmSource {
                    qga: Some("/run/qga.sock".into()),
                    ..source(&["/a.qcow2"])
                },
                "QMP socket too",
            ),
            (
                VmSource {
                    disk_names: vec!["one".into()],
                    ..source(&["/a.qcow2", "/b.qcow2"])
                },
                "1 disk names for 2 disks",
            ),
        ];
        for (bad, reason) in cases {
            let error = bad.validate().unwrap_err();
            assert!(error.to_string().contains(reason), "{error}");
            assert_eq!(error.class(), vbackup_core::ErrorClass::Usage);
        }
        let live = VmSource {
            qmp: Some("/run/web1.qmp".into()),
            ..VmSource::default()
        };
        live.validate().unwrap();
    }

    #[test]
    fn flags_win_over_the_configuration_file_and_fill_from_it() {
        let file = VmSource {
            repository: Some("local".into()),
            tags: vec!["nightly".into()],
            definition: Some("/etc/libvirt/qemu/web1.xml".into()),
            ..source(&["/var/lib/libvirt/images/web1.qcow2"])
        };
        let merged = source(&[]).over(&file);
        assert_eq!(merged, file);
        let flags = VmSource {
            tags: vec!["manual".into()],
            ..source(&["/tmp/other.qcow2"])
        };
        let merged = flags.over(&file);
        assert_eq!(merged.disks, [PathBuf::from("/tmp/other.qcow2")]);
        assert_eq!(merged.tags, ["manual"]);
        assert_eq!(merged.repository.as_deref(), Some("local"));
    }

    #[test]
    fn an_unreadable_definition_names_its_file() {
        let s = VmSource {
            definition: Some("/nonexistent/web1.xml".into()),
            ..source(&["/a.qcow2"])
        };
        let error = s.definition_file().unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/web1.xml"),
            "{error}"
        );
    }
}
