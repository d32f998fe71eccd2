//! Tenant isolation: tenants writing the same keys never see each other's data
//! through any RPC — ranges with crafted ends, deletes, txn compares, lease calls —
//! whether tenants come from key-path rules or from static listeners, on both
//! storage backends (etcd, and SQL in a PostgreSQL).

mod common;

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};

/// One etcdmux with two static listeners (tenants a and b) and one Milo listener.
const TWO_STATIC: &str = r#"
[[listener]]
addr = "127.0.0.1:0"
static_tenant = "a"

[[listener]]
addr = "127.0.0.1:0"
static_tenant = "b"

[tenancy]
global_keys = ["compact_rev_key"]
"#;

fn status_of(e: etcd_client::Error) -> tonic::Code {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.code(),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

fn keys(resp: &etcd_client::GetResponse) -> Vec<String> {
    resp.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_tenants_share_nothing() {
    static_tenants_share_nothing_on(common::Store::Etcd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_sql_backend_static_tenants_share_nothing() {
    static_tenants_share_nothing_on(common::Store::Sql).await
}

async fn static_tenants_share_nothing_on(store: common::Store) {
    let (mux, behind) = common::start_on(store, TWO_STATIC).await;
    let addrs = &mux.running.as_ref().unwrap().addrs;
    let mut a = common::client(&format!("http://{}", addrs[0])).await;
    let mut b = common::client(&format!("http://{}", addrs[1])).await;

    for k in ["/pods/ns/x", "/pods/ns/y", "/configmaps/ns/c", "bare", "/pods"] {
        a.put(k, format!("a:{k}"), None).await.unwrap();
        b.put(k, format!("b:{k}"), None).await.unwrap();
    }
    b.put("/only-b/secret", "b", None).await.unwrap();

    // Every crafted range a client can send: whole space, from-key, ranges reaching
    // past the end of any prefix, 0xff ends.
    let ranges: &[(&[u8], Option<&[u8]>)] = &[
        (b"\0", Some(b"\0")),
        (b"/", Some(b"\0")),
        (b"/pods/", Some(b"\xff\xff")),
        (b"/", Some(b"0")),
        (b"/a", Some(b"/z")),
        (b"a", Some(b"\xff")),
        (b"/only-b/", Some(b"/only-b0")),
        (b"/only-b/secret", None),
    ];
    for (k, e) in ranges {
        let mut opts = GetOptions::new();
        if let Some(e) = e {
            opts = opts.with_range(e.to_vec());
        }
        let got = a.get(k.to_vec(), Some(opts)).await.unwrap();
        for kv in got.kvs() {
            assert!(kv.value().starts_with(b"a:"), "tenant a saw {:?} = {:?}", kv.key_str(), kv.value_str());
        }
        assert!(!keys(&got).contains(&"/only-b/secret".to_string()));
    }
    let all_a = a.get("\0", Some(GetOptions::new().with_range("\0"))).await.unwrap();
    assert_eq!(all_a.count(), 5);

    // A delete over everything only deletes a's keys.
    let del = a.delete("\0", Some(DeleteOptions::new().with_range("\0").with_prev_key())).await.unwrap();
    assert_eq!(del.deleted(), 5);
    assert!(del.prev_kvs().iter().all(|kv| kv.value().starts_with(b"a:")));
    let all_b = b.get("\0", Some(GetOptions::new().with_range("\0"))).await.unwrap();
    assert_eq!(all_b.count(), 6, "b keeps all its keys: {:?}", keys(&all_b));

    // A txn compare sees only the caller's keys: b has /only-b/secret, a does not.
    let txn = Txn::new()
        .when([Compare::version("/only-b/secret", CompareOp::Greater, 0)])
        .and_then([TxnOp::put("/leak", "yes", None)])
        .or_else([TxnOp::get("/only-b/secret", None)]);
    let resp = a.txn(txn).await.unwrap();
    assert!(!resp.succeeded());
    assert!(a.get("/leak", None).await.unwrap().kvs().is_empty());

    // Upstream, every key lives in the layout or etcdmux's meta space.
    let stored: Vec<String> = match &behind {
        common::StoreGuard::Etcd(etcd) => {
            let mut raw = common::client(&etcd.client_url).await;
            let up = raw.get("\0", Some(GetOptions::new().with_range("\0").with_keys_only())).await.unwrap();
            keys(&up)
        }
        common::StoreGuard::Sql(pg) => pg
            .psql("SELECT DISTINCT convert_from(key, 'SQL_ASCII') FROM etcdmux_kv")
            .lines()
            .map(String::from)
            .collect(),
    };
    for k in &stored {
        assert!(k.starts_with("/registry/") || k.starts_with("/etcdmux/"), "stray upstream key {k:?}");
    }
    assert!(stored.contains(&"/registry/only-b/clusters/b/secret".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_path_tenants_are_closed() {
    key_path_tenants_are_closed_on(common::Store::Etcd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_sql_backend_key_path_tenants_are_closed() {
    key_path_tenants_are_closed_on(common::Store::Sql).await
}

async fn key_path_tenants_are_closed_on(store: common::Store) {
    let (mux, _behind) = common::start_on(store, common::MILO_TOML).await;
    let mut c = common::client(&mux.url).await;
    for p in ["p", "q", "p2"] {
        c.put(format!("/projects/{p}/pods/ns/x"), p, None).await.unwrap();
        c.put(format!("/projects/{p}/secrets/ns/s"), p, None).await.unwrap();
    }
    c.put("/datum-core/pods/ns/x", "root", None).await.unwrap();

    let p = c.get("/projects/p/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(keys(&p), vec!["/projects/p/pods/ns/x", "/projects/p/secrets/ns/s"]);
    assert!(p.kvs().iter().all(|kv| kv.value() == b"p"));

    // Ranges that would cross tenants are refused, never cut.
    for (k, e) in [
        ("/projects/p/a", "/projects/q/z"),
        ("/projects/p/", "/projects/p20"),
        ("/projects/", "/projects0"),
        ("/projects/p", "/projects/p0"),
        ("/projects/p/x", "/zzz"),
    ] {
        let err = c.get(k, Some(GetOptions::new().with_range(e))).await.unwrap_err();
        assert_eq!(status_of(err), tonic::Code::InvalidArgument, "{k}..{e}");
        let err = c.delete(k, Some(DeleteOptions::new().with_range(e))).await.unwrap_err();
        assert_eq!(status_of(err), tonic::Code::InvalidArgument, "{k}..{e}");
    }
    // A txn may not touch two tenants.
    let txn = Txn::new()
        .when([Compare::version("/projects/p/pods/ns/x", CompareOp::Greater, 0)])
        .and_then([TxnOp::get("/projects/q/secrets/ns/s", None)]);
    assert_eq!(status_of(c.txn(txn).await.unwrap_err()), tonic::Code::InvalidArgument);
    // A project named like a fixed-rule tenant cannot reach it.
    let err = c.get("/projects/root/pods/ns/x", None).await.unwrap_err();
    assert_eq!(status_of(err), tonic::Code::InvalidArgument);

    // Deleting a whole project removes exactly that project.
    let del = c.delete("/projects/p/", Some(DeleteOptions::new().with_prefix())).await.unwrap();
    assert_eq!(del.deleted(), 2);
    for other in ["q", "p2"] {
        let left = c.get(format!("/projects/{other}/"), Some(GetOptions::new().with_prefix())).await.unwrap();
        assert_eq!(left.count(), 2, "project {other} untouched");
    }
    assert_eq!(c.get("/datum-core/pods/ns/x", None).await.unwrap().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_belong_to_their_tenant() {
    leases_belong_to_their_tenant_on(common::Store::Etcd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_sql_backend_leases_belong_to_their_tenant() {
    leases_belong_to_their_tenant_on(common::Store::Sql).await
}

/// Another etcdmux on the same storage.
async fn another_mux(store: &common::StoreGuard, toml: &str) -> common::Mux {
    match store {
        common::StoreGuard::Etcd(etcd) => common::start_mux(etcd, toml).await,
        common::StoreGuard::Sql(pg) => common::start_mux_sql(pg, toml).await,
    }
}

/// etcdmux's lease owner records in the storage itself.
async fn owner_records(store: &common::StoreGuard) -> usize {
    match store {
        common::StoreGuard::Etcd(etcd) => {
            let mut raw = common::client(&etcd.client_url).await;
            let owners = raw.get("/etcdmux/leases/", Some(GetOptions::new().with_prefix())).await.unwrap();
            owners.count() as usize
        }
        common::StoreGuard::Sql(pg) => {
            let n = pg.psql("SELECT count(*) FROM etcdmux_latest WHERE key >= '/etcdmux/leases/'::BYTEA AND key < '/etcdmux/leases0'::BYTEA");
            n.trim().parse().expect("a count")
        }
    }
}

async fn leases_belong_to_their_tenant_on(store: common::Store) {
    let (mux, storage) = common::start_on(store, TWO_STATIC).await;
    let addrs = &mux.running.as_ref().unwrap().addrs;
    let mut a = common::client(&format!("http://{}", addrs[0])).await;
    let mut b = common::client(&format!("http://{}", addrs[1])).await;

    let lease = a.lease_grant(60, None).await.unwrap().id();
    a.put("/pods/ns/leased", "v", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let b_lease = b.lease_grant(60, None).await.unwrap().id();

    // b cannot see, use, keep alive or revoke a's lease; the answer is etcd's
    // "lease not found", so b learns nothing about it.
    let err = b.lease_revoke(lease).await.unwrap_err();
    assert_eq!(status_of(err), tonic::Code::NotFound);
    let err = b.lease_time_to_live(lease, None).await.unwrap_err();
    assert_eq!(status_of(err), tonic::Code::NotFound);
    let err = b.put("/pods/ns/hijack", "v", Some(PutOptions::new().with_lease(lease))).await.unwrap_err();
    assert_eq!(status_of(err), tonic::Code::NotFound);
    let b_list: Vec<i64> = b.leases().await.unwrap().leases().iter().map(|l| l.id()).collect();
    assert_eq!(b_list, vec![b_lease]);
    // etcd answers a keepalive of a lease it does not have with TTL 0, which
    // etcd-client reports as "lease not found": a foreign lease must look the same.
    match b.lease_keep_alive(lease).await {
        Err(etcd_client::Error::LeaseKeepAliveError(m)) => assert!(m.contains("not found"), "{m}"),
        Ok((mut keeper, mut stream)) => {
            keeper.keep_alive().await.unwrap();
            let ka = stream.message().await.unwrap().expect("keepalive answer");
            assert_eq!(ka.ttl(), 0, "a foreign lease looks expired");
        }
        Err(other) => panic!("unexpected keepalive error {other:?}"),
    }

    // a sees its lease with its keys in its own form, and can keep it alive.
    let ttl = a.lease_time_to_live(lease, Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys())).await.unwrap();
    let ks: Vec<String> = ttl.keys().iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    assert_eq!(ks, vec!["/pods/ns/leased"]);
    let (mut keeper, mut stream) = a.lease_keep_alive(lease).await.unwrap();
    keeper.keep_alive().await.unwrap();
    assert!(stream.message().await.unwrap().expect("keepalive answer").ttl() > 0);
    let a_list: Vec<i64> = a.leases().await.unwrap().leases().iter().map(|l| l.id()).collect();
    assert_eq!(a_list, vec![lease]);

    // Ownership lives in the storage: a fresh etcdmux on the same one enforces it too.
    let mux2 = another_mux(&storage, TWO_STATIC).await;
    let addrs2 = &mux2.running.as_ref().unwrap().addrs;
    let mut b2 = common::client(&format!("http://{}", addrs2[1])).await;
    assert_eq!(status_of(b2.lease_revoke(lease).await.unwrap_err()), tonic::Code::NotFound);

    // Revoking removes the keys and the owner record.
    a.lease_revoke(lease).await.unwrap();
    assert!(a.get("/pods/ns/leased", None).await.unwrap().kvs().is_empty());
    assert_eq!(owner_records(&storage).await, 1, "only b's lease record is left");
}

/// The root index lives in etcd: what one etcdmux replica writes, another one's
/// tenant-wide ranges and deletes see, whatever each has cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_root_index() {
    let etcd = common::Etcd::start();
    let one = common::start_mux(&etcd, common::MILO_TOML).await;
    let two = common::start_mux(&etcd, common::MILO_TOML).await;
    let mut a = common::client(&one.url).await;
    let mut b = common::client(&two.url).await;
    // Replica two reads the project first, so it caches an index without the roots.
    assert_eq!(b.get("/projects/p/", Some(GetOptions::new().with_prefix())).await.unwrap().count(), 0);
    for k in ["/projects/p/pods/ns/a", "/projects/p/configmaps/ns/b", "/projects/p/apps.k8s.io/deployments/ns/c"] {
        a.put(k, "v", None).await.unwrap();
    }
    let seen = b.get("/projects/p/", Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    assert_eq!(
        keys(&seen),
        vec!["/projects/p/apps.k8s.io/deployments/ns/c", "/projects/p/configmaps/ns/b", "/projects/p/pods/ns/a"]
    );
    let del = b.delete("/projects/p/", Some(DeleteOptions::new().with_prefix())).await.unwrap();
    assert_eq!(del.deleted(), 3);
    assert_eq!(a.get("/projects/p/", Some(GetOptions::new().with_prefix())).await.unwrap().count(), 0);
}
