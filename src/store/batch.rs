//! What one batch does to the stored state, folded in memory before a
//! commit writes it: per-account balance deltas and the net effect on open
//! reservations. Shared by every [`Store`](super::Store) backend so that
//! SQLite and PostgreSQL materialise exactly the same sums.
//!
//! Pure computation: no I/O, no SQL.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;

use super::AccountMeta;
use crate::ledger::{Bucket, Entry, EntryKind};

/// A reservation whose `reserve` entries are in the batch.
#[derive(Debug)]
pub struct Opened<'a> {
    pub id: u64,
    /// Its first reserve entry (account, reference, tariff, time).
    pub entry: &'a Entry,
    pub anytime_milli: i64,
    pub offpeak_milli: i64,
}

/// One account's deltas, by the ledger's sign convention.
#[derive(Debug)]
pub struct Delta<'a> {
    pub account: &'a str,
    /// The account's identity (a placeholder when the batch's directory
    /// did not describe it), for the row created on its first commit.
    pub meta: AccountMeta,
    pub anytime_posted_milli: i64,
    pub anytime_reserved_milli: i64,
    pub offpeak_posted_milli: i64,
    pub offpeak_reserved_milli: i64,
}

/// The batch folded: what the commit adds, opens and deletes. Accounts and
/// reservations come sorted (by name, by id), so commits touch rows in one
/// order.
#[derive(Debug)]
pub struct Folded<'a> {
    pub deltas: Vec<Delta<'a>>,
    /// Reservations opened in the batch and not resolved in it (one opened
    /// and resolved in the same batch never touches the table).
    pub opened: Vec<Opened<'a>>,
    /// Reservations opened before the batch and resolved in it.
    pub resolved: Vec<u64>,
}

impl<'a> Folded<'a> {
    pub fn of(entries: &'a [Entry], accounts: &[AccountMeta]) -> Folded<'a> {
        let mut deltas: HashMap<&str, [i64; 4]> = HashMap::new();
        let mut opened: HashMap<u64, Opened<'a>> = HashMap::new();
        let mut resolved: Vec<u64> = Vec::new();
        for e in entries {
            let d = deltas.entry(e.account.as_str()).or_insert([0; 4]);
            let (p, r) = match e.bucket {
                Bucket::Anytime => (0, 1),
                Bucket::OffPeak => (2, 3),
            };
            d[p] = d[p].wrapping_add(e.posted_delta_milli());
            d[r] = d[r].wrapping_add(e.reserved_delta_milli());
            let Some(id) = e.reservation_id else { continue };
            if e.kind == EntryKind::Reserve {
                let o = opened.entry(id).or_insert_with(|| Opened {
                    id,
                    entry: e,
                    anytime_milli: 0,
                    offpeak_milli: 0,
                });
                match e.bucket {
                    Bucket::Anytime => {
                        o.anytime_milli = o.anytime_milli.wrapping_add(e.amount_milli)
                    }
                    Bucket::OffPeak => {
                        o.offpeak_milli = o.offpeak_milli.wrapping_add(e.amount_milli)
                    }
                }
            } else if let MapEntry::Occupied(o) = opened.entry(id) {
                o.remove();
            } else {
                resolved.push(id);
            }
        }
        let meta: HashMap<&str, &AccountMeta> =
            accounts.iter().map(|m| (m.name.as_str(), m)).collect();
        let mut deltas: Vec<Delta<'a>> = deltas
            .into_iter()
            .map(|(account, d)| Delta {
                account,
                meta: meta
                    .get(account)
                    .map_or_else(|| AccountMeta::unknown(account), |m| (*m).clone()),
                anytime_posted_milli: d[0],
                anytime_reserved_milli: d[1],
                offpeak_posted_milli: d[2],
                offpeak_reserved_milli: d[3],
            })
            .collect();
        deltas.sort_unstable_by(|a, b| a.account.cmp(b.account));
        let mut opened: Vec<Opened<'a>> = opened.into_values().collect();
        opened.sort_unstable_by_key(|o| o.id);
        resolved.sort_unstable();
        resolved.dedup();
        Folded {
            deltas,
            opened,
            resolved,
        }
    }
}

/// What a cluster node's batch moves between its grants and `reserved`,
/// per (account, bucket): a `reserve` takes its amount out of the grant,
/// a `void`/`expire` puts it back, and so does a `refund` (a delivery
/// report gives a posted share back: on the node it is free to spend
/// again, so in the database it lands in the node's grant, not in what
/// any node may take). `post` moves `posted` and `reserved` only; a node
/// journals no credit action through its ledger (they go straight to the
/// database, `cluster::sql::credit`). Sorted, zero moves left out. See
/// `crate::cluster`.
pub fn grant_moves(entries: &[Entry]) -> Vec<(&str, Bucket, i64)> {
    let mut moves: HashMap<(&str, Bucket), i64> = HashMap::new();
    for e in entries {
        let delta = match e.kind {
            EntryKind::Reserve | EntryKind::Void | EntryKind::Expire => {
                e.amount_milli.wrapping_neg()
            }
            EntryKind::Refund => e.amount_milli,
            _ => continue,
        };
        let m = moves.entry((e.account.as_str(), e.bucket)).or_insert(0);
        *m = m.wrapping_add(delta);
    }
    let mut moves: Vec<(&str, Bucket, i64)> = moves
        .into_iter()
        .filter(|(_, m)| *m != 0)
        .map(|((a, b), m)| (a, b, m))
        .collect();
    moves.sort_unstable_by(|x, y| (x.0, x.1.as_str()).cmp(&(y.0, y.1.as_str())));
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Role;

    #[test]
    fn a_batch_folds_into_deltas_and_reservation_changes() {
        use EntryKind::*;
        let entries = vec![
            Entry::for_test(2, Add, "b", 5_000, None),
            Entry::for_test(1, Add, "a", 10_000, None),
            Entry::for_test(3, Reserve, "a", 3_000, Some(3)),
            Entry {
                bucket: Bucket::OffPeak,
                ..Entry::for_test(4, Reserve, "a", 1_000, Some(3))
            },
            Entry::for_test(5, Reserve, "b", 1_000, Some(5)),
            Entry::for_test(6, Void, "b", -1_000, Some(5)),
            Entry::for_test(7, Post, "b", -500, Some(1)),
        ];
        let metas = [AccountMeta {
            name: "a".into(),
            parent: None,
            role: Role::Admin,
            tariff_class: None,
        }];
        let f = Folded::of(&entries, &metas);
        let names: Vec<&str> = f.deltas.iter().map(|d| d.account).collect();
        assert_eq!(names, ["a", "b"]);
        let a = &f.deltas[0];
        assert_eq!(a.meta.role, Role::Admin);
        assert_eq!(
            (a.anytime_posted_milli, a.anytime_reserved_milli),
            (10_000, 3_000)
        );
        assert_eq!(a.offpeak_reserved_milli, 1_000);
        // b is unknown to the directory: a placeholder identity.
        assert_eq!(f.deltas[1].meta, AccountMeta::unknown("b"));
        assert_eq!(f.opened.len(), 1, "5 opened and resolved in the batch");
        let o = &f.opened[0];
        assert_eq!((o.id, o.anytime_milli, o.offpeak_milli), (3, 3_000, 1_000));
        assert_eq!(o.entry.seq, 3);
        assert_eq!(f.resolved, vec![1]);
    }

    #[test]
    fn reserves_leave_the_grant_and_voids_come_back() {
        use EntryKind::*;
        let entries = vec![
            Entry::for_test(1, Reserve, "a", 3_000, Some(1)),
            Entry::for_test(2, Post, "a", -2_000, Some(1)),
            Entry::for_test(3, Void, "a", -1_000, Some(1)),
            Entry {
                bucket: Bucket::OffPeak,
                ..Entry::for_test(4, Reserve, "a", 500, Some(4))
            },
            Entry::for_test(5, Add, "b", 9_000, None),
            Entry::for_test(6, Reserve, "b", 700, Some(6)),
            Entry::for_test(7, Expire, "b", -700, Some(6)),
            Entry::for_test(8, Reserve, "c", 100, Some(8)),
            // A delivery report refunds a posted share: back into the grant.
            Entry::for_test(9, Refund, "d", 400, Some(1)),
        ];
        assert_eq!(
            grant_moves(&entries),
            vec![
                ("a", Bucket::Anytime, -2_000),
                ("a", Bucket::OffPeak, -500),
                ("c", Bucket::Anytime, -100),
                ("d", Bucket::Anytime, 400)
            ]
        );
    }
}
