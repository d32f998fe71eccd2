//! TLS both ways: etcdmux in front of an etcd that requires client certificates,
//! clients over TLS (and mTLS) to etcdmux. Certificates are generated per test.

#[path = "tls/clients.rs"]
mod clients;
mod common;
#[path = "tls/pki.rs"]
mod pki;

use std::time::Duration;

use clients::{b, get, listener_toml, put, put_get, tls_channel};
use common::*;
use etcd_client::{GetOptions, WatchOptions};
use etcdmux::pb::etcdserverpb::kv_client::KvClient;
use etcdmux::pb::etcdserverpb::{PutRequest, RangeRequest};
use pki::{Pair, Pki};

/// An etcd serving https:// that requires a client certificate from `pki`'s CA.
fn tls_etcd(pki: &Pki) -> Etcd {
    let server = pki.server("etcd");
    Etcd::builder()
        .https()
        .args(["--client-cert-auth", "--trusted-ca-file"])
        .arg(pki.ca_file.display().to_string())
        .arg("--cert-file")
        .arg(server.cert.display().to_string())
        .arg("--key-file")
        .arg(server.key.display().to_string())
        .start()
}

/// MILO_TOML with an `[upstream]` section trusting `pki`'s CA, with `client` as
/// etcdmux's certificate towards etcd.
fn upstream_tls_toml(pki: &Pki, client: Option<&Pair>) -> String {
    let mut toml = format!("{MILO_TOML}\n[upstream]\ncacert = {:?}\n", pki.ca_file.display().to_string());
    if let Some(c) = client {
        toml += &format!("cert = {:?}\nkey = {:?}\n", c.cert.display().to_string(), c.key.display().to_string());
    }
    toml
}

#[tokio::test]
async fn upstream_tls_with_client_certificate() {
    let pki = Pki::new("upstream");
    let etcd = tls_etcd(&pki);
    assert!(etcd.client_url.starts_with("https://"));
    let cert = pki.client("etcdmux", "etcdmux", vec![]);
    let (running, url) = start_mux_with(&upstream_tls_toml(&pki, Some(&cert)), vec![etcd.client_url.clone()]).await;
    let mut c = client(&url).await;

    let mut watch_client = c.watch_client();
    let mut events = watch_client
        .watch("/projects/a/pods/", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch through etcdmux over TLS");
    let created = events.message().await.expect("watch stream").expect("created");
    assert!(created.created());
    c.put("/projects/a/pods/x", "v1", None).await.expect("put through etcdmux over TLS");
    let got = c.get("/projects/a/pods/", Some(GetOptions::new().with_prefix())).await.expect("get");
    assert_eq!(got.kvs().len(), 1);
    assert_eq!(got.kvs()[0].value(), b"v1");
    let resp = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let r = events.message().await.expect("watch stream").expect("a response");
            if !r.events().is_empty() {
                return r;
            }
        }
    })
    .await
    .expect("a watch event in time");
    assert_eq!(resp.events()[0].kv().map(|kv| kv.key().to_vec()), Some(b"/projects/a/pods/x".to_vec()));
    drop(running);
}

#[tokio::test]
async fn upstream_tls_without_client_certificate_is_unavailable() {
    let pki = Pki::new("upstream");
    let etcd = tls_etcd(&pki);
    let (running, url) = start_mux_with(&upstream_tls_toml(&pki, None), vec![etcd.client_url.clone()]).await;
    let mut c = client(&url).await;
    let err = tokio::time::timeout(Duration::from_secs(20), c.get("/projects/a/x", None))
        .await
        .expect("an answer in time")
        .expect_err("etcd refuses etcdmux without a client certificate");
    let etcd_client::Error::GRpcStatus(status) = err else { panic!("not a gRPC status: {err}") };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    eprintln!("refusal: {}", status.message());
    drop(running);
}

#[tokio::test]
async fn clients_over_tls() {
    let pki = Pki::new("clients");
    let server = pki.server("etcdmux");
    let etcd = Etcd::start();
    let (running, url) = start_mux_with(&listener_toml(&server, None, ""), vec![etcd.client_url.clone()]).await;
    assert!(url.starts_with("http://"), "start_mux_with names the scheme itself");
    let addr = running.addrs[0];
    assert_eq!(put_get(addr, &pki, None, "/projects/a/pods/x").await.unwrap(), b"v");
    // A plaintext client does not get an answer from a TLS listener.
    let mut plain = KvClient::connect(format!("http://{addr}")).await.expect("tcp connect");
    let refused = tokio::time::timeout(Duration::from_secs(10), plain.range(get("/projects/a/pods/x"))).await;
    assert!(matches!(refused, Ok(Err(_))), "{refused:?}");
    // Another CA's server certificate is not trusted by the client.
    let other = Pki::new("other");
    assert!(put_get(addr, &other, None, "/projects/a/pods/y").await.is_err());
}

#[tokio::test]
async fn clients_over_mtls() {
    let pki = Pki::new("clients");
    let server = pki.server("etcdmux");
    let etcd = Etcd::start();
    let toml = listener_toml(&server, Some(&pki), "");
    let (running, _) = start_mux_with(&toml, vec![etcd.client_url.clone()]).await;
    let addr = running.addrs[0];

    let err = put_get(addr, &pki, None, "/projects/a/pods/nocert").await.expect_err("no client certificate");
    eprintln!("without a certificate: {err}");
    let other = Pki::new("other");
    let foreign = other.client("foreign", "apiserver", vec![]);
    put_get(addr, &pki, Some(&foreign), "/projects/a/pods/foreign").await.expect_err("untrusted certificate");
    let mut direct = client(&etcd.client_url).await;
    let leaked = direct.get("/registry/", Some(GetOptions::new().with_prefix())).await.expect("etcd");
    assert!(leaked.kvs().is_empty(), "refused clients wrote nothing: {:?}", leaked.kvs());

    let ok = pki.client("apiserver", "apiserver", vec![]);
    assert_eq!(put_get(addr, &pki, Some(&ok), "/projects/a/pods/x").await.unwrap(), b"v");

    // etcdctl with the same files.
    let endpoint = format!("https://127.0.0.1:{}", addr.port());
    let files = [&pki.ca_file, &ok.cert, &ok.key].map(|p| p.display().to_string());
    let out = tokio::task::spawn_blocking(move || {
        let tls = ["--cacert", &files[0], "--cert", &files[1], "--key", &files[2]];
        etcdctl_ok(&endpoint, &[&tls[..], &["put", "/projects/a/pods/ctl", "v2"]].concat());
        etcdctl_ok(&endpoint, &[&tls[..], &["get", "/projects/a/pods/ctl", "--print-value-only"]].concat())
    })
    .await
    .expect("etcdctl");
    assert_eq!(out.trim(), "v2");
}

/// Identity from the client certificate: tenant A's certificate reaches A's keys and
/// nothing of B's; an unmapped certificate is refused, named.
#[tokio::test]
async fn identity_from_client_certificate() {
    use etcdmux::pb::etcdserverpb::lease_client::LeaseClient;
    use etcdmux::pb::etcdserverpb::watch_client::WatchClient;
    use etcdmux::pb::etcdserverpb::{
        watch_request, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseLeasesRequest,
        LeaseRevokeRequest, LeaseTimeToLiveRequest, WatchCreateRequest, WatchRequest,
    };
    use pki::uri;
    use tonic::Code;

    let pki = Pki::new("clients");
    let server = pki.server("etcdmux");
    let etcd = Etcd::start();
    let identity = "[tenancy.identity]\nfrom = \"uri_san\"\npattern = \"spiffe://example.org/project/{tenant}\"\n\
                    map = { \"spiffe://example.org/apiserver\" = \"root\" }\n";
    let toml = listener_toml(&server, Some(&pki), identity);
    let (running, _) = start_mux_with(&toml, vec![etcd.client_url.clone()]).await;
    let addr = running.addrs[0];
    let cert = |name: &str, id: &str| pki.client(name, name, vec![uri(id)]);
    let (a, bb, unmapped) = (
        cert("a", "spiffe://example.org/project/a"),
        cert("b", "spiffe://example.org/project/b"),
        cert("x", "spiffe://other.org/project/x"),
    );
    let ch = |c: Pair| {
        let pki = &pki;
        async move { tls_channel(addr, pki, Some(&c)).await.expect("mtls channel") }
    };
    let (ch_a, ch_b, ch_x) = (ch(a).await, ch(bb).await, ch(unmapped).await);
    fn denied<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) -> tonic::Status {
        match r {
            Err(s) if s.code() == Code::PermissionDenied => s,
            other => panic!("{what}: expected PERMISSION_DENIED, got {other:?}"),
        }
    }

    // B's data: a key under a lease.
    let (mut kv_b, mut lease_b) = (KvClient::new(ch_b.clone()), LeaseClient::new(ch_b.clone()));
    let lease = lease_b.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }).await.expect("b grants").into_inner().id;
    kv_b.put(PutRequest { lease, ..put("/projects/b/pods/secret", "b-data") }).await.expect("b writes its key");

    // A's own keys work.
    let (mut kv_a, mut lease_a) = (KvClient::new(ch_a.clone()), LeaseClient::new(ch_a.clone()));
    kv_a.put(put("/projects/a/pods/mine", "a-data")).await.expect("a writes its key");
    let got = kv_a.range(get("/projects/a/pods/mine")).await.expect("a reads its key").into_inner();
    assert_eq!(got.kvs[0].value.as_ref(), b"a-data");
    lease_a.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }).await.expect("a grants its lease");

    // Nothing of B's for A.
    let s = denied(kv_a.range(get("/projects/b/pods/secret")).await, "a reads b");
    assert!(s.message().contains("tenant b"), "{}", s.message());
    let prefix = RangeRequest { range_end: b("/projects/b0"), ..get("/projects/b/") };
    denied(kv_a.range(prefix).await, "a lists b");
    denied(kv_a.put(put("/projects/b/pods/secret", "a-was-here")).await, "a overwrites b");
    denied(kv_a.put(put("/projects/b/pods/new", "a-was-here")).await, "a creates in b");
    let del = DeleteRangeRequest { key: b("/projects/b/pods/secret"), ..Default::default() };
    denied(kv_a.delete_range(del).await, "a deletes b");
    let compact = etcdmux::pb::etcdserverpb::CompactionRequest { revision: 1, physical: false };
    denied(kv_a.compact(compact).await, "a compacts");

    let ttl = LeaseTimeToLiveRequest { id: lease, keys: true };
    let ttl_answer = lease_a.lease_time_to_live(ttl).await;
    assert!(
        ttl_answer.as_ref().map_or(true, |r| r.get_ref().ttl == -1 && r.get_ref().keys.is_empty()),
        "{ttl_answer:?}"
    );
    assert!(lease_a.lease_revoke(LeaseRevokeRequest { id: lease }).await.is_err(), "a revokes b's lease");
    let listed = lease_a.lease_leases(LeaseLeasesRequest {}).await.expect("a lists its leases").into_inner();
    assert!(listed.leases.iter().all(|l| l.id != lease), "b's lease listed for a: {listed:?}");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(LeaseKeepAliveRequest { id: lease }).await.expect("send");
    let mut kas =
        lease_a.lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("ka").into_inner();
    let ka = kas.message().await.expect("keepalive answer").expect("one");
    assert_eq!(ka.ttl, 0, "b's lease is unknown to a");

    // A's watch on B's keys is refused, and sees nothing of B's writes.
    let mut watch_a = WatchClient::new(ch_a.clone());
    let (wtx, wrx) = tokio::sync::mpsc::channel(4);
    let create = WatchCreateRequest { key: b("/projects/b/"), range_end: b("/projects/b0"), ..Default::default() };
    wtx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await.unwrap();
    let mut ws = watch_a.watch(tokio_stream::wrappers::ReceiverStream::new(wrx)).await.expect("watch").into_inner();
    let first = ws.message().await.expect("watch answer").expect("one");
    assert!(first.canceled && first.cancel_reason.contains("tenant b"), "{first:?}");
    kv_b.put(put("/projects/b/pods/secret", "b-data-2")).await.expect("b writes again");
    let more = tokio::time::timeout(Duration::from_millis(500), ws.message()).await;
    assert!(!matches!(&more, Ok(Ok(Some(r))) if !r.events.is_empty()), "a saw b's events: {more:?}");

    // B's data is intact, its lease alive.
    let all_b = RangeRequest { range_end: b("/projects/b/pods0"), ..get("/projects/b/pods/") };
    let kvs = kv_b.range(all_b).await.expect("b lists").into_inner().kvs;
    assert_eq!(kvs.len(), 1, "{kvs:?}");
    assert_eq!(kvs[0].value.as_ref(), b"b-data-2");
    let ttl = lease_b.lease_time_to_live(LeaseTimeToLiveRequest { id: lease, keys: false }).await.expect("ttl");
    assert!(ttl.into_inner().ttl > 0);

    // The admin (by map) reaches both; an unmapped certificate reaches nothing.
    let admin = pki.client("admin", "admin", vec![uri("spiffe://example.org/apiserver")]);
    let mut kv_admin = KvClient::new(tls_channel(addr, &pki, Some(&admin)).await.expect("admin channel"));
    kv_admin.range(get("/projects/b/pods/secret")).await.expect("admin reads b");
    let mut kv_x = KvClient::new(ch_x.clone());
    let s = denied(kv_x.range(get("/projects/x/pods/a")).await, "unmapped reads");
    assert!(s.message().contains("spiffe://other.org/project/x"), "{}", s.message());
    denied(kv_x.put(put("/projects/x/pods/a", "v")).await, "unmapped writes");
    // A Watch stream is refused before it opens.
    let (_xtx, xrx) = tokio::sync::mpsc::channel::<WatchRequest>(1);
    let s = denied(
        WatchClient::new(ch_x).watch(tokio_stream::wrappers::ReceiverStream::new(xrx)).await,
        "unmapped watches",
    );
    assert!(s.message().contains("spiffe://other.org/project/x"), "{}", s.message());
}
