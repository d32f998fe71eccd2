//! The root index against a real etcd: one key per resource root whatever the number
//! of projects, cross-root ranges and deletes exact however many roots all projects
//! use together, the per-project index of earlier versions still read (a rolling
//! upgrade), written again with `layout.write_tenant_index`, and folded away by
//! `etcdmux migrate root-index`.

mod common;

use std::process::{Command, Stdio};

use etcd_client::{Client, DeleteOptions, GetOptions};

const SLOTS: &str = "/etcdmux/slots/";
const TENANT_INDEX: &str = "/etcdmux/roots/";

fn prefix() -> Option<GetOptions> {
    Some(GetOptions::new().with_prefix().with_keys_only())
}

async fn keys(c: &mut Client, p: &str) -> Vec<String> {
    let r = c.get(p, prefix()).await.unwrap();
    r.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect()
}

/// Many projects writing the same resources add no index keys; a project's
/// tenant-wide range and delete see exactly its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_index_key_per_resource_root_whatever_the_projects() {
    let etcd = common::Etcd::start();
    let mux = common::start_mux(&etcd, common::MILO_TOML).await;
    let mut m = common::client(&mux.url).await;
    let mut raw = common::client(&etcd.client_url).await;
    for p in 0..40 {
        for r in ["pods", "configmaps", "apps.k8s.io/deployments"] {
            m.put(format!("/projects/p{p:02}/{r}/ns/a"), "v", None).await.unwrap();
        }
    }
    assert_eq!(
        keys(&mut raw, SLOTS).await,
        ["/etcdmux/slots/uapps.k8s.io/deployments", "/etcdmux/slots/uconfigmaps", "/etcdmux/slots/upods"]
    );
    assert!(keys(&mut raw, TENANT_INDEX).await.is_empty(), "no per-project index keys");
    assert_eq!(
        keys(&mut m, "/projects/p07/").await,
        ["/projects/p07/apps.k8s.io/deployments/ns/a", "/projects/p07/configmaps/ns/a", "/projects/p07/pods/ns/a"]
    );
    let del = m.delete("/projects/p07/", Some(DeleteOptions::new().with_prefix())).await.unwrap();
    assert_eq!(del.deleted(), 3);
    assert!(keys(&mut m, "/projects/p07/").await.is_empty());
    assert_eq!(keys(&mut m, "/projects/p08/").await.len(), 3, "the neighbour keeps its keys");
}

/// Roots used by other projects count for everyone's cross-root operations: a
/// project with 3 roots deletes itself whole while the index holds more roots than
/// etcd's op limit allows in one txn level (the pieces are nested), in one revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_deletes_itself_beside_more_roots_than_one_txn_holds() {
    let etcd = common::Etcd::start();
    let mux = common::start_mux(&etcd, common::MILO_TOML).await;
    let mut m = common::client(&mux.url).await;
    let mut raw = common::client(&etcd.client_url).await;
    for i in 0..200 {
        m.put(format!("/projects/wide/r{i:03}/ns/k"), "v", None).await.unwrap();
    }
    for r in ["pods", "r050", "r199"] {
        m.put(format!("/projects/small/{r}/ns/k"), "v", None).await.unwrap();
    }
    assert_eq!(keys(&mut raw, SLOTS).await.len(), 201);
    let before = raw.get("x", None).await.unwrap().header().unwrap().revision();
    let del = m.delete("/projects/small/", Some(DeleteOptions::new().with_prefix().with_prev_key())).await.unwrap();
    let prev: Vec<String> = del.prev_kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect();
    assert_eq!(prev, ["/projects/small/pods/ns/k", "/projects/small/r050/ns/k", "/projects/small/r199/ns/k"]);
    assert_eq!(del.header().unwrap().revision(), before + 1, "one transaction");
    assert!(keys(&mut m, "/projects/small/").await.is_empty());
    assert_eq!(keys(&mut m, "/projects/wide/").await.len(), 200);
}

fn fold(config: &std::path::Path, delete: bool) -> (i32, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_etcdmux"));
    c.args(["migrate", "root-index", "--config"]).arg(config);
    if delete {
        c.arg("--delete-tenant-keys");
    }
    let out = c.stdin(Stdio::null()).env_remove("ETCDMUX_CONFIG").output().expect("running etcdmux");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// An etcd written by an earlier version holds only per-project index keys: this
/// version reads them, writes them too while `write_tenant_index` is on, and
/// `etcdmux migrate root-index` folds them into the shared index without losing a
/// root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_of_earlier_versions_is_read_then_folded() {
    let etcd = common::Etcd::start();
    let mut raw = common::client(&etcd.client_url).await;
    // What an earlier version wrote: the key and its project's index key only.
    raw.put("/registry/legacy/clusters/old/ns/a", "v", None).await.unwrap();
    raw.put("/etcdmux/roots/old/ulegacy", "", None).await.unwrap();
    let mux = common::start_mux(&etcd, common::MILO_TOML).await;
    let mut m = common::client(&mux.url).await;
    m.put("/projects/old/pods/ns/b", "v", None).await.unwrap();
    assert_eq!(keys(&mut m, "/projects/old/").await, ["/projects/old/legacy/ns/a", "/projects/old/pods/ns/b"]);
    assert_eq!(keys(&mut raw, SLOTS).await, ["/etcdmux/slots/upods"]);

    // During a rolling upgrade the old form is written too, for the old replicas.
    let both = format!("{}\n[layout]\nwrite_tenant_index = true\n", common::MILO_TOML);
    let mux2 = common::start_mux(&etcd, &both).await;
    let mut m2 = common::client(&mux2.url).await;
    m2.put("/projects/new/secrets/ns/c", "v", None).await.unwrap();
    assert_eq!(keys(&mut raw, TENANT_INDEX).await, ["/etcdmux/roots/new/usecrets", "/etcdmux/roots/old/ulegacy"]);
    assert_eq!(keys(&mut raw, SLOTS).await, ["/etcdmux/slots/upods", "/etcdmux/slots/usecrets"]);

    let dir = tempfile::tempdir().unwrap();
    let cfg = |name: &str, extra: &str| {
        let path = dir.path().join(name);
        let text = format!("{}\n[upstream]\nendpoints = [\"{}\"]\n{extra}", common::MILO_TOML, etcd.client_url);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (code, out) = fold(&cfg("both.toml", "[layout]\nwrite_tenant_index = true\n"), true);
    assert_ne!(code, 0, "deleting while the config writes them again is refused: {out}");
    assert!(out.contains("write_tenant_index is on"), "{out}");
    let plain = cfg("plain.toml", "");
    let (code, out) = fold(&plain, false);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("2 per-tenant keys over 2 resource roots; 1 shared keys added; 0 per-tenant keys deleted"),
        "{out}"
    );
    assert_eq!(keys(&mut raw, TENANT_INDEX).await.len(), 2, "kept without --delete-tenant-keys");
    let (code, out) = fold(&plain, true);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 shared keys added; 2 per-tenant keys deleted"), "{out}");
    assert!(keys(&mut raw, TENANT_INDEX).await.is_empty());
    assert_eq!(
        keys(&mut raw, SLOTS).await,
        ["/etcdmux/slots/ulegacy", "/etcdmux/slots/upods", "/etcdmux/slots/usecrets"]
    );
    // Nothing lost: both replicas still find every root of both projects.
    for c in [&mut m, &mut m2] {
        assert_eq!(keys(c, "/projects/old/").await, ["/projects/old/legacy/ns/a", "/projects/old/pods/ns/b"]);
        assert_eq!(keys(c, "/projects/new/").await, ["/projects/new/secrets/ns/c"]);
    }
}
