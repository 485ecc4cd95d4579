//! The hash maps of the paths every batch takes (`send`'s lookups, plans
//! and counts; the ledger's balances and account index).
//!
//! std's SipHash cost about a tenth of a batch's CPU in the `send`
//! benchmark (docs/benchmarks.md, issue 17). foldhash is several times
//! faster on short keys. Its state is seeded at random per process and per
//! map, so keys chosen by a meter or a customer cannot be aimed at one
//! bucket without knowing the seed (docs/security.md).

/// A `HashMap` with foldhash's randomly seeded hasher.
pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A `HashSet` with foldhash's randomly seeded hasher.
pub type Set<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
