//! A migration's records in the target etcd, under `<meta>/migrate/<id>/`:
//!
//! - `manifest`: what the migration is (source cluster, projects, the ranges it
//!   reads, the snapshot revision), written once; a resumed step checks its flags
//!   and config against it;
//! - `checkpoint`: where it is (phase, position, counters, cutover, verify and
//!   cleanup records). Every write of migrated data is one transaction that also
//!   rewrites the checkpoint, guarded by the checkpoint's own revision: a crash
//!   never applies a change without recording it, a resumed copy never applies one
//!   twice nor skips one, and two processes with the same id cannot both write.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::error::{MigrateError, Result};
use super::etcd::Etcd;
use crate::keyspace::{KeyLayout, Piece};
use crate::pb::etcdserverpb::{compare, request_op, Compare, PutRequest, RangeRequest, RequestOp, TxnRequest};

/// What the migration is; written with its first checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    /// The source's endpoints when it started (for messages).
    pub source: String,
    /// The source's etcd cluster id (hex): a resumed step refuses another etcd.
    pub source_cluster_id: String,
    pub same_etcd: bool,
    /// The projects (tenants) migrated; empty with `all_projects`.
    pub projects: Vec<String>,
    pub all_projects: bool,
    /// Tenants left out because the target held their keys (`--on-conflict skip`).
    pub skipped: Vec<String>,
    /// The source ranges read, hex `start:end`: a changed config or project list
    /// would change them.
    pub ranges: Vec<String>,
    /// Who owns the copied leases (`lease owner records`): a principal, or
    /// `"<tenant>"` for the tenant of the first key seen with the lease.
    pub lease_owner: String,
    pub started_unix: u64,
}

/// Where a copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Removing the target's stale keys of some tenants (a restart, or `--on-conflict
    /// overwrite`) before the snapshot.
    Wipe,
    /// Copying every key as of `snapshot_rev`.
    Snapshot,
    /// Applying the source's later changes in order.
    Tail,
    /// Cut over: the target is the truth; copy refuses to run again.
    Cutover,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub phase: Phase,
    /// The source revision of the snapshot.
    pub snapshot_rev: i64,
    /// Snapshot: the range being read (index into the manifest's) and the next key.
    pub range_index: usize,
    pub next_key: String,
    /// Wipe: the tenants to clear and how many are done.
    pub wipe: Vec<String>,
    pub wipe_done: usize,
    /// Every source change at or below this revision is in the target.
    pub applied_rev: i64,
    /// The first `partial_events` events (in the watched range) of `partial_rev` are
    /// applied too (a revision larger than one target transaction).
    pub partial_rev: i64,
    pub partial_events: u64,
    pub copied_keys: u64,
    pub copied_bytes: u64,
    pub events_applied: u64,
    /// Copy runs so far (1 on the first).
    pub runs: u64,
    pub cutover: Option<CutoverRecord>,
    pub cleanup: Option<CleanupRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutoverRecord {
    /// The source revision of the cutover fence: the source's last.
    pub fence_rev: i64,
    /// The target revision that holds the source's state at `fence_rev`.
    pub target_rev: i64,
    /// Source keys of the migration at `fence_rev`.
    pub source_keys: u64,
    pub unix: u64,
}

/// The last verify's result, under `<meta>/migrate/<id>/verified` (its own key, so
/// that verifying never disturbs a running copy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRecord {
    pub source_rev: i64,
    pub target_rev: i64,
    pub source_keys: u64,
    pub passed: bool,
    pub unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupRecord {
    pub deleted: u64,
    pub done: bool,
}

impl Checkpoint {
    pub fn new(snapshot_rev: i64, wipe: Vec<String>) -> Checkpoint {
        Checkpoint {
            phase: if wipe.is_empty() { Phase::Snapshot } else { Phase::Wipe },
            snapshot_rev,
            range_index: 0,
            next_key: String::new(),
            wipe,
            wipe_done: 0,
            applied_rev: 0,
            partial_rev: 0,
            partial_events: 0,
            copied_keys: 0,
            copied_bytes: 0,
            events_applied: 0,
            runs: 1,
            cutover: None,
            cleanup: None,
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Result<Bytes> {
    if !s.len().is_multiple_of(2) {
        return Err(MigrateError::Internal(format!("odd hex length in a checkpoint: {s:?}")));
    }
    let digit = |c: u8| (c as char).to_digit(16);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some((digit(p[0])? * 16 + digit(p[1])?) as u8))
        .collect::<Option<Vec<u8>>>()
        .map(Bytes::from)
        .ok_or_else(|| MigrateError::Internal(format!("bad hex in a checkpoint: {s:?}")))
}

pub fn range_text(p: &Piece) -> String {
    format!("{}:{}", hex(&p.key), hex(&p.range_end))
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The checkpoint of one migration and the revision it was last written at.
pub struct Store {
    pub id: String,
    key: Bytes,
    manifest_key: Bytes,
    /// The checkpoint key's mod revision as last read or written (0: none yet).
    mod_rev: i64,
    /// Its text as last written (to tell an ambiguous write apart).
    written: String,
}

pub fn to_toml<T: Serialize>(v: &T) -> Result<String> {
    toml::to_string(v).map_err(|e| MigrateError::Internal(format!("encoding a checkpoint: {e}")))
}

pub fn from_toml<T: for<'de> Deserialize<'de>>(what: &str, raw: &[u8]) -> Result<T> {
    let text = std::str::from_utf8(raw).map_err(|e| MigrateError::Internal(format!("{what} is not UTF-8: {e}")))?;
    toml::from_str(text).map_err(|e| {
        MigrateError::Usage(format!("the migration's {what} cannot be read (written by another version?): {e}"))
    })
}

pub fn put(key: Bytes, value: impl Into<Bytes>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest { key, value: value.into(), ..Default::default() })),
    }
}

impl Store {
    pub fn new(layout: &KeyLayout, id: &str) -> Store {
        Store {
            id: id.to_string(),
            key: layout.migrate_key(id, "checkpoint"),
            manifest_key: layout.migrate_key(id, "manifest"),
            mod_rev: 0,
            written: String::new(),
        }
    }

    /// The manifest and checkpoint, if the migration exists.
    pub async fn load(&mut self, target: &Etcd) -> Result<Option<(Manifest, Checkpoint)>> {
        let cp = target.range(RangeRequest { key: self.key.clone(), ..Default::default() }).await?;
        let Some(kv) = cp.kvs.first() else {
            self.mod_rev = 0;
            return Ok(None);
        };
        self.mod_rev = kv.mod_revision;
        self.written = String::from_utf8_lossy(&kv.value).into_owned();
        let checkpoint: Checkpoint = from_toml("checkpoint", &kv.value)?;
        let m = target.range(RangeRequest { key: self.manifest_key.clone(), ..Default::default() }).await?;
        let Some(mkv) = m.kvs.first() else {
            return Err(MigrateError::Internal(format!("migration {:?} has a checkpoint but no manifest", self.id)));
        };
        Ok(Some((from_toml("manifest", &mkv.value)?, checkpoint)))
    }

    /// The checkpoint as it was at target revision `rev`: with the data written in
    /// the same transactions, it says which source revision the target at `rev` holds.
    pub async fn checkpoint_at(&self, target: &Etcd, rev: i64) -> Result<Checkpoint> {
        let resp = target.range(RangeRequest { key: self.key.clone(), revision: rev, ..Default::default() }).await?;
        match resp.kvs.first() {
            Some(kv) => from_toml("checkpoint", &kv.value),
            None => Err(MigrateError::Internal(format!("migration {:?} had no checkpoint at {rev}", self.id))),
        }
    }

    /// The compare that holds while nobody else wrote the checkpoint.
    fn guard(&self) -> Compare {
        let (target, union) = if self.mod_rev == 0 {
            (compare::CompareTarget::Version, compare::TargetUnion::Version(0))
        } else {
            (compare::CompareTarget::Mod, compare::TargetUnion::ModRevision(self.mod_rev))
        };
        Compare {
            result: compare::CompareResult::Equal as i32,
            target: target as i32,
            key: self.key.clone(),
            range_end: Bytes::new(),
            target_union: Some(union),
        }
    }

    /// Writes the manifest and the first checkpoint (or a restart's), guarded.
    pub async fn create(&mut self, target: &Etcd, m: &Manifest, cp: &Checkpoint) -> Result<i64> {
        let ops = vec![put(self.manifest_key.clone(), to_toml(m)?)];
        self.commit(target, ops, cp).await
    }

    /// Applies `ops` and writes `cp` in one transaction, if nobody else wrote the
    /// checkpoint since; returns the transaction's revision. When the answer is
    /// lost, the checkpoint is read back to learn whether it was applied.
    pub async fn commit(&mut self, target: &Etcd, mut ops: Vec<RequestOp>, cp: &Checkpoint) -> Result<i64> {
        let text = to_toml(cp)?;
        ops.push(put(self.key.clone(), text.clone()));
        let txn = TxnRequest { compare: vec![self.guard()], success: ops, failure: vec![] };
        match target.txn(txn).await {
            Ok(resp) if resp.succeeded => {
                let rev = resp.header.map_or(0, |h| h.revision);
                self.mod_rev = rev;
                self.written = text;
                Ok(rev)
            }
            Ok(_) => Err(MigrateError::CheckpointMoved { id: self.id.clone() }),
            Err(e) if e.ambiguous() => {
                let now = target.range(RangeRequest { key: self.key.clone(), ..Default::default() }).await?;
                match now.kvs.first() {
                    Some(kv) if kv.mod_revision == self.mod_rev => Err(e), // not applied: report the failure
                    Some(kv) if kv.value.as_ref() == text.as_bytes() => {
                        self.mod_rev = kv.mod_revision;
                        self.written = text;
                        Ok(kv.mod_revision)
                    }
                    _ => Err(MigrateError::CheckpointMoved { id: self.id.clone() }),
                }
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip() {
        let mut cp = Checkpoint::new(42, vec!["p".into()]);
        cp.next_key = hex(b"/projects/p/\x00\xff");
        cp.cutover = Some(CutoverRecord { fence_rev: 7, target_rev: 9, source_keys: 3, unix: 1 });
        let text = to_toml(&cp).unwrap();
        let back: Checkpoint = from_toml("checkpoint", text.as_bytes()).unwrap();
        assert_eq!(back, cp);
        assert_eq!(back.phase, Phase::Wipe);
        assert_eq!(unhex(&back.next_key).unwrap(), Bytes::from_static(b"/projects/p/\x00\xff"));
        assert!(unhex("abc").is_err() && unhex("zz").is_err() && unhex("éé").is_err());
    }
}
