//! The SQL backend's own behaviour, beyond what the differential test compares:
//! lease expiry by exactly one of several etcdmux on one database (and its take-over
//! when that one is killed), keepalive and time-to-live answers against etcd's, and
//! `etcdmux backend init` run as an operator runs it.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Etcd, Postgres, Proc};
use etcd_client::{EventType, GetOptions, PutOptions, WatchOptions};

const MUX: &str = env!("CARGO_BIN_EXE_etcdmux");

/// An etcdmux process on the SQL backend in `pg`, checking leases every 100 ms and
/// holding the expiry lock for 1.5 s; waits until it answers.
async fn spawn_mux(pg: &Postgres) -> (Proc, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = dir.path().join("mux.toml");
    let cfg = format!(
        "{}\n[backend]\nkind = \"sql\"\ndsn = \"{}\"\nlease_check_interval_ms = 100\nlease_lock_ttl_ms = 1500\n",
        common::MILO_TOML,
        pg.dsn
    );
    std::fs::write(&toml, cfg).expect("writing the config");
    let (proc, url) = common::spawn_mux_process(&toml).await;
    // The config file is read at start; the directory may go.
    drop(dir);
    (proc, url)
}

/// The pid in the lease-expiry lock's holder (`etcdmux-<pid>-<n>`), if held.
fn expiry_holder(pg: &Postgres) -> Option<u32> {
    let out = pg.psql("SELECT holder FROM etcdmux_lock WHERE name = 'lease_expiry' AND expires_at > now()");
    out.trim().strip_prefix("etcdmux-")?.split('-').next()?.parse().ok()
}

/// Waits until `f` holds, up to `within`.
async fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Grants a 2 s lease through `c`, attaches three keys under `prefix` and waits for
/// the expiry's deletes on a watch: all three in one response, at one revision,
/// which is the revision right after the last put. Returns that revision.
async fn expire_three(c: &mut etcd_client::Client, prefix: &str) -> i64 {
    let lease = c.lease_grant(2, None).await.expect("grant").id();
    let mut last = 0;
    for k in ["a", "b", "c"] {
        let r = c.put(format!("{prefix}{k}"), "v", Some(PutOptions::new().with_lease(lease))).await.expect("put");
        last = r.header().expect("header").revision();
    }
    let mut events =
        c.watch(prefix, Some(WatchOptions::new().with_prefix().with_start_revision(last + 1))).await.expect("watch");
    let resp = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let r = events.message().await.expect("watch stream").expect("watch answer");
            if !r.events().is_empty() {
                return r;
            }
        }
    })
    .await
    .expect("the lease's keys deleted within 15 s");
    let revs: Vec<i64> = resp.events().iter().map(|e| e.kv().expect("kv").mod_revision()).collect();
    assert!(resp.events().iter().all(|e| e.event_type() == EventType::Delete), "{:?}", resp.events());
    assert_eq!(revs, vec![last + 1; 3], "the three deletes in one revision, right after the puts");
    let left = c.get(prefix, Some(GetOptions::new().with_prefix())).await.expect("get");
    assert_eq!(left.count(), 0);
    assert_eq!(c.lease_time_to_live(lease, None).await.expect("ttl").ttl(), -1, "the lease is gone");
    last + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_by_exactly_one_etcdmux_and_taken_over_when_it_dies() {
    let pg = Postgres::start();
    common::init_schema(&pg.dsn).await;
    let (one, url_one) = spawn_mux(&pg).await;
    let (two, url_two) = spawn_mux(&pg).await;
    let pids = [one.pid(), two.pid()];

    // One of the two holds the expiry lock, and keeps it while it lives.
    wait_until(Duration::from_secs(5), "an expiry lock holder", || expiry_holder(&pg).is_some()).await;
    let holder = expiry_holder(&pg).expect("holder");
    assert!(pids.contains(&holder), "holder {holder} is one of {pids:?}");
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(expiry_holder(&pg), Some(holder), "the lock stays with its holder while it renews");
    }

    // Granted through the etcdmux that does not expire leases: the holder expires it,
    // all three keys in one revision, and that revision is the only one written.
    let (held_by, other, other_url) = if holder == one.pid() { (one, two, url_two) } else { (two, one, url_one) };
    let mut c = common::client(&other_url).await;
    let rev = expire_three(&mut c, "/projects/p/pods/one/").await;
    let head = pg.psql("SELECT revision FROM etcdmux_head");
    assert_eq!(head.trim(), rev.to_string(), "one revision for the expiry, none from the other etcdmux");
    // The three keys and etcdmux's owner record of the lease.
    let tombs = pg.psql(&format!("SELECT count(*) FROM etcdmux_kv WHERE mod_revision = {rev} AND deleted"));
    assert_eq!(tombs.trim(), "4");

    // The holder is killed (SIGKILL: no hand-over): the other takes the lock once it
    // lapses and expires leases from then on.
    drop(held_by);
    let survivor = other.pid();
    wait_until(Duration::from_secs(10), "the survivor takes the expiry lock", || expiry_holder(&pg) == Some(survivor))
        .await;
    expire_three(&mut c, "/projects/p/pods/two/").await;
}

/// The same lease calls, raw, on etcdmux over etcd and on the SQL backend: every
/// answer equal (headers without cluster ids), remaining TTLs within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_and_time_to_live_answer_as_on_etcd() {
    let etcd = Etcd::start();
    let on_etcd = common::start_mux(&etcd, &common::without_cache(common::MILO_TOML)).await;
    let pg = Postgres::start();
    let on_sql = common::start_mux_sql(&pg, common::MILO_TOML).await;
    let a = lease_script(&on_etcd.url).await;
    let b = lease_script(&on_sql.url).await;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x, y, "answer {i} differs (etcd left, sql right)");
    }
    assert_eq!(a.len(), b.len());
}

/// A remaining TTL shown as `granted-1..=granted` is within a second of a fresh grant.
fn ttl_band(ttl: i64, granted: i64) -> String {
    if ttl == granted || ttl == granted - 1 {
        "fresh".to_string()
    } else {
        format!("ttl {ttl} of {granted}")
    }
}

async fn lease_script(url: &str) -> Vec<common::Out> {
    use common::{norm_header, show};
    use etcdmux::pb::etcdserverpb::{
        kv_client::KvClient, lease_client::LeaseClient, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest,
        LeaseTimeToLiveRequest, PutRequest,
    };
    let ch = tonic::transport::Endpoint::from_shared(url.to_string()).expect("url").connect().await.expect("connect");
    let mut l = LeaseClient::new(ch.clone());
    let mut kv = KvClient::new(ch);
    let mut out = Vec::new();
    let grant = |id: i64, ttl: i64| LeaseGrantRequest { id, ttl };
    let ttl_of = |id: i64, keys: bool| LeaseTimeToLiveRequest { id, keys };

    out.push(show(l.lease_grant(grant(0x7001, 30)).await, |r| norm_header(&mut r.header)));
    // Below etcd's minimum (2 s with its default election timeout), and above its maximum.
    out.push(show(l.lease_grant(grant(0x7002, 1)).await, |r| norm_header(&mut r.header)));
    out.push(show(l.lease_grant(grant(0x7003, 9_000_000_001)).await, |r| norm_header(&mut r.header)));
    out.push(show(l.lease_grant(grant(0x7001, 30)).await, |r| norm_header(&mut r.header)));
    for k in ["/projects/p/pods/ns/b", "/projects/p/pods/ns/a"] {
        let put = PutRequest { key: k.into(), value: "v".into(), lease: 0x7001, ..Default::default() };
        out.push(show(kv.put(put).await, |r| norm_header(&mut r.header)));
    }
    for (id, keys) in [(0x7001, true), (0x7001, false), (0x7002, true), (0x7999, true), (0x7999, false)] {
        out.push(show(l.lease_time_to_live(ttl_of(id, keys)).await, |r| {
            norm_header(&mut r.header);
            // etcd lists a lease's keys in Go map order (random); SQL in key order.
            r.keys.sort();
            if r.ttl > 0 {
                r.ttl = if ttl_band(r.ttl, r.granted_ttl) == "fresh" { 1 } else { r.ttl };
            }
        }));
    }

    // Keepalive: the granted TTL for a live lease, 0 for an unknown one, in order.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = l
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("keepalive stream")
        .into_inner();
    for id in [0x7001, 0x7999, 0x7002] {
        tx.send(LeaseKeepAliveRequest { id }).await.expect("send");
        let r = tokio::time::timeout(Duration::from_secs(5), answers.message()).await.expect("keepalive answer");
        out.push(show(r.map(|m| tonic::Response::new(m.expect("an answer"))), |r| norm_header(&mut r.header)));
    }
    drop(tx);

    out.push(show(l.lease_revoke(LeaseRevokeRequest { id: 0x7001 }).await, |r| norm_header(&mut r.header)));
    out.push(show(l.lease_revoke(LeaseRevokeRequest { id: 0x7001 }).await, |r| norm_header(&mut r.header)));
    out.push(show(l.lease_time_to_live(ttl_of(0x7001, true)).await, |r| norm_header(&mut r.header)));
    let rest = kv.range(etcdmux::pb::etcdserverpb::RangeRequest {
        key: "/projects/p/".into(),
        range_end: "/projects/p0".into(),
        ..Default::default()
    });
    out.push(show(rest.await, |r| norm_header(&mut r.header)));
    out
}

/// `etcdmux backend init` as an operator runs it: creates the schema, says so; run
/// again it changes nothing; on a database of an unknown (newer) schema version it
/// refuses, and so does etcdmux itself.
#[test]
fn backend_init_creates_is_idempotent_and_refuses_unknown_versions() {
    let pg = Postgres::start();
    let init = || Command::new(MUX).args(["backend", "init", "--backend-dsn", &pg.dsn]).output().expect("running init");

    let first = init();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let want = etcdmux::backend::sql::schema::VERSION;
    assert_eq!(String::from_utf8_lossy(&first.stdout).trim(), format!("etcdmux schema: version 0 -> {want}"));
    let tables = pg.psql("SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables WHERE table_name LIKE 'etcdmux_%'");
    assert_eq!(tables.trim(), "etcdmux_head,etcdmux_kv,etcdmux_latest,etcdmux_lease,etcdmux_lock,etcdmux_schema");

    // A write, then init again: nothing changes, the data is kept.
    pg.psql("UPDATE etcdmux_head SET revision = 42");
    let again = init();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), format!("etcdmux schema: version {want}, up to date"));
    assert_eq!(pg.psql("SELECT revision FROM etcdmux_head").trim(), "42");

    // A schema from a newer etcdmux: init refuses and leaves it; so does etcdmux.
    pg.psql("UPDATE etcdmux_schema SET version = 99");
    let newer = init();
    assert!(!newer.status.success());
    let err = String::from_utf8_lossy(&newer.stderr);
    assert!(err.contains("schema version 99") && err.contains(&format!("needs {want}")), "{err}");
    assert_eq!(pg.psql("SELECT version FROM etcdmux_schema").trim(), "99");
    let serve = Command::new(MUX)
        .args(["--listen", &format!("127.0.0.1:{}", free_port()), "--static-tenant", "t"])
        .args(["--backend", "sql", "--backend-dsn", &pg.dsn])
        .stdout(Stdio::null())
        .output()
        .expect("running etcdmux");
    assert!(!serve.status.success(), "etcdmux served a database of schema version 99");
    let err = String::from_utf8_lossy(&serve.stderr);
    assert!(err.contains("schema version 99"), "{err}");

    // No database there: a clear error, no panic.
    let none = Command::new(MUX)
        .args(["backend", "init", "--backend-dsn", &format!("host=127.0.0.1 port={} user=x dbname=x", free_port())])
        .output()
        .expect("running init");
    assert!(!none.status.success());
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(err.contains("connecting to the database"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A measurement, not a check of speed (run with `--ignored --nocapture`): a range at
/// the newest revision over keys with many versions each, and a delete of many keys,
/// on the SQL backend. Checks only that the answers are right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a timing; run with --ignored --nocapture"]
async fn timing_of_newest_ranges_and_big_deletes() {
    use etcdmux::pb::etcdserverpb::{kv_client::KvClient, request_op, PutRequest, RangeRequest, RequestOp, TxnRequest};
    const KEYS: usize = 2000;
    const VERSIONS: usize = 10;
    let pg = Postgres::start();
    let mux = common::start_mux_sql(&pg, &common::without_cache(common::MILO_TOML)).await;
    let ch = tonic::transport::Endpoint::from_shared(mux.url.clone()).expect("url").connect().await.expect("connect");
    let mut kv = KvClient::new(ch);
    let key = |i: usize| format!("/projects/p/pods/ns/k{i:05}");
    for v in 0..VERSIONS {
        for chunk in (0..KEYS).collect::<Vec<_>>().chunks(100) {
            let success = chunk
                .iter()
                .map(|&i| RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key(i).into(),
                        value: format!("v{v}").into(),
                        ..Default::default()
                    })),
                })
                .collect();
            kv.txn(TxnRequest { success, ..Default::default() }).await.expect("txn");
        }
    }
    let list = RangeRequest {
        key: "/projects/p/pods/".into(),
        range_end: "/projects/p/pods0".into(),
        limit: 500,
        ..Default::default()
    };
    let t = Instant::now();
    for _ in 0..20 {
        let r = kv.range(list.clone()).await.expect("range").into_inner();
        assert_eq!((r.kvs.len(), r.count, r.more), (500, KEYS as i64, true));
    }
    let range_ms = t.elapsed().as_secs_f64() * 1000.0 / 20.0;
    let t = Instant::now();
    for i in 0..200 {
        let r = kv.range(RangeRequest { key: key(i * 7).into(), ..Default::default() }).await.expect("get");
        assert_eq!(r.into_inner().kvs.len(), 1);
    }
    let get_ms = t.elapsed().as_secs_f64() * 1000.0 / 200.0;
    let t = Instant::now();
    let del = etcdmux::pb::etcdserverpb::DeleteRangeRequest {
        key: "/projects/p/pods/".into(),
        range_end: "/projects/p/pods0".into(),
        ..Default::default()
    };
    let d = kv.delete_range(del).await.expect("delete").into_inner();
    let delete_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(d.deleted, KEYS as i64);
    println!(
        "sql timing ({KEYS} keys x {VERSIONS} versions): list of 500 at newest {range_ms:.1} ms, get {get_ms:.2} ms, \
         delete of {KEYS} keys {delete_ms:.0} ms"
    );
}

/// Schema 1 -> 2: `backend init` fills `etcdmux_latest` from the history, so reads at
/// the newest revision after the migration see exactly the live keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_to_schema_2_fills_the_newest_versions_from_the_history() {
    let pg = Postgres::start();
    let mut mux = common::start_mux_sql(&pg, &common::without_cache(common::MILO_TOML)).await;
    let mut c = common::client(&mux.url).await;
    for (k, v) in [("a", "1"), ("b", "1"), ("a", "2"), ("c", "1")] {
        c.put(format!("/projects/p/pods/ns/{k}"), v, None).await.expect("put");
    }
    c.delete("/projects/p/pods/ns/b", None).await.expect("delete");
    let before = c.get("/projects/p/", Some(GetOptions::new().with_prefix())).await.expect("get");
    mux.shutdown().await;

    // As a version 1 database: no etcdmux_latest.
    pg.psql("DROP TABLE etcdmux_latest");
    pg.psql("UPDATE etcdmux_schema SET version = 1");
    let out = Command::new(MUX).args(["backend", "init", "--backend-dsn", &pg.dsn]).output().expect("init");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "etcdmux schema: version 1 -> 2");

    let mux = common::start_mux_sql(&pg, &common::without_cache(common::MILO_TOML)).await;
    let mut c = common::client(&mux.url).await;
    let after = c.get("/projects/p/", Some(GetOptions::new().with_prefix())).await.expect("get");
    let show = |r: &etcd_client::GetResponse| {
        r.kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap_or("?").to_string(), kv.mod_revision(), kv.version(), kv.create_revision()))
            .collect::<Vec<_>>()
    };
    assert_eq!(show(&after), show(&before));
    assert_eq!(
        show(&after).into_iter().map(|(k, ..)| k).collect::<Vec<_>>(),
        ["/projects/p/pods/ns/a", "/projects/p/pods/ns/c"]
    );
    assert_eq!(after.count(), 2);
}
