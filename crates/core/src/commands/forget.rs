//! `vbackup forget`: thin out snapshots by retention rules.
//!
//! Snapshots are grouped (per VM by default, or by any combination of host,
//! VM and tags) and each group is thinned on its own. A snapshot is kept
//! when at least one rule keeps it, and the plan records every rule that
//! does. Counting rules walk the group from the newest snapshot back and
//! keep the newest snapshot of each time bucket until they have kept N:
//! `last` (every snapshot is its own bucket), `hourly`, `daily`, `weekly`
//! (ISO 8601 weeks), `monthly`, `yearly`. Buckets are computed in UTC —
//! the times snapshots store — so daylight-saving changes never merge or
//! split a day. `within` keeps everything younger than a span before the
//! group's newest snapshot (not before now: a VM whose backups stopped
//! keeps its last ones), or before now if that is earlier. `tags` keeps
//! snapshots carrying any of the tags. Snapshots dated in the future (a
//! forged manifest, a host with a wrong clock) are kept, flagged, and
//! counted by no rule.
//!
//! Forgetting deletes snapshot manifests only (and their damage markers);
//! the chunks and indexes they alone used go with the next `prune`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Datelike, Months, Timelike, Utc};
use serde::Serialize;

use super::policy::read_policy;
use crate::format::lifecycle::{GroupBy, KeepRules, PolicyFile};
use crate::repo::{DAMAGED_PREFIX, SNAPSHOTS_PREFIX};
use crate::{Error, Repository, Result, Snapshot};

/// What `forget` is asked to do.
#[derive(Debug, Clone, Default)]
pub struct ForgetOptions {
    /// Rules; `None` uses the policy stored in the repository.
    pub keep: Option<KeepRules>,
    /// Grouping; `None` uses the stored policy's, else per VM.
    pub group_by: Option<GroupBy>,
    /// Only report the plan.
    pub dry_run: bool,
    /// The newest policy revision this client recorded
    /// ([`crate::client_state::ClientState::newest_policy_revision`]): a
    /// stored policy with a lower one is refused as a rollback.
    pub newest_policy_seen: u64,
}

/// The fate of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Decision {
    /// Snapshot id.
    pub snapshot: String,
    /// Its time (RFC 3339, UTC).
    pub time: String,
    /// VM.
    pub vm: String,
    /// Host.
    pub host: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Kept or removed.
    pub keep: bool,
    /// The rules that keep it (empty when removed).
    pub reasons: Vec<String>,
}

/// The plan for one group, newest snapshot first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ForgetGroup {
    /// The group, e.g. `vm=web1`.
    pub group: String,
    /// One decision per snapshot, newest first.
    pub decisions: Vec<Decision>,
}

/// What `forget` decided and did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ForgetReport {
    /// The rules applied.
    pub keep: KeepRules,
    /// The grouping applied.
    pub group_by: GroupBy,
    /// Whether the rules came from the stored policy.
    pub from_policy: bool,
    /// Nothing was deleted.
    pub dry_run: bool,
    /// The plan.
    pub groups: Vec<ForgetGroup>,
    /// Snapshots kept.
    pub kept: usize,
    /// Snapshots removed (or that would be).
    pub removed: usize,
    /// Snapshot manifests that could not be read (left alone).
    pub unreadable: usize,
    /// The stored policy applied, if the rules came from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyFile>,
}

/// Applies the rules: deletes the snapshots no rule keeps.
pub fn forget(repo: &Repository, options: &ForgetOptions) -> Result<ForgetReport> {
    let stored = match &options.keep {
        Some(_) => None,
        None => Some(read_policy(repo)?.ok_or_else(|| {
            Error::InvalidInput(
                "no keep rule given and no policy stored in the repository; give rules such as --keep-daily 7, or store them with `vbackup policy set`".to_string(),
            )
        })?),
    };
    if let Some(policy) = &stored {
        refuse_old_policy(policy, options.newest_policy_seen)?;
    }
    let keep = options
        .keep
        .clone()
        .or_else(|| stored.as_ref().map(|p| p.keep.clone()));
    let keep = keep.unwrap_or_default();
    let group_by = options
        .group_by
        .or_else(|| stored.as_ref().map(|p| p.group_by))
        .unwrap_or_default();
    let (snapshots, unreadable) = repo.list_snapshots_checked()?;
    let groups = plan(&snapshots, &keep, group_by)?;
    let removed: Vec<&Decision> = groups
        .iter()
        .flat_map(|g| &g.decisions)
        .filter(|d| !d.keep)
        .collect();
    if !options.dry_run {
        for decision in &removed {
            repo.backend()
                .delete(&format!("{SNAPSHOTS_PREFIX}{}", decision.snapshot))?;
            repo.backend()
                .delete(&format!("{DAMAGED_PREFIX}{}", decision.snapshot))?;
        }
    }
    let removed = removed.len();
    Ok(ForgetReport {
        keep,
        group_by,
        from_policy: stored.is_some(),
        dry_run: options.dry_run,
        kept: snapshots.len() - removed,
        removed,
        groups,
        unreadable: unreadable.len(),
        policy: stored,
    })
}

/// Refuses a stored policy older than the newest revision the client saw.
fn refuse_old_policy(policy: &PolicyFile, newest_seen: u64) -> Result<()> {
    if policy.revision >= newest_seen {
        return Ok(());
    }
    Err(Error::Refused(format!(
        "the repository's policy has revision {} (set {} on host '{}'), older than revision {newest_seen} that this host saw before: the storage put back an older policy (rollback or replay), so forget does not apply it and removes nothing. Check who can write to the storage, then store the rules you want again with `vbackup policy set`, or give them to forget (--keep-*)",
        policy.revision, policy.updated, policy.host
    )))
}

/// The retention plan as of now: which snapshots each group keeps, and
/// why. Refuses rules that keep nothing (they would remove every snapshot).
pub fn plan(
    snapshots: &[Snapshot],
    keep: &KeepRules,
    group_by: GroupBy,
) -> Result<Vec<ForgetGroup>> {
    plan_at(snapshots, keep, group_by, Utc::now())
}

/// [`plan`] as of `now`. Snapshots dated after `now` (beyond
/// [`crate::FUTURE_SKEW_MINUTES`]) are kept but never counted: forged ones
/// would otherwise take the places of real ones in `--keep-last` and the
/// buckets, and move the `--keep-within` window into the future.
pub fn plan_at(
    snapshots: &[Snapshot],
    keep: &KeepRules,
    group_by: GroupBy,
    now: DateTime<Utc>,
) -> Result<Vec<ForgetGroup>> {
    if keep.is_empty() {
        return Err(Error::InvalidInput(
            "no keep rule: forgetting would remove every snapshot; give at least one --keep-* rule"
                .to_string(),
        ));
    }
    let mut groups: BTreeMap<String, Vec<&Snapshot>> = BTreeMap::new();
    for snapshot in snapshots {
        groups
            .entry(group_key(snapshot, group_by))
            .or_default()
            .push(snapshot);
    }
    Ok(groups
        .into_iter()
        .map(|(group, members)| ForgetGroup {
            group,
            decisions: plan_group(members, keep, now),
        })
        .collect())
}

fn group_key(snapshot: &Snapshot, group_by: GroupBy) -> String {
    let m = &snapshot.manifest;
    let mut parts = Vec::new();
    if group_by.host {
        parts.push(format!("host={}", m.host));
    }
    if group_by.vm {
        parts.push(format!("vm={}", m.vm));
    }
    if group_by.tags {
        let mut tags = m.tags.clone();
        tags.sort();
        tags.dedup();
        parts.push(format!("tags={}", tags.join(",")));
    }
    match parts.is_empty() {
        true => "all".to_string(),
        false => parts.join(" "),
    }
}

/// A snapshot of a group with its parsed time.
struct Member<'a> {
    snapshot: &'a Snapshot,
    time: Option<DateTime<Utc>>,
    reasons: Vec<String>,
}

fn plan_group(snapshots: Vec<&Snapshot>, keep: &KeepRules, now: DateTime<Utc>) -> Vec<Decision> {
    let mut members: Vec<Member> = snapshots
        .into_iter()
        .map(|snapshot| Member {
            snapshot,
            time: snapshot.time(),
            reasons: Vec::new(),
        })
        .collect();
    members.sort_by(|a, b| {
        b.time
            .cmp(&a.time)
            .then_with(|| b.snapshot.id.cmp(&a.snapshot.id))
    });
    for member in members.iter_mut().filter(|m| m.time.is_none()) {
        member.reasons.push("time unreadable".to_string());
    }
    // Kept, flagged, and left out of every rule (their time is not taken
    // at its word).
    let (future, mut counted): (Vec<Member>, Vec<Member>) = members
        .into_iter()
        .partition(|m| m.snapshot.is_future_dated(now));
    apply_counting_rules(&mut counted, keep);
    apply_within(&mut counted, keep, now);
    let mut members: Vec<Member> = future
        .into_iter()
        .map(|mut m| {
            m.reasons
                .push("dated in the future (not counted)".to_string());
            m
        })
        .chain(counted)
        .collect();
    apply_tags(&mut members, keep);
    members.into_iter().map(decision).collect()
}

/// The time bucket of each counting rule.
type Bucket = fn(&DateTime<Utc>, usize) -> (i64, i64, i64);

fn apply_counting_rules(members: &mut [Member], keep: &KeepRules) {
    let rules: [(&str, Option<u32>, Bucket); 6] = [
        ("last", keep.last, |_, i| (i as i64, 0, 0)),
        ("hourly", keep.hourly, |t, _| {
            (
                i64::from(t.year()),
                i64::from(t.ordinal()),
                i64::from(t.hour()),
            )
        }),
        ("daily", keep.daily, |t, _| {
            (i64::from(t.year()), i64::from(t.ordinal()), 0)
        }),
        ("weekly", keep.weekly, |t, _| {
            let week = t.iso_week();
            (i64::from(week.year()), i64::from(week.week()), 0)
        }),
        ("monthly", keep.monthly, |t, _| {
            (i64::from(t.year()), i64::from(t.month()), 0)
        }),
        ("yearly", keep.yearly, |t, _| (i64::from(t.year()), 0, 0)),
    ];
    for (name, count, bucket) in rules {
        let Some(count) = count.filter(|n| *n > 0) else {
            continue;
        };
        let mut last = None;
        let mut kept = 0;
        for (i, member) in members.iter_mut().enumerate() {
            let Some(time) = member.time else { continue };
            if kept >= count {
                break;
            }
            let key = bucket(&time, i);
            if last != Some(key) {
                member.reasons.push(name.to_string());
                last = Some(key);
                kept += 1;
            }
        }
    }
}

/// Keeps what is younger than the span, counted back from the group's
/// newest snapshot or from `now`, whichever is earlier.
fn apply_within(members: &mut [Member], keep: &KeepRules, now: DateTime<Utc>) {
    let Some(span) = keep.within else { return };
    let Some(newest) = members.iter().find_map(|m| m.time) else {
        return;
    };
    let newest = newest.min(now);
    let months = Months::new(span.years.saturating_mul(12).saturating_add(span.months));
    let cutoff = newest
        .checked_sub_months(months)
        .and_then(|t| t.checked_sub_signed(chrono::Duration::days(i64::from(span.days))))
        .and_then(|t| t.checked_sub_signed(chrono::Duration::hours(i64::from(span.hours))));
    for member in members.iter_mut() {
        let inside = match (member.time, cutoff) {
            (Some(time), Some(cutoff)) => time >= cutoff,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if inside {
            member.reasons.push(format!("within {span}"));
        }
    }
}

fn apply_tags(members: &mut [Member], keep: &KeepRules) {
    for member in members.iter_mut() {
        for tag in keep
            .tags
            .iter()
            .filter(|t| member.snapshot.manifest.tags.contains(t))
        {
            member.reasons.push(format!("tag {tag}"));
        }
    }
}

fn decision(member: Member) -> Decision {
    let m = &member.snapshot.manifest;
    Decision {
        snapshot: member.snapshot.id.clone(),
        time: m.time.clone(),
        vm: m.vm.clone(),
        host: m.host.clone(),
        tags: m.tags.clone(),
        keep: !member.reasons.is_empty(),
        reasons: member.reasons,
    }
}

/// The plan as text, one line per snapshot: what `forget --dry-run` prints
/// and what the retention tests compare.
pub fn render_plan(groups: &[ForgetGroup]) -> String {
    let mut out = String::new();
    for group in groups {
        let kept = group.decisions.iter().filter(|d| d.keep).count();
        let _ = writeln!(
            out,
            "{}: keep {kept}, remove {}",
            group.group,
            group.decisions.len() - kept
        );
        for d in &group.decisions {
            let time = d.time.get(..19).unwrap_or(&d.time).replace('T', " ");
            let id = &d.snapshot[..d.snapshot.len().min(8)];
            let action = if d.keep { "keep  " } else { "remove" };
            let _ = writeln!(out, "  {action}  {time}  {id:<8}  {}", d.reasons.join(", "));
        }
    }
    out.lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}
