//! `forget` by id, per VM, and never emptying a VM unless allowed (issue
//! 11), over the in-memory backend.

// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use common::{backup, disk_data, new_repo};
use vbackup_core::format::lifecycle::KeepRules;
use vbackup_core::{forget, Emptying, Error, ErrorClass, ForgetOptions, Repository, Snapshot};

/// Two snapshots of VM a and one of VM b, oldest first.
fn history(repo: &Repository) -> Vec<Snapshot> {
    vec![
        backup(repo, "a", &disk_data(2, 1)),
        backup(repo, "a", &disk_data(2, 2)),
        backup(repo, "b", &disk_data(2, 3)),
    ]
}

fn ids(repo: &Repository) -> Vec<String> {
    repo.list_snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect()
}

fn keep_tag(tag: &str, emptying: Emptying) -> ForgetOptions {
    ForgetOptions {
        keep: Some(KeepRules {
            tags: vec![tag.to_string()],
            ..KeepRules::default()
        }),
        emptying,
        ..ForgetOptions::default()
    }
}

#[test]
fn keep_tag_typo_that_matches_nothing_removes_nothing_and_names_every_vm() {
    let (_, repo) = new_repo();
    history(&repo);
    let err = forget(&repo, &keep_tag("typo", Emptying::Refuse)).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Usage, "{err}");
    assert!(
        err.to_string().contains("every snapshot of VM(s) 'a', 'b'"),
        "{err}"
    );
    assert_eq!(ids(&repo).len(), 3);
    // Confirming one VM is not enough: the other is named.
    let err = forget(&repo, &keep_tag("typo", Emptying::Only(vec!["a".into()]))).unwrap_err();
    assert!(err.to_string().contains("VM(s) 'b';"), "{err}");
    assert_eq!(ids(&repo).len(), 3);
    let report = forget(&repo, &keep_tag("typo", Emptying::Allow)).unwrap();
    assert_eq!((report.removed, report.emptied_vms.len()), (3, 2));
    assert!(ids(&repo).is_empty());
}

#[test]
fn a_dry_run_reports_the_vms_it_would_empty() {
    let (_, repo) = new_repo();
    history(&repo);
    let options = ForgetOptions {
        dry_run: true,
        ..keep_tag("typo", Emptying::Refuse)
    };
    let report = forget(&repo, &options).unwrap();
    assert_eq!(report.emptied_vms, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(ids(&repo).len(), 3);
}

#[test]
fn forget_by_id_removes_exactly_the_named_snapshots() {
    let (_, repo) = new_repo();
    let snapshots = history(&repo);
    let options = ForgetOptions {
        ids: vec![snapshots[0].id[..8].to_string(), snapshots[0].id.clone()],
        ..ForgetOptions::default()
    };
    let report = forget(&repo, &options).unwrap();
    assert_eq!(report.ids, vec![snapshots[0].id.clone()]);
    assert_eq!((report.removed, report.kept), (1, 2));
    // Only the group the id touches is in the plan.
    assert_eq!(report.groups.len(), 1, "{:?}", report.groups);
    assert_eq!(report.groups[0].group, "vm=a");
    assert_eq!(
        ids(&repo),
        vec![snapshots[1].id.clone(), snapshots[2].id.clone()]
    );
}

#[test]
fn forget_by_id_refuses_unknown_ids_and_ids_with_rules() {
    let (_, repo) = new_repo();
    let snapshots = history(&repo);
    let options = ForgetOptions {
        ids: vec!["nothere".into(), snapshots[0].id.clone()],
        ..ForgetOptions::default()
    };
    let err = forget(&repo, &options).unwrap_err();
    assert!(matches!(err, Error::SnapshotSelection(_)), "{err}");
    assert!(err.to_string().contains("'nothere'"), "{err}");
    assert_eq!(ids(&repo).len(), 3);
    let both = ForgetOptions {
        ids: vec![snapshots[0].id.clone()],
        ..keep_tag("x", Emptying::Allow)
    };
    assert!(forget(&repo, &both)
        .unwrap_err()
        .to_string()
        .contains("not both"));
}

#[test]
fn forget_by_id_of_a_vms_only_snapshot_needs_consent() {
    let (_, repo) = new_repo();
    let snapshots = history(&repo);
    let mut options = ForgetOptions {
        ids: vec![snapshots[2].id.clone()],
        ..ForgetOptions::default()
    };
    let err = forget(&repo, &options).unwrap_err();
    assert!(err.to_string().contains("VM(s) 'b'"), "{err}");
    options.emptying = Emptying::Only(vec!["b".into()]);
    assert_eq!(forget(&repo, &options).unwrap().emptied_vms, vec!["b"]);
    assert_eq!(ids(&repo).len(), 2);
}

#[test]
fn vm_limits_the_rules_to_that_vms_snapshots() {
    let (_, repo) = new_repo();
    let snapshots = history(&repo);
    let options = ForgetOptions {
        keep: Some(KeepRules {
            last: Some(1),
            ..KeepRules::default()
        }),
        vm: Some("a".into()),
        ..ForgetOptions::default()
    };
    let report = forget(&repo, &options).unwrap();
    assert_eq!((report.removed, report.kept), (1, 1));
    assert_eq!(
        ids(&repo),
        vec![snapshots[1].id.clone(), snapshots[2].id.clone()]
    );
    let typo = ForgetOptions {
        vm: Some("c".into()),
        ..options
    };
    let err = forget(&repo, &typo).unwrap_err();
    assert!(
        err.to_string()
            .contains("no snapshot of VM 'c'; its VMs: a, b"),
        "{err}"
    );
}
