//! The repository's lifecycle commands: check (and verify, its alias with
//! --read-data), forget, prune, repair, policy, locks and unlock. Each runs
//! one core operation and prints text or JSON.

use std::io::IsTerminal;

use anyhow::Result;
use serde::Serialize;
use vbackup_core::{
    CheckOptions, CheckReport, Emptying, ForgetOptions, ForgetReport, LockInfo, PruneOptions,
    PruneReport, ReadData, RepairOptions, RepairReport, Repository,
};

use crate::args::{
    CheckArgs, ForgetArgs, GcArgs, PolicyCommand, PruneArgs, RepairArgs, UnlockArgs,
};
use crate::commands::Context;
use crate::ui::{human_bytes, human_rate, with_progress, with_progress_items};
use crate::{ExitError, EXIT_DAMAGE, EXIT_FAILURE};

/// `vbackup check`.
pub fn check(ctx: &Context, args: &CheckArgs) -> Result<()> {
    run_check(ctx, args.read_data(), args.stale_after)
}

/// `vbackup verify`: `check --read-data`.
pub fn verify(ctx: &Context) -> Result<()> {
    run_check(ctx, ReadData::All, None)
}

fn run_check(
    ctx: &Context,
    read_data: ReadData,
    stale_after: Option<std::time::Duration>,
) -> Result<()> {
    // What the storage holds, not local copies of it.
    let repo = ctx.open_uncached()?;
    let options = CheckOptions {
        read_data,
        threads: ctx.io_threads(&repo),
        stale_after,
    };
    let started = std::time::Instant::now();
    let mut report = with_progress(
        "check",
        ctx.global.quiet || ctx.global.json,
        &ctx.signal,
        |progress| vbackup_core::check(&repo, &options, progress),
    )?;
    let state = ctx.client_state(&repo)?;
    report.rollback = vbackup_core::client_state::rollback_findings(&repo, &state)?;
    if !ctx.json(&report)? {
        print_check(ctx, &report, started.elapsed().as_secs_f64());
    }
    if !report.is_clean() {
        return Err(ExitError {
            code: EXIT_DAMAGE,
            message: format!(
                "check found {} damaged or missing object(s) affecting {} disk(s) of {} snapshot(s); `vbackup repair` marks them, the next backup of each VM heals what its disks still hold",
                report.problems.len(),
                report.affected.len(),
                report.affected_snapshots().len()
            ),
        }
        .into());
    }
    if !report.rollback.is_empty() {
        return Err(ExitError {
            code: EXIT_DAMAGE,
            message: format!(
                "check found {} object(s) that contradict this host's record of the repository (see ROLLBACK above): the storage put back what was removed or replaced",
                report.rollback.len()
            ),
        }
        .into());
    }
    ctx.say("no damage found");
    Ok(())
}

fn print_check(ctx: &Context, report: &CheckReport, seconds: f64) {
    ctx.say(format!(
        "checked {} snapshot(s), {} index(es), {} stored chunk(s)",
        report.snapshots, report.indexes, report.chunks
    ));
    if report.chunks_checked > 0 {
        ctx.say(format!(
            "verified {} chunk(s), {} in {:.1} s ({})",
            report.chunks_checked,
            human_bytes(report.bytes_checked),
            seconds,
            human_rate(report.bytes_checked, seconds)
        ));
    }
    for p in &report.problems {
        println!("DAMAGED {}: {}", p.object, p.problem);
    }
    for a in &report.affected {
        let marked = report.marked_damaged.contains(&a.snapshot);
        println!(
            "AFFECTED snapshot {} (VM '{}', {}) disk '{}': {} bad chunk(s), {} unrestorable{}",
            short(&a.snapshot),
            a.vm,
            a.time,
            a.disk,
            a.bad_chunks,
            human_bytes(a.bad_bytes),
            if marked { " [marked damaged]" } else { "" }
        );
    }
    for n in &report.notices {
        ctx.say(format!("note: {}: {}", n.object, n.note));
    }
    for n in &report.rollback {
        println!("ROLLBACK {}: {}", n.object, n.note);
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

fn prune_options(ctx: &Context, gc: &GcArgs, dry_run: bool) -> PruneOptions {
    PruneOptions {
        grace: gc.grace,
        dry_run,
        threads: ctx.threads(),
        stale_after: gc.stale_after,
    }
}

fn run_prune(ctx: &Context, repo: &Repository, options: &PruneOptions) -> Result<PruneReport> {
    let quiet = ctx.global.quiet || ctx.global.json;
    Ok(with_progress_items(
        "prune",
        quiet,
        &ctx.signal,
        |progress| vbackup_core::prune(repo, options, progress),
    )?)
}

/// `vbackup prune`.
pub fn prune(ctx: &Context, args: &PruneArgs) -> Result<()> {
    let repo = ctx.open()?;
    let started = std::time::Instant::now();
    let report = run_prune(ctx, &repo, &prune_options(ctx, &args.gc, args.dry_run))?;
    if !ctx.json(&report)? {
        print_prune(ctx, &report, started.elapsed().as_secs_f64());
    }
    Ok(())
}

fn print_prune(ctx: &Context, r: &PruneReport, seconds: f64) {
    let would = if r.dry_run { "would " } else { "" };
    ctx.say(format!(
        "prune{}: {} snapshot(s), {} chunk(s) and {} index(es) stored; {} chunk(s) referenced, {} held",
        if r.dry_run { " (dry run)" } else { "" },
        r.snapshots,
        r.chunks,
        r.indexes,
        r.referenced_chunks,
        human_bytes(r.referenced_bytes)
    ));
    if r.trash_restored > 0 {
        ctx.say(format!(
            "  put back {} object(s) an interrupted prune left in trash/",
            r.trash_restored
        ));
    }
    if r.exclusive {
        print_exclusive(ctx, r, would);
        ctx.say(format!("  done in {seconds:.1} s"));
        return;
    }
    ctx.say(format!(
        "  {would}mark {} chunk(s) and {} index(es), {}, as unreferenced{}",
        r.marked_chunks,
        r.marked_indexes,
        human_bytes(r.marked_bytes),
        r.pending_list
            .as_deref()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default()
    ));
    ctx.say(format!(
        "  {would}delete {} chunk(s) and {} index(es) from {} pending list(s): {} {}",
        r.deleted_chunks,
        r.deleted_indexes,
        r.swept_lists.len(),
        human_bytes(r.freed_bytes),
        if r.dry_run { "would be freed" } else { "freed" }
    ));
    if r.kept_referenced + r.kept_rewritten + r.already_gone > 0 {
        ctx.say(format!(
            "  kept {} marked object(s) referenced again and {} written again by backups since marking; {} already gone",
            r.kept_referenced, r.kept_rewritten, r.already_gone
        ));
    }
    if r.waiting_items > 0 {
        ctx.say(format!(
            "  {} marked object(s), {}, wait for a later prune:",
            r.waiting_items,
            human_bytes(r.waiting_bytes)
        ));
    }
    for d in &r.deferred {
        ctx.say(format!("    {}: {}", d.list, d.reason));
    }
    for lock in &r.stale_locks {
        ctx.say(format!("  ignored {lock}"));
    }
    ctx.say(format!("  done in {seconds:.1} s"));
}

/// The rest of a prune's summary when it had the repository to itself
/// (storage without atomic rename).
fn print_exclusive(ctx: &Context, r: &PruneReport, would: &str) {
    ctx.say(format!(
        "  {would}delete {} unreferenced chunk(s) and {} index(es): {} {}",
        r.deleted_chunks,
        r.deleted_indexes,
        human_bytes(r.freed_bytes),
        if r.dry_run { "would be freed" } else { "freed" }
    ));
    if r.packs > 0 || r.pack_indexes_removed > 0 {
        ctx.say(format!(
            "  packs: {} stored; {would}delete {} unused, repack {} into {} new ({}); pack indexes: {} written, {} removed",
            r.packs,
            r.deleted_packs,
            r.repacked_packs,
            r.written_packs,
            human_bytes(r.repacked_bytes),
            r.pack_indexes_written,
            r.pack_indexes_removed
        ));
    }
    for pack in &r.packs_kept_damaged {
        ctx.say(format!(
            "  kept (a referenced chunk in it fails its check; see `vbackup check`): {pack}"
        ));
    }
    ctx.say(format!(
        "  this storage cannot move objects atomically (or the repository keeps chunks in packs), so prune {} the repository to itself: backups that start meanwhile are refused (no grace period applies)",
        if r.dry_run { "would take" } else { "took" }
    ));
    if r.lists_removed > 0 {
        ctx.say(format!(
            "  removed {} pending list(s) and deletion log(s) left by an earlier prune",
            r.lists_removed
        ));
    }
    for lock in &r.stale_locks {
        ctx.say(format!("  ignored {lock}"));
    }
}

#[derive(Serialize)]
struct ForgetOutput {
    forget: ForgetReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    prune: Option<PruneReport>,
}

/// `vbackup forget`.
pub fn forget(ctx: &Context, args: &ForgetArgs) -> Result<()> {
    let repo = ctx.open()?;
    let mut options = ForgetOptions {
        keep: args.keep.rules(),
        group_by: args.keep.group_by,
        dry_run: args.dry_run,
        newest_policy_seen: 0,
        ids: args.ids.clone(),
        vm: args.vm.clone(),
        emptying: match args.yes {
            true => Emptying::Allow,
            false => Emptying::Refuse,
        },
    };
    if !args.dry_run && !args.yes && std::io::stdin().is_terminal() {
        options.emptying = confirm_emptying(ctx, &repo, &options)?;
    }
    let report = vbackup_open::state::forget(&ctx.repository_options()?, &repo, &options)?;
    if !ctx.global.json {
        print_forget(ctx, &report);
    }
    let prune = match args.prune {
        true => Some(run_prune(
            ctx,
            &repo,
            &prune_options(ctx, &args.gc, args.dry_run),
        )?),
        false => None,
    };
    if let (false, Some(prune)) = (ctx.global.json, &prune) {
        print_prune(ctx, prune, 0.0);
    }
    ctx.json(&ForgetOutput {
        forget: report,
        prune,
    })?;
    Ok(())
}

/// On a terminal: plans the forget first and, when it would remove every
/// snapshot of some VMs, shows the plan and asks; the VMs confirmed may be
/// emptied, and a "no" removes nothing.
fn confirm_emptying(ctx: &Context, repo: &Repository, options: &ForgetOptions) -> Result<Emptying> {
    let dry = ForgetOptions {
        dry_run: true,
        ..options.clone()
    };
    let plan = vbackup_open::state::forget(&ctx.repository_options()?, repo, &dry)?;
    if plan.emptied_vms.is_empty() {
        return Ok(Emptying::Refuse);
    }
    eprint!("{}", vbackup_core::render_plan(&plan.groups));
    let names: Vec<String> = plan.emptied_vms.iter().map(|v| format!("'{v}'")).collect();
    eprint!(
        "this removes EVERY snapshot of VM(s) {}. Remove them? [y/N] ",
        names.join(", ")
    );
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        return Ok(Emptying::Only(plan.emptied_vms));
    }
    Err(ExitError {
        code: EXIT_FAILURE,
        message: "not confirmed; nothing was removed".to_string(),
    }
    .into())
}

fn print_forget(ctx: &Context, report: &ForgetReport) {
    let source = if report.from_policy {
        "stored policy"
    } else {
        "rules"
    };
    if report.ids.is_empty() {
        ctx.say(format!(
            "{source}: {} (UTC buckets), grouped by {}",
            report.keep, report.group_by
        ));
    } else {
        let ids: Vec<&str> = report.ids.iter().map(|id| short(id)).collect();
        ctx.say(format!("forgetting snapshot(s) {}", ids.join(", ")));
    }
    if !ctx.global.quiet {
        print!("{}", vbackup_core::render_plan(&report.groups));
    }
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    ctx.say(format!(
        "{verb} {} snapshot(s), kept {}",
        report.removed, report.kept
    ));
    if !report.emptied_vms.is_empty() {
        let names: Vec<String> = report
            .emptied_vms
            .iter()
            .map(|v| format!("'{v}'"))
            .collect();
        ctx.say(format!(
            "  VM(s) {} {} no snapshot left",
            names.join(", "),
            if report.dry_run { "would have" } else { "have" }
        ));
    }
    if report.unreadable > 0 {
        ctx.say(format!(
            "  {} snapshot manifest(s) could not be read and were left alone (see `vbackup check`)",
            report.unreadable
        ));
    }
}

/// `vbackup repair`.
pub fn repair(ctx: &Context, args: &RepairArgs) -> Result<()> {
    let repo = ctx.open_uncached()?;
    let read_data = match (args.no_read_data, args.read_data_subset) {
        (true, _) => ReadData::None,
        (false, Some(subset)) => subset,
        (false, None) => ReadData::All,
    };
    let options = RepairOptions {
        read_data,
        threads: ctx.threads(),
        index: args.index,
        dry_run: args.dry_run,
    };
    let report = with_progress(
        "repair",
        ctx.global.quiet || ctx.global.json,
        &ctx.signal,
        |progress| vbackup_core::repair(&repo, &options, progress),
    )?;
    if !ctx.json(&report)? {
        print_repair(ctx, &report);
    }
    Ok(())
}

fn print_repair(ctx: &Context, r: &RepairReport) {
    let would = if r.dry_run { "would " } else { "" };
    for p in &r.check.problems {
        ctx.say(format!("DAMAGED {}: {}", p.object, p.problem));
    }
    if r.restored_from_trash > 0 {
        ctx.say(format!(
            "{would}put back {} object(s) from trash/",
            r.restored_from_trash
        ));
    }
    for key in &r.restored_indexes {
        ctx.say(format!("put back intact index {key} from quarantine/"));
    }
    for key in &r.quarantined {
        ctx.say(format!("{would}move {key} to quarantine/"));
    }
    for blob in &r.dropped_from_packs {
        ctx.say(format!(
            "{would}take {blob} out of the pack indexes (the next backup stores it again)"
        ));
    }
    for id in &r.marked {
        let disks: Vec<String> = r
            .check
            .affected
            .iter()
            .filter(|a| &a.snapshot == id)
            .map(|a| {
                format!(
                    "disk '{}' of VM '{}': {} bad chunk(s)",
                    a.disk, a.vm, a.bad_chunks
                )
            })
            .collect();
        ctx.say(format!(
            "{would}mark snapshot {} DAMAGED ({})",
            short(id),
            disks.join("; ")
        ));
    }
    for id in &r.still_marked {
        ctx.say(format!("snapshot {} stays marked DAMAGED", short(id)));
    }
    for id in &r.cleared {
        ctx.say(format!(
            "{would}clear the damage marker of snapshot {} (whole again, or gone)",
            short(id)
        ));
    }
    if r.leftovers_removed > 0 {
        ctx.say(format!(
            "{would}remove {} old temporary file(s)",
            r.leftovers_removed
        ));
    }
    for note in &r.index_notes {
        ctx.say(format!("note: {}: {}", note.object, note.note));
    }
    if r.check.is_clean() {
        ctx.say("no damage found");
    } else {
        ctx.say("damaged snapshots are kept: back up the affected VMs again while their disks hold the data — that stores the missing chunks and heals every snapshot that needs them; then run `vbackup repair` again to clear the markers");
    }
}

/// `vbackup policy ...`.
pub fn policy(ctx: &Context, command: &PolicyCommand) -> Result<()> {
    let repo = ctx.open()?;
    match command {
        PolicyCommand::Show => match vbackup_core::read_policy(&repo)? {
            Some(policy) => {
                note_policy(ctx, &repo, &policy)?;
                if ctx.text_wanted(&policy)? {
                    println!("keep      {}", policy.keep);
                    println!("group by  {}", policy.group_by);
                    println!("set       {} on host '{}'", policy.updated, policy.host);
                    println!("revision  {}", policy.revision);
                }
            }
            None => {
                if !ctx.json(&serde_json::Value::Null)? {
                    println!(
                        "no policy stored; `vbackup policy set --keep-daily 7 ...` stores one"
                    );
                }
            }
        },
        PolicyCommand::Set(keep) => {
            let rules = keep.rules().unwrap_or_default();
            let group_by = keep.group_by.unwrap_or_default();
            let policy = vbackup_open::state::set_policy(
                &ctx.repository_options()?,
                &repo,
                rules,
                group_by,
            )?;
            if !ctx.json(&policy)? {
                ctx.say(format!(
                    "stored policy: {}, grouped by {}",
                    policy.keep, policy.group_by
                ));
            }
        }
        PolicyCommand::Clear => {
            let existed = vbackup_core::clear_policy(&repo)?;
            if !ctx.json(&serde_json::json!({ "cleared": existed }))? {
                ctx.say(if existed {
                    "policy removed"
                } else {
                    "no policy was stored"
                });
            }
        }
    }
    Ok(())
}

/// Warns when the stored policy is older than the newest this host saw (a
/// rollback), else records it as seen.
fn note_policy(
    ctx: &Context,
    repo: &Repository,
    policy: &vbackup_core::format::lifecycle::PolicyFile,
) -> Result<()> {
    if let Some(warning) =
        vbackup_open::state::note_policy(&ctx.repository_options()?, repo, policy)?
    {
        eprintln!("vbackup: warning: {warning}");
    }
    Ok(())
}

/// `vbackup locks`.
pub fn locks(ctx: &Context) -> Result<()> {
    let repo = ctx.open()?;
    let locks = vbackup_core::list_locks(&repo, None)?;
    if !ctx.text_wanted(&locks)? {
        return Ok(());
    }
    println!(
        "{:<8}  {:<15}  {:<16}  {:>8}  {:<24}  {:>7}  STATUS",
        "ID", "KIND", "HOST", "PID", "STARTED", "AGE"
    );
    for lock in &locks {
        print_lock(lock);
    }
    println!("{} lock(s)", locks.len());
    Ok(())
}

fn print_lock(lock: &LockInfo) {
    let status = match &lock.stale {
        Some(reason) => format!("STALE: {reason}"),
        None => "live".to_string(),
    };
    match &lock.lock {
        Some(l) => println!(
            "{:<8}  {:<15}  {:<16}  {:>8}  {:<24}  {:>6}s  {status}",
            short(&lock.id),
            l.kind.to_string(),
            l.host,
            l.pid,
            l.started,
            lock.age_secs
        ),
        None => println!(
            "{:<8}  unreadable: {}  {status}",
            short(&lock.id),
            lock.problem.as_deref().unwrap_or("")
        ),
    }
}

/// `vbackup unlock`.
pub fn unlock(ctx: &Context, args: &UnlockArgs) -> Result<()> {
    let repo = ctx.open()?;
    let removed = vbackup_core::unlock(&repo, &args.ids, args.stale_only || args.ids.is_empty())?;
    if !ctx.json(&removed)? {
        for lock in &removed {
            ctx.say(format!("removed {}", lock.describe()));
        }
        ctx.say(format!("{} lock(s) removed", removed.len()));
    }
    Ok(())
}
