//! The Maintenance and Cluster services through etcdmux, with the etcd-client crate.
//!
//! Status is open to every identity and reports etcdmux's advertised version over
//! etcd's database facts; MemberList names etcdmux itself. Operations on the shared
//! cluster (compact, defragment, hashes, snapshot, leader moves, alarm changes,
//! membership changes) are the admin's: a static tenant's listener refuses them with
//! PERMISSION_DENIED before anything reaches etcd, a Milo listener (identity `root`,
//! the admin) forwards them.

mod common;

use common::{Etcd, MILO_TOML};
use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Client, Error, GetOptions};
use tonic::Code;

const ADVERTISED: &str = "http://mux.example:2379";

fn with_server_section(extra: &str) -> String {
    format!("{MILO_TOML}\n[server]\n{extra}\n")
}

/// The gRPC code and message of a failed call.
fn status_of<T: std::fmt::Debug>(r: Result<T, Error>, what: &str) -> (Code, String) {
    match r {
        Err(Error::GRpcStatus(s)) => (s.code(), s.message().to_string()),
        Err(e) => panic!("{what}: expected a gRPC status, got {e:?}"),
        Ok(v) => panic!("{what}: expected an error, got {v:?}"),
    }
}

fn assert_admin_only<T: std::fmt::Debug>(r: Result<T, Error>, what: &str) {
    let (code, msg) = status_of(r, what);
    assert_eq!(code, Code::PermissionDenied, "{what}: {msg}");
    assert!(msg.contains("reserved for the admin identity"), "{what}: {msg}");
}

/// Reads a whole snapshot stream; returns the byte count, or the first error.
async fn read_snapshot(c: &mut Client) -> Result<usize, Error> {
    let mut stream = c.snapshot().await?;
    let mut total = 0;
    let mut last_remaining = None;
    while let Some(msg) = stream.message().await? {
        total += msg.blob().len();
        last_remaining = Some(msg.remaining_bytes());
    }
    assert_eq!(last_remaining, Some(0), "snapshot stream ended before remaining_bytes reached 0");
    Ok(total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_advertised_version_over_etcd_facts() {
    common::init_tracing();
    let etcd = Etcd::start();
    let mux = common::start_mux(&etcd, MILO_TOML).await;
    let mut c = common::client(&mux.url).await;
    let mut direct = common::client(&etcd.client_url).await;
    c.put("/projects/p/pods/ns/a", "x".repeat(4096), None).await.unwrap();

    let st = c.status().await.unwrap();
    let ds = direct.status().await.unwrap();
    assert_eq!(st.version(), "3.5.17");
    assert_ne!(ds.version(), "3.5.17", "the test etcd is not 3.5.17, so the version really is etcdmux's");
    assert!(st.db_size() > 0, "db size {}", st.db_size());
    assert_eq!(st.db_size(), ds.db_size(), "db size is etcd's");
    // The leader is etcdmux's own member, the one MemberList lists (clients look
    // the leader up there); the rest of the header is etcd's.
    let member = c.member_list().await.unwrap().members()[0].id();
    assert_eq!(st.leader(), member);
    assert_ne!(st.leader(), ds.leader());
    assert!(st.raft_index() > 0);
    assert_eq!(st.raft_term(), ds.raft_term());
    let (h, dh) = (st.header().unwrap(), ds.header().unwrap());
    assert_eq!(h.member_id(), member);
    assert_eq!((h.cluster_id(), h.raft_term()), (dh.cluster_id(), dh.raft_term()), "the header is etcd's");

    // A static tenant may read Status too.
    let etcd2 = Etcd::start();
    let smux = common::start_mux(&etcd2, &common::static_toml("p")).await;
    let mut sc = common::client(&smux.url).await;
    let st = sc.status().await.unwrap();
    assert_eq!(st.version(), "3.5.17");
    assert!(st.db_size() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertised_version_is_configurable() {
    common::init_tracing();
    let etcd = Etcd::start();
    let mux = common::start_mux(&etcd, &with_server_section("advertised_version = \"3.5.21\"")).await;
    let mut c = common::client(&mux.url).await;
    assert_eq!(c.status().await.unwrap().version(), "3.5.21");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_tenant_may_not_run_admin_operations() {
    common::init_tracing();
    let etcd = Etcd::start();
    let mux = common::start_mux(&etcd, &common::static_toml("p")).await;
    let mut c = common::client(&mux.url).await;
    let mut direct = common::client(&etcd.client_url).await;
    let put = c.put("a", "1", None).await.unwrap();
    let rev = put.header().unwrap().revision();
    c.put("a", "2", None).await.unwrap();
    let etcd_member = direct.status().await.unwrap().header().unwrap().member_id();

    assert_admin_only(c.compact(rev, None).await, "Compact");
    assert_admin_only(c.defragment().await, "Defragment");
    assert_admin_only(c.hash().await, "Hash");
    assert_admin_only(c.hash_kv(0).await, "HashKV");
    assert_admin_only(read_snapshot(&mut c).await, "Snapshot");
    assert_admin_only(c.move_leader(etcd_member).await, "MoveLeader");
    let mut opts = AlarmOptions::new();
    opts.with_member(etcd_member);
    assert_admin_only(c.alarm(AlarmAction::Activate, AlarmType::Nospace, Some(opts.clone())).await, "Alarm activate");
    assert_admin_only(c.alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(opts)).await, "Alarm deactivate");
    assert_admin_only(c.member_add(["http://127.0.0.1:1"], None).await, "MemberAdd");
    assert_admin_only(c.member_remove(etcd_member).await, "MemberRemove");
    assert_admin_only(c.member_update(etcd_member, vec!["http://127.0.0.1:1".to_string()]).await, "MemberUpdate");
    assert_admin_only(c.member_promote(etcd_member).await, "MemberPromote");
    // Writing a global key is the admin's too; reading it is not.
    assert_admin_only(c.put("compact_rev_key", "1", None).await, "writing compact_rev_key");
    assert_admin_only(c.delete("compact_rev_key", None).await, "deleting compact_rev_key");
    assert!(c.get("compact_rev_key", None).await.unwrap().kvs().is_empty());

    // Nothing reached etcd: no compaction, no alarm, no new member.
    let old = direct.get("/etcdmux/bare/p/a", Some(GetOptions::new().with_revision(rev))).await;
    assert!(old.is_ok(), "revision {rev} was compacted: {old:?}");
    assert!(direct.alarm(AlarmAction::Get, AlarmType::None, None).await.unwrap().alarms().is_empty());
    assert_eq!(direct.member_list().await.unwrap().members().len(), 1);

    // What a tenant may do.
    let st = c.status().await.unwrap();
    assert_eq!(st.version(), "3.5.17");
    let alarms = c.alarm(AlarmAction::Get, AlarmType::None, None).await.unwrap();
    assert!(alarms.alarms().is_empty());
    let ml = c.member_list().await.unwrap();
    assert_eq!(ml.members().len(), 1);
    assert_eq!(ml.members()[0].name(), "etcdmux");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_runs_maintenance_on_milo_listener() {
    common::init_tracing();
    let etcd = Etcd::start();
    let mux = common::start_mux(&etcd, MILO_TOML).await;
    let mut c = common::client(&mux.url).await;
    let mut direct = common::client(&etcd.client_url).await;
    for i in 0..20 {
        c.put(format!("/projects/p/configmaps/ns/cm{i}"), vec![b'x'; 1024], None).await.unwrap();
    }
    c.delete("/projects/p/configmaps/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();

    // Hashes are etcd's (nothing is written between the two calls).
    let h = c.hash().await.unwrap().hash();
    assert_eq!(h, direct.hash().await.unwrap().hash());
    let hkv = c.hash_kv(0).await.unwrap();
    let dhkv = direct.hash_kv(0).await.unwrap();
    // (etcd 3.4 reports no hash_revision; compare what both versions report.)
    assert_eq!((hkv.hash(), hkv.compact_version()), (dhkv.hash(), dhkv.compact_version()));
    assert_ne!(hkv.hash(), 0);

    let rev = c.status().await.unwrap().header().unwrap().revision();
    c.compact(rev, None).await.expect("admin compacts");
    let (code, msg) =
        status_of(direct.get("/registry/", Some(GetOptions::new().with_revision(rev - 1))).await, "old rev");
    assert_eq!(code, Code::OutOfRange, "compaction reached etcd: {msg}");
    c.defragment().await.expect("admin defragments");

    let n = read_snapshot(&mut c).await.expect("admin snapshot");
    assert!(n > 0, "empty snapshot");
    let dn = read_snapshot(&mut direct).await.unwrap();
    assert_eq!(n, dn, "snapshot through etcdmux is etcd's database");

    // Alarms: the admin may raise and clear them; they act on etcd.
    let member = c.status().await.unwrap().header().unwrap().member_id();
    let mut opts = AlarmOptions::new();
    opts.with_member(member);
    c.alarm(AlarmAction::Activate, AlarmType::Nospace, Some(opts.clone())).await.expect("admin raises alarm");
    let alarms = c.alarm(AlarmAction::Get, AlarmType::None, None).await.unwrap();
    assert_eq!(alarms.alarms().len(), 1);
    assert_eq!(alarms.alarms()[0].alarm(), AlarmType::Nospace);
    let (code, msg) = status_of(c.put("/projects/p/pods/ns/a", "v", None).await, "put under NOSPACE");
    assert_eq!(code, Code::ResourceExhausted, "{msg}");
    assert!(msg.contains("database space exceeded"), "{msg}");
    c.alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(opts)).await.expect("admin clears alarm");
    assert!(c.alarm(AlarmAction::Get, AlarmType::None, None).await.unwrap().alarms().is_empty());
    c.put("/projects/p/pods/ns/a", "v", None).await.expect("put after the alarm is cleared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_list_names_etcdmux() {
    common::init_tracing();
    let etcd = Etcd::start();
    let mux =
        common::start_mux(&etcd, &with_server_section(&format!("advertise_client_urls = [\"{ADVERTISED}\"]"))).await;
    let mut c = common::client(&mux.url).await;
    let mut direct = common::client(&etcd.client_url).await;
    let ml = c.member_list().await.unwrap();
    assert_eq!(ml.members().len(), 1);
    let m = &ml.members()[0];
    assert_eq!(m.name(), "etcdmux");
    assert_eq!(m.client_urls(), [ADVERTISED.to_string()]);
    assert!(m.peer_urls().is_empty());
    assert!(!m.is_learner());
    assert_ne!(m.id(), 0);
    let dml = direct.member_list().await.unwrap();
    assert_ne!(m.id(), dml.members()[0].id(), "etcdmux's member is not etcd's");
    assert_eq!(ml.header().unwrap().cluster_id(), dml.header().unwrap().cluster_id(), "the header is etcd's");

    // Without advertise_client_urls: the listener's own address.
    let etcd2 = Etcd::start();
    let mux2 = common::start_mux(&etcd2, MILO_TOML).await;
    let mut c2 = common::client(&mux2.url).await;
    let ml = c2.member_list().await.unwrap();
    assert_eq!(ml.members().len(), 1);
    assert_eq!(ml.members()[0].client_urls(), std::slice::from_ref(&mux2.url));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_keys_are_readable() {
    common::init_tracing();
    let etcd = Etcd::start();
    let mux = common::start_mux(&etcd, MILO_TOML).await;
    let mut c = common::client(&mux.url).await;
    // A tenant's own `health` key (what a per-project `etcdctl endpoint health` reads).
    let r = c.get("/projects/p/health", None).await.expect("per-tenant health key");
    assert!(r.kvs().is_empty());
    assert_eq!(r.count(), 0);
    // The global `health` key passes through unchanged.
    let r = c.get("health", None).await.expect("global health key");
    assert!(r.kvs().is_empty());
    // The admin may write it; it lands upstream under its own name.
    c.put("health", "ok", None).await.expect("admin writes the global health key");
    let mut direct = common::client(&etcd.client_url).await;
    assert_eq!(direct.get("health", None).await.unwrap().kvs()[0].value(), b"ok");
    assert_eq!(c.get("health", None).await.unwrap().kvs()[0].value(), b"ok");

    // On a static listener both spellings are readable too: `health` is global,
    // any other key is the tenant's.
    let etcd2 = Etcd::start();
    let smux = common::start_mux(&etcd2, &common::static_toml("p")).await;
    let mut sc = common::client(&smux.url).await;
    assert!(sc.get("health", None).await.expect("global health key").kvs().is_empty());
    assert!(sc.get("/health", None).await.expect("tenant health key").kvs().is_empty());
}
