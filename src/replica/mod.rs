//! The shared read replica (issue 10, in progress): one in-memory copy of etcd's
//! keys, fed by the watch hub's upstream watch, from which reads are answered
//! without going to etcd.
//!
//! Built so far: [`store`], the pure multi-version store that answers a `Range` at
//! the current revision or inside a bounded window of past revisions exactly as
//! etcd would (checked against a real etcd in `tests/replica.rs`). Not yet wired
//! into the read path: the feed from the hub, the read-index wait for linearizable
//! reads, the byte budget with eviction, and the `[cache]` switch are still to come.

pub mod store;

pub use store::{Answer, Store, Why};
