//! Longest-prefix price tables over E.164 digits.
//!
//! Owns the data structure only: digits in, price out. It never parses
//! numbers (see `Tariff::normalise`) nor files (see `Tariff::from_yaml`).
//!
//! Built in two steps. [`PrefixTableBuilder`] is a plain digit trie with
//! `[u32; 10]` child indices per node (44 bytes a node), cheap to insert
//! into. [`PrefixTableBuilder::build`] freezes it breadth-first into a
//! [`PrefixTable`] whose nodes keep their children contiguous, addressed by
//! a 10-bit child mask and the index of the first child (16 bytes a node):
//! a 200 000-prefix table of realistic 4–9 digit prefixes is a few MB, and a
//! lookup walks one node per digit, O(length of the number), no allocation.

/// Marks a trie node that is a path to longer prefixes but has no price.
const NO_PRICE: i64 = i64::MIN;

/// Longest prefix accepted: an E.164 number has at most 15 digits.
pub const PREFIX_DIGITS_MAX: usize = 15;

/// Why a prefix cannot go into a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixError {
    /// Empty, longer than 15 digits, or not digits only.
    NotDigits,
    /// Already in the table, with this price.
    Duplicate { previous_milli: i64 },
}

/// Mutable digit trie; see the module comment.
#[derive(Debug, Clone)]
pub struct PrefixTableBuilder {
    /// `children[n][d]`: index of node n's child for digit d; 0 = none
    /// (the root, index 0, is nobody's child).
    children: Vec<[u32; 10]>,
    /// Price per part of the prefix ending at node n, or `NO_PRICE`.
    prices: Vec<i64>,
    len: usize,
}

impl Default for PrefixTableBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PrefixTableBuilder {
    pub fn new() -> Self {
        PrefixTableBuilder {
            children: vec![[0; 10]],
            prices: vec![NO_PRICE],
            len: 0,
        }
    }

    /// Inserts `prefix` (1 to 15 ASCII digits) at `price_milli` (must not be
    /// `i64::MIN`; tariffs only insert non-negative prices).
    pub fn insert(&mut self, prefix: &str, price_milli: i64) -> Result<(), PrefixError> {
        debug_assert!(price_milli != NO_PRICE);
        if !is_prefix(prefix) {
            return Err(PrefixError::NotDigits);
        }
        let mut node = 0usize;
        for b in prefix.bytes() {
            let d = (b - b'0') as usize;
            let next = self.children[node][d];
            node = if next == 0 {
                let id = self.children.len();
                self.children.push([0; 10]);
                self.prices.push(NO_PRICE);
                self.children[node][d] = id as u32;
                id
            } else {
                next as usize
            };
        }
        if self.prices[node] != NO_PRICE {
            return Err(PrefixError::Duplicate {
                previous_milli: self.prices[node],
            });
        }
        self.prices[node] = price_milli;
        self.len += 1;
        Ok(())
    }

    /// Freezes the trie into its compact, read-only form.
    pub fn build(self) -> PrefixTable {
        let mut nodes = Vec::with_capacity(self.children.len());
        // Breadth-first: when node n is emitted, its children are appended
        // consecutively in digit order, so they end up contiguous.
        let mut order: Vec<u32> = Vec::with_capacity(self.children.len());
        order.push(0);
        let mut next_free: u32 = 1;
        let mut i = 0;
        while i < order.len() {
            let old = order[i] as usize;
            let mut mask = 0u16;
            let first_child = next_free;
            for (d, &child) in self.children[old].iter().enumerate() {
                if child != 0 {
                    mask |= 1 << d;
                    order.push(child);
                    next_free += 1;
                }
            }
            nodes.push(Node {
                first_child,
                child_mask: mask,
                price_milli: self.prices[old],
            });
            i += 1;
        }
        PrefixTable {
            nodes,
            len: self.len,
        }
    }
}

/// True for 1 to 15 ASCII digits.
pub fn is_prefix(s: &str) -> bool {
    !s.is_empty() && s.len() <= PREFIX_DIGITS_MAX && s.bytes().all(|b| b.is_ascii_digit())
}

#[derive(Debug, Clone, Copy)]
struct Node {
    /// Index of the child for the lowest set digit of `child_mask`; the
    /// others follow in digit order.
    first_child: u32,
    /// Bit d set = there is a child for digit d.
    child_mask: u16,
    price_milli: i64,
}

/// A read-only longest-prefix table; see the module comment.
#[derive(Clone)]
pub struct PrefixTable {
    nodes: Vec<Node>,
    len: usize,
}

/// The longest prefix of a number that has a price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Length in digits of the matched prefix (the number's first
    /// `prefix_len` bytes).
    pub prefix_len: usize,
    pub price_per_part_milli: i64,
}

/// A summary: the nodes of a 200 000-prefix table are not worth printing.
impl std::fmt::Debug for PrefixTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixTable")
            .field("prefixes", &self.len)
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

impl Default for PrefixTable {
    fn default() -> Self {
        PrefixTableBuilder::new().build()
    }
}

impl PrefixTable {
    /// The longest priced prefix of `digits`. Stops at the first non-digit.
    #[inline]
    pub fn lookup(&self, digits: &str) -> Option<PrefixMatch> {
        let mut best = None;
        let mut node = &self.nodes[0];
        for (i, b) in digits.bytes().enumerate() {
            let d = b.wrapping_sub(b'0');
            if d > 9 || node.child_mask & (1 << d) == 0 {
                break;
            }
            let below = node.child_mask & ((1u16 << d) - 1);
            node = &self.nodes[node.first_child as usize + below.count_ones() as usize];
            if node.price_milli != NO_PRICE {
                best = Some(PrefixMatch {
                    prefix_len: i + 1,
                    price_per_part_milli: node.price_milli,
                });
            }
        }
        best
    }

    /// Number of priced prefixes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes held by the table, for metrics and the benchmark.
    pub fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn table(entries: &[(&str, i64)]) -> PrefixTable {
        let mut b = PrefixTableBuilder::new();
        for &(p, price) in entries {
            b.insert(p, price).unwrap();
        }
        b.build()
    }

    fn price(t: &PrefixTable, n: &str) -> Option<(usize, i64)> {
        t.lookup(n).map(|m| (m.prefix_len, m.price_per_part_milli))
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(&[
            ("36", 1000),
            ("3620", 800),
            ("362012", 700),
            ("44", 2500),
            ("1", 3000),
        ]);
        assert_eq!(t.len(), 5);
        assert_eq!(price(&t, "36201234567"), Some((6, 700)));
        assert_eq!(price(&t, "36209999999"), Some((4, 800)));
        assert_eq!(price(&t, "36301234567"), Some((2, 1000)));
        assert_eq!(price(&t, "3620"), Some((4, 800)));
        assert_eq!(price(&t, "362"), Some((2, 1000)));
        assert_eq!(price(&t, "3"), None);
        assert_eq!(price(&t, "447700900123"), Some((2, 2500)));
        assert_eq!(price(&t, "12025550123"), Some((1, 3000)));
        assert_eq!(price(&t, "49301234567"), None);
        assert_eq!(price(&t, ""), None);
        // Stops at a non-digit.
        assert_eq!(price(&t, "36x20"), Some((2, 1000)));
    }

    #[test]
    fn zero_price_is_a_price() {
        let t = table(&[("800", 0)]);
        assert_eq!(price(&t, "8001"), Some((3, 0)));
    }

    #[test]
    fn rejects_bad_and_duplicate_prefixes() {
        let mut b = PrefixTableBuilder::new();
        assert_eq!(b.insert("", 1), Err(PrefixError::NotDigits));
        assert_eq!(b.insert("36x", 1), Err(PrefixError::NotDigits));
        assert_eq!(b.insert("+36", 1), Err(PrefixError::NotDigits));
        assert_eq!(b.insert("1234567890123456", 1), Err(PrefixError::NotDigits));
        assert_eq!(b.insert("123456789012345", 1), Ok(()));
        assert_eq!(b.insert("36", 5), Ok(()));
        assert_eq!(
            b.insert("36", 6),
            Err(PrefixError::Duplicate { previous_milli: 5 })
        );
        let t = b.build();
        assert_eq!(t.len(), 2);
        assert_eq!(price(&t, "3612"), Some((2, 5)));
    }

    #[test]
    fn empty_table_matches_nothing() {
        let t = PrefixTable::default();
        assert!(t.is_empty());
        assert_eq!(t.lookup("36201234567"), None);
    }

    proptest! {
        #[test]
        fn matches_brute_force(
            entries in prop::collection::hash_map("[0-9]{1,6}", 0i64..100_000, 0..200),
            numbers in prop::collection::vec("[0-9]{0,15}", 1..50),
        ) {
            let mut b = PrefixTableBuilder::new();
            for (p, v) in &entries {
                b.insert(p, *v).unwrap();
            }
            let t = b.build();
            prop_assert_eq!(t.len(), entries.len());
            let by_prefix: HashMap<&str, i64> = entries.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            for n in &numbers {
                let expected = (1..=n.len()).rev().find_map(|l| by_prefix.get(&n[..l]).map(|v| (l, *v)));
                prop_assert_eq!(price(&t, n), expected);
            }
        }
    }
}
