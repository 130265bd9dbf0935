//! On-disk types of the repository's lifecycle: locks and leases, prune
//! lists, the stored retention policy and damage markers. All of them are
//! sealed objects like snapshots; their payloads carry a version so newer
//! layouts can be told apart (see `docs/format.md`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ChunkId;

/// Version of lock, policy and damage marker payloads written by this build.
pub const LIFECYCLE_VERSION: u32 = 1;
/// Version of the prune list payload written by this build.
pub const PRUNE_LIST_VERSION: u32 = 1;

/// What a lock object stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockKind {
    /// A running backup's lease: shared, never waited for.
    Backup,
    /// A running prune: exclusive against other prunes and repairs.
    Prune,
    /// A running repair: exclusive against prunes and other repairs.
    Repair,
    /// A running prune on storage without atomic rename (plain S3): it
    /// needs the repository to itself, so it excludes backups too. Backups
    /// that find a live one refuse to start (serialized `prune-exclusive`).
    PruneExclusive,
}

impl LockKind {
    /// Whether two holders of this kind exclude each other.
    pub fn is_exclusive(self) -> bool {
        !matches!(self, LockKind::Backup)
    }

    /// The command that holds it, for messages ("cannot prune: ...").
    pub fn verb(self) -> &'static str {
        match self {
            LockKind::Backup => "back up",
            LockKind::Prune | LockKind::PruneExclusive => "prune",
            LockKind::Repair => "repair",
        }
    }

    /// Whether backups must not run while a live lock of this kind exists.
    pub fn excludes_backups(self) -> bool {
        matches!(self, LockKind::PruneExclusive)
    }
}

impl fmt::Display for LockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockKind::Backup => "backup",
            LockKind::Prune => "prune",
            LockKind::Repair => "repair",
            LockKind::PruneExclusive => "prune-exclusive",
        })
    }
}

/// A lock or lease object (`locks/<32 hex>`), rewritten by its holder every
/// refresh interval and removed at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LockFile {
    /// Payload version ([`LIFECYCLE_VERSION`]).
    pub version: u32,
    /// What the holder does.
    pub kind: LockKind,
    /// Host of the holder.
    pub host: String,
    /// Process id of the holder on that host.
    pub pid: u32,
    /// When the holder started (RFC 3339, UTC, holder's clock).
    pub started: String,
    /// When the holder last rewrote the lock (RFC 3339, UTC).
    pub refreshed: String,
    /// The holder promises to refresh more often than this; a lock not
    /// refreshed for longer is stale (its holder crashed or hangs).
    pub stale_after_secs: u64,
    /// Identifies the process namespace of the holder (`<boot id>:<pid
    /// namespace>` on Linux): a reader in the same namespace can tell that
    /// `pid` is gone and the lock stale without waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Start time of the holder process (clock ticks after boot), to tell
    /// a reused pid from the holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_start: Option<u64>,
    /// For backups: the prune lists (`prune/...` names) the backup had
    /// loaded when it wrote this version of its lease. A prune sweeps a
    /// pending list only when every live lease names it here.
    #[serde(default)]
    pub pending_seen: Vec<String>,
}

/// Whether a prune list marks objects or logs a deletion in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneListKind {
    /// `prune/pending-*`: objects found unreferenced, to be deleted by a
    /// later sweep if they are still unreferenced and unchanged then.
    Pending = 1,
    /// `prune/deleting-*`: written by a sweep before it deletes anything.
    Deleting = 2,
}

/// The JSON part of a prune list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PruneListHeader {
    /// When the list was made (RFC 3339, UTC).
    pub created: String,
    /// Host of the prune that made it.
    pub host: String,
    /// For a deleting log: the pending lists it sweeps.
    #[serde(default)]
    pub sources: Vec<String>,
}

/// A prune list: chunk ids and index digests, each sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneList {
    /// Pending or deleting.
    pub kind: PruneListKind,
    /// Times, host, sources.
    pub header: PruneListHeader,
    /// Chunk ids, sorted.
    pub chunks: Vec<ChunkId>,
    /// Index object digests (`indexes/<hex>` without the folder), sorted.
    pub indexes: Vec<[u8; 32]>,
}

impl PruneList {
    /// Encodes the payload: version (u32), kind (u8), JSON header length
    /// (u32) and JSON, chunk count (u64) and 32-byte ids, index count (u64)
    /// and 32-byte digests. Integers are little-endian.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(&self.header)
            .map_err(|e| Error::internal(format!("cannot encode a prune list: {e}")))?;
        let ids = (self.chunks.len() + self.indexes.len()) * 32;
        let mut out = Vec::with_capacity(4 + 1 + 4 + json.len() + 16 + ids);
        out.extend_from_slice(&PRUNE_LIST_VERSION.to_le_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        self.chunks.iter().for_each(|c| out.extend_from_slice(&c.0));
        out.extend_from_slice(&(self.indexes.len() as u64).to_le_bytes());
        self.indexes.iter().for_each(|i| out.extend_from_slice(i));
        Ok(out)
    }

    /// Decodes and validates a payload made by [`PruneList::encode`].
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let mut reader = Reader { key, bytes, pos: 0 };
        let version = u32::from_le_bytes(reader.array()?);
        if version > PRUNE_LIST_VERSION || version == 0 {
            return Err(Error::UnsupportedVersion {
                what: format!("prune list '{key}'"),
                found: version,
                supported: PRUNE_LIST_VERSION,
            });
        }
        let kind = match reader.array::<1>()?[0] {
            1 => PruneListKind::Pending,
            2 => PruneListKind::Deleting,
            _ => return Err(Error::corrupt(key, "unknown prune list kind")),
        };
        let json_len = u32::from_le_bytes(reader.array()?) as usize;
        let header = serde_json::from_slice(reader.take(json_len)?)
            .map_err(|e| Error::corrupt(key, format!("invalid prune list header: {e}")))?;
        let chunks = reader.ids()?.into_iter().map(ChunkId).collect();
        let indexes = reader.ids()?;
        if reader.pos != bytes.len() {
            return Err(Error::corrupt(key, "trailing bytes after the prune list"));
        }
        Ok(Self {
            kind,
            header,
            chunks,
            indexes,
        })
    }
}

/// A bounds-checked cursor over a payload.
struct Reader<'a> {
    key: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, len: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(len).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or_else(|| Error::corrupt(self.key, "prune list truncated"))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let key = self.key;
        self.take(N)?
            .try_into()
            .map_err(|_| Error::corrupt(key, "prune list truncated"))
    }

    fn ids(&mut self) -> Result<Vec<[u8; 32]>> {
        let count = u64::from_le_bytes(self.array()?);
        let len = usize::try_from(count)
            .ok()
            .and_then(|n| n.checked_mul(32))
            .ok_or_else(|| Error::corrupt(self.key, "prune list count too large"))?;
        Ok(self
            .take(len)?
            .chunks_exact(32)
            .map(|id| id.try_into().unwrap_or([0u8; 32]))
            .collect())
    }
}

/// A calendar span for `--keep-within`: years, months, days and hours, as
/// in `1y6m`, `2w`, `36h` (`m` is months, `w` is 7 days).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CalendarSpan {
    /// Years.
    pub years: u32,
    /// Months.
    pub months: u32,
    /// Days (weeks are counted as 7 days).
    pub days: u32,
    /// Hours.
    pub hours: u32,
}

impl FromStr for CalendarSpan {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let bad =
            || format!("'{text}' is not a span like 7d, 2w, 1y6m or 36h (y, m = months, w, d, h)");
        let mut span = Self::default();
        let mut digits = String::new();
        for c in text.trim().chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let n: u32 = digits.parse().map_err(|_| bad())?;
            digits.clear();
            let slot = match c {
                'y' => &mut span.years,
                'm' => &mut span.months,
                'w' => {
                    span.days = span.days.saturating_add(n.saturating_mul(7));
                    continue;
                }
                'd' => &mut span.days,
                'h' => &mut span.hours,
                _ => return Err(bad()),
            };
            *slot = slot.saturating_add(n);
        }
        if !digits.is_empty() || text.trim().is_empty() {
            return Err(bad());
        }
        Ok(span)
    }
}

impl fmt::Display for CalendarSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = [
            (self.years, 'y'),
            (self.months, 'm'),
            (self.days, 'd'),
            (self.hours, 'h'),
        ];
        let mut any = false;
        for (n, unit) in parts.into_iter().filter(|(n, _)| *n > 0) {
            write!(f, "{n}{unit}")?;
            any = true;
        }
        if !any {
            f.write_str("0h")?;
        }
        Ok(())
    }
}

impl Serialize for CalendarSpan {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CalendarSpan {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Which snapshots a retention policy keeps; a snapshot is kept when any
/// rule keeps it. Counting rules (`last` … `yearly`) take the newest
/// snapshot of each of the newest N time buckets (UTC).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KeepRules {
    /// The newest N snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<u32>,
    /// The newest snapshot of each of the last N hours that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hourly: Option<u32>,
    /// The newest snapshot of each of the last N days that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily: Option<u32>,
    /// The newest snapshot of each of the last N ISO weeks that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekly: Option<u32>,
    /// The newest snapshot of each of the last N months that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly: Option<u32>,
    /// The newest snapshot of each of the last N years that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yearly: Option<u32>,
    /// Every snapshot younger than this span before the group's newest one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<CalendarSpan>,
    /// Every snapshot carrying one of these tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl KeepRules {
    /// True when no rule would keep anything (forgetting with these rules
    /// would remove every snapshot, so it is refused).
    pub fn is_empty(&self) -> bool {
        let counts = [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ];
        counts.iter().all(|n| n.unwrap_or(0) == 0) && self.within.is_none() && self.tags.is_empty()
    }
}

impl fmt::Display for KeepRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let counts = [
            ("last", self.last),
            ("hourly", self.hourly),
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
            ("yearly", self.yearly),
        ];
        for (name, n) in counts {
            if let Some(n) = n.filter(|n| *n > 0) {
                parts.push(format!("--keep-{name} {n}"));
            }
        }
        if let Some(span) = self.within {
            parts.push(format!("--keep-within {span}"));
        }
        for tag in &self.tags {
            parts.push(format!("--keep-tag {tag}"));
        }
        f.write_str(&parts.join(" "))
    }
}

/// How snapshots are grouped before retention rules apply: each group is
/// thinned on its own. The default is per VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupBy {
    /// Group by host name.
    pub host: bool,
    /// Group by VM name.
    pub vm: bool,
    /// Group by the set of tags.
    pub tags: bool,
}

impl Default for GroupBy {
    fn default() -> Self {
        Self {
            host: false,
            vm: true,
            tags: false,
        }
    }
}

impl FromStr for GroupBy {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let mut group = Self {
            host: false,
            vm: false,
            tags: false,
        };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "host" => group.host = true,
                "vm" => group.vm = true,
                "tags" => group.tags = true,
                _ => {
                    return Err(format!(
                        "'{part}' is not a grouping; use host, vm and/or tags (comma-separated)"
                    ))
                }
            }
        }
        Ok(group)
    }
}

impl fmt::Display for GroupBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<&str> = [(self.host, "host"), (self.vm, "vm"), (self.tags, "tags")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl Serialize for GroupBy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GroupBy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The retention policy stored in the repository (`policy`), applied by
/// `forget` when no rule is given on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PolicyFile {
    /// Payload version ([`LIFECYCLE_VERSION`]).
    pub version: u32,
    /// When it was set (RFC 3339, UTC).
    pub updated: String,
    /// Host that set it.
    pub host: String,
    /// The rules.
    pub keep: KeepRules,
    /// The grouping.
    pub group_by: GroupBy,
    /// Raised by one at every `policy set` (never lowered): a client that
    /// saw revision N refuses a stored policy with a lower one, which only
    /// a rollback of the storage can produce. 0 in policies written before
    /// the counter existed (they still load).
    #[serde(default)]
    pub revision: u64,
}

/// One disk of a damaged snapshot and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DamagedDisk {
    /// Disk name.
    pub disk: String,
    /// Its index object.
    pub index: String,
    /// What is wrong, for people.
    pub problem: String,
    /// Damaged or missing chunks (object names) the disk needs.
    #[serde(default)]
    pub chunks: Vec<String>,
}

/// A damage marker (`damaged/<snapshot id>`), written by `repair` for a
/// snapshot that cannot be restored completely, and removed by `repair`
/// once it can again. The snapshot itself is never deleted for damage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DamageMarker {
    /// Payload version ([`LIFECYCLE_VERSION`]).
    pub version: u32,
    /// The snapshot's id.
    pub snapshot: String,
    /// Its VM.
    pub vm: String,
    /// When repair marked it (RFC 3339, UTC).
    pub marked: String,
    /// What is broken.
    pub disks: Vec<DamagedDisk>,
}

/// Checks the version of a lifecycle JSON payload.
pub fn check_version(key: &str, version: u32) -> Result<()> {
    if version > LIFECYCLE_VERSION || version == 0 {
        return Err(Error::UnsupportedVersion {
            what: format!("object '{key}'"),
            found: version,
            supported: LIFECYCLE_VERSION,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn spans_and_groupings_parse_and_print() {
        let span: CalendarSpan = "1y6m2w3d12h".parse().unwrap();
        assert_eq!(
            (span.years, span.months, span.days, span.hours),
            (1, 6, 17, 12)
        );
        assert_eq!(span.to_string(), "1y6m17d12h");
        for bad in ["", "7", "3x", "d", "-1d"] {
            assert!(bad.parse::<CalendarSpan>().is_err(), "{bad:?}");
        }
        let group: GroupBy = "host,vm".parse().unwrap();
        assert_eq!(group.to_string(), "host,vm");
        assert!("vm,disk".parse::<GroupBy>().is_err());
    }

    #[test]
    fn empty_rules_are_recognized() {
        assert!(KeepRules::default().is_empty());
        let zero = KeepRules {
            daily: Some(0),
            ..Default::default()
        };
        assert!(zero.is_empty());
        let tag = KeepRules {
            tags: vec!["x".into()],
            ..Default::default()
        };
        assert!(!tag.is_empty());
        assert_eq!(tag.to_string(), "--keep-tag x");
    }

    proptest! {
        #[test]
        fn prune_lists_round_trip(n in 0usize..50, m in 0usize..5, seed in any::<u8>()) {
            let list = PruneList {
                kind: PruneListKind::Deleting,
                header: PruneListHeader {
                    created: "2026-01-01T00:00:00Z".into(),
                    host: "h".into(),
                    sources: vec!["prune/pending-1".into()],
                },
                chunks: (0..n).map(|i| ChunkId([seed ^ i as u8; 32])).collect(),
                indexes: (0..m).map(|i| [i as u8; 32]).collect(),
            };
            let bytes = list.encode().unwrap();
            prop_assert_eq!(PruneList::decode("k", &bytes).unwrap(), list);
            for cut in 0..bytes.len().min(64) {
                prop_assert!(PruneList::decode("k", &bytes[..cut]).is_err());
            }
        }

        #[test]
        fn hostile_prune_lists_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = PruneList::decode("k", &bytes);
        }
    }
}
