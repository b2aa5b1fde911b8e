//! Orphans: copies on the nodes that this operator manages and whose owner no longer exists.
//! A Workload deleted while one of its nodes was down (past the grace, so the deletion did not
//! wait for it) leaves a copy there; when the node answers again, the copy is found here and
//! removed, instead of running forever.
//!
//! The manager of a copy is `<prefix><owner>` (for Kubernetes, `kubernetes:<cluster>/<uid>`):
//! a copy is an orphan when its manager has this operator's prefix and its owner is not among
//! the owners that exist now. Copies of other managers (hand-applied, another cluster, a Git
//! source) are never touched. The caller passes the owners only once it has listed them all
//! (an empty list read too early would make every copy look orphaned).

use std::collections::HashSet;

/// A copy a node reported.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Held {
    pub node: String,
    pub key: String,
    pub manager: String,
}

/// The copies among `held` that belong to an owner of ours that no longer exists.
pub fn orphans<'a>(
    held: impl IntoIterator<Item = &'a Held>,
    prefix: &str,
    owners: &HashSet<String>,
) -> Vec<&'a Held> {
    held.into_iter()
        .filter(|h| {
            h.manager
                .strip_prefix(prefix)
                .is_some_and(|owner| !owner.is_empty() && !owners.contains(owner))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(node: &str, key: &str, manager: &str) -> Held {
        Held {
            node: node.into(),
            key: key.into(),
            manager: manager.into(),
        }
    }

    #[test]
    fn only_our_copies_of_owners_that_are_gone_are_orphans() {
        let p = "kubernetes:prod/";
        let all = [
            held("n1", "default/web", "kubernetes:prod/uid-live"),
            held("n2", "default/web", "kubernetes:prod/uid-gone"),
            held("n2", "default/db", "kubernetes:staging/uid-gone"),
            held("n2", "default/git", "git:https://example.com/repo#apps"),
            held("n3", "default/odd", "kubernetes:prod/"),
        ];
        let owners: HashSet<String> = ["uid-live".to_string()].into();
        let found = orphans(&all, p, &owners);
        assert_eq!(found, vec![&all[1]]);
        // With every owner gone, still only ours.
        let found = orphans(&all, p, &HashSet::new());
        assert_eq!(found, vec![&all[0], &all[1]]);
    }
}
