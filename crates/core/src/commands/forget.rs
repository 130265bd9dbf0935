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
    /// Forget exactly these snapshots (full ids or unique prefixes) instead
    /// of applying rules; exclusive with `keep`.
    pub ids: Vec<String>,
    /// Only this VM's snapshots are considered (by rules or by id).
    pub vm: Option<String>,
    /// Whether a VM may lose every snapshot it has.
    pub emptying: Emptying,
}

/// Whether a forget may remove every snapshot of a VM. Refused by default:
/// a rule that matches nothing (a mistyped `--keep-tag`) would otherwise
/// wipe whole VMs without a word.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Emptying {
    /// Refuse the whole forget if any VM would lose every snapshot.
    #[default]
    Refuse,
    /// Only these VMs may (the ones a user confirmed).
    Only(Vec<String>),
    /// Any VM may (`--yes`).
    Allow,
}

impl Emptying {
    fn allows(&self, vm: &str) -> bool {
        match self {
            Emptying::Refuse => false,
            Emptying::Only(vms) => vms.iter().any(|v| v == vm),
            Emptying::Allow => true,
        }
    }
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
    /// The snapshots named by id (full ids), when forgetting by id.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    /// The VMs that lose (or would lose) every snapshot they have.
    pub emptied_vms: Vec<String>,
}

/// Applies the rules (or removes the snapshots named by id): deletes the
/// snapshots no rule keeps. A VM that would lose every snapshot is refused
/// unless [`ForgetOptions::emptying`] allows it.
pub fn forget(repo: &Repository, options: &ForgetOptions) -> Result<ForgetReport> {
    if !options.ids.is_empty() && options.keep.is_some() {
        return Err(Error::InvalidInput(
            "give either snapshot ids or --keep-* rules to forget, not both".to_string(),
        ));
    }
    let stored = match options.keep.is_none() && options.ids.is_empty() {
        true => Some(stored_policy(repo, options.newest_policy_seen)?),
        false => None,
    };
    let keep = options
        .keep
        .clone()
        .or_else(|| stored.as_ref().map(|p| p.keep.clone()))
        .unwrap_or_default();
    let group_by = options
        .group_by
        .or_else(|| stored.as_ref().map(|p| p.group_by))
        .unwrap_or_default();
    let (all, unreadable) = repo.list_snapshots_checked()?;
    let snapshots = of_vm(all, options.vm.as_deref())?;
    let (groups, ids) = match options.ids.is_empty() {
        true => (plan(&snapshots, &keep, group_by)?, Vec::new()),
        false => plan_ids(&snapshots, &options.ids, group_by)?,
    };
    let emptied_vms = emptied_vms(&snapshots, &groups);
    if !options.dry_run {
        refuse_emptying(&emptied_vms, &options.emptying)?;
        delete_removed(repo, &groups)?;
    }
    let removed = removed(&groups).count();
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
        ids,
        emptied_vms,
    })
}

/// The policy stored in the repository, refused when missing or older
/// than the newest revision this client saw.
fn stored_policy(repo: &Repository, newest_seen: u64) -> Result<PolicyFile> {
    let policy = read_policy(repo)?.ok_or_else(|| {
        Error::InvalidInput(
            "no keep rule given and no policy stored in the repository; give rules such as --keep-daily 7, or store them with `vbackup policy set`".to_string(),
        )
    })?;
    refuse_old_policy(&policy, newest_seen)?;
    Ok(policy)
}

/// The snapshots of `vm` (all when `None`); a VM with none is refused,
/// naming the VMs there are (a mistyped name must not look like success).
fn of_vm(snapshots: Vec<Snapshot>, vm: Option<&str>) -> Result<Vec<Snapshot>> {
    let Some(vm) = vm else {
        return Ok(snapshots);
    };
    let mut names: Vec<&str> = snapshots.iter().map(|s| s.manifest.vm.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    if !names.contains(&vm) {
        return Err(Error::InvalidInput(format!(
            "the repository holds no snapshot of VM '{vm}'; its VMs: {}",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    }
    Ok(snapshots
        .into_iter()
        .filter(|s| s.manifest.vm == vm)
        .collect())
}

fn removed(groups: &[ForgetGroup]) -> impl Iterator<Item = &Decision> {
    groups.iter().flat_map(|g| &g.decisions).filter(|d| !d.keep)
}

/// Deletes the manifests (and damage markers and boot reports) of the
/// removed snapshots.
fn delete_removed(repo: &Repository, groups: &[ForgetGroup]) -> Result<()> {
    for decision in removed(groups) {
        repo.backend()
            .delete(&format!("{SNAPSHOTS_PREFIX}{}", decision.snapshot))?;
        repo.backend()
            .delete(&format!("{DAMAGED_PREFIX}{}", decision.snapshot))?;
        crate::boot_report::delete_boot_reports(repo, &decision.snapshot)?;
    }
    Ok(())
}

/// The VMs whose every snapshot the plan removes, sorted.
pub fn emptied_vms(snapshots: &[Snapshot], groups: &[ForgetGroup]) -> Vec<String> {
    let gone: std::collections::BTreeSet<&str> =
        removed(groups).map(|d| d.snapshot.as_str()).collect();
    let mut left: BTreeMap<&str, usize> = BTreeMap::new();
    for s in snapshots {
        let count = left.entry(s.manifest.vm.as_str()).or_default();
        if !gone.contains(s.id.as_str()) {
            *count += 1;
        }
    }
    left.into_iter()
        .filter(|(_, n)| *n == 0)
        .map(|(vm, _)| vm.to_string())
        .collect()
}

/// Refuses a forget that removes every snapshot of a VM it may not empty.
fn refuse_emptying(emptied: &[String], emptying: &Emptying) -> Result<()> {
    let refused: Vec<&str> = emptied
        .iter()
        .filter(|vm| !emptying.allows(vm))
        .map(String::as_str)
        .collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(Error::InvalidInput(format!(
        "this forget would remove every snapshot of VM(s) {}; nothing was removed. Check the rules with --dry-run (a --keep-tag that matches no snapshot keeps nothing), or confirm with --yes",
        quoted(&refused)
    )))
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The plan that removes exactly the snapshots `ids` name (full ids or
/// unique prefixes), grouped as [`plan`] groups, with only the groups
/// they touch; and their full ids. Unknown and ambiguous ids are refused
/// together, each named.
pub fn plan_ids(
    snapshots: &[Snapshot],
    ids: &[String],
    group_by: GroupBy,
) -> Result<(Vec<ForgetGroup>, Vec<String>)> {
    let mut named = Vec::new();
    let mut problems = Vec::new();
    for id in ids {
        match resolve(snapshots, id) {
            Ok(full) => named.push(full),
            Err(problem) => problems.push(problem),
        }
    }
    if !problems.is_empty() {
        return Err(Error::SnapshotSelection(format!(
            "{}; nothing was removed",
            problems.join("; ")
        )));
    }
    named.sort();
    named.dedup();
    let mut groups: BTreeMap<String, Vec<&Snapshot>> = BTreeMap::new();
    for snapshot in snapshots {
        groups
            .entry(group_key(snapshot, group_by))
            .or_default()
            .push(snapshot);
    }
    let groups = groups
        .into_iter()
        .filter(|(_, members)| members.iter().any(|s| named.contains(&s.id)))
        .map(|(group, members)| ForgetGroup {
            group,
            decisions: decide_named(members, &named),
        })
        .collect();
    Ok((groups, named))
}

/// The one snapshot whose id starts with `id`, or why there is none.
fn resolve(snapshots: &[Snapshot], id: &str) -> std::result::Result<String, String> {
    let matching: Vec<&Snapshot> = snapshots.iter().filter(|s| s.id.starts_with(id)).collect();
    match matching.as_slice() {
        [one] if !id.is_empty() => Ok(one.id.clone()),
        [] => Err(format!("no snapshot has an id starting with '{id}'")),
        _ => Err(format!(
            "'{id}' matches {} snapshots; give more digits",
            matching.len()
        )),
    }
}

/// Decisions for a group when forgetting by id: the named ones go.
fn decide_named(mut members: Vec<&Snapshot>, named: &[String]) -> Vec<Decision> {
    members.sort_by(|a, b| b.time().cmp(&a.time()).then_with(|| b.id.cmp(&a.id)));
    members
        .into_iter()
        .map(|snapshot| {
            let gone = named.contains(&snapshot.id);
            decision(Member {
                snapshot,
                time: snapshot.time(),
                reasons: match gone {
                    true => Vec::new(),
                    false => vec!["not named".to_string()],
                },
            })
        })
        .collect()
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
