//! Bad input gets a clear gRPC error — etcd's own where etcd has one — never a
//! panic, never a partial answer, and nothing is written. Each case is sent to
//! etcdmux and, where etcd has the same case, straight to etcd, and the errors are
//! compared.

mod common;

use bytes::Bytes;
use etcdmux::pb::etcdserverpb::{kv_client::KvClient, CompactionRequest, PutRequest, RangeRequest};
use tonic::transport::Channel;
use tonic::Code;

async fn revision(c: &mut KvClient<Channel>) -> i64 {
    let r = c.range(RangeRequest { key: Bytes::from_static(b"\0"), ..Default::default() }).await.unwrap();
    r.into_inner().header.unwrap().revision
}

fn err<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(resp) => panic!("expected an error, got {resp:?}"),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// The revision of the storage behind etcdmux, read from the storage itself.
async fn stored_revision(store: &common::StoreGuard) -> i64 {
    match store {
        common::StoreGuard::Etcd(etcd) => {
            revision(&mut KvClient::connect(etcd.client_url.clone()).await.unwrap()).await
        }
        common::StoreGuard::Sql(pg) => pg.psql("SELECT revision FROM etcdmux_head").trim().parse().expect("a revision"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_match_etcd_and_write_nothing() {
    errors_match_etcd_and_write_nothing_on(common::Store::Etcd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_sql_backend_errors_match_etcd_and_write_nothing() {
    errors_match_etcd_and_write_nothing_on(common::Store::Sql).await
}

async fn errors_match_etcd_and_write_nothing_on(store: common::Store) {
    let direct_etcd = common::Etcd::start();
    let (mux, storage) = common::start_on(store, common::MILO_TOML).await;
    let mut m = KvClient::connect(mux.url.clone())
        .await
        .unwrap()
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20);
    let mut d = KvClient::connect(direct_etcd.client_url.clone()).await.unwrap().max_encoding_message_size(8 << 20);

    // Some history, then a compaction, on both sides.
    for i in 0..5 {
        m.put(PutRequest { key: b("/projects/p/pods/ns/a"), value: b(&i.to_string()), ..Default::default() })
            .await
            .unwrap();
        d.put(PutRequest { key: b("/projects/p/pods/ns/a"), value: b(&i.to_string()), ..Default::default() })
            .await
            .unwrap();
    }
    m.compact(CompactionRequest { revision: 4, physical: true }).await.unwrap();
    d.compact(CompactionRequest { revision: 4, physical: true }).await.unwrap();
    let before = stored_revision(&storage).await;

    // Same request, same error as etcd.
    let same: Vec<(&str, PutRequest)> = vec![
        ("empty key", PutRequest { key: Bytes::new(), value: b("v"), ..Default::default() }),
        (
            "value over etcd's request limit",
            PutRequest {
                key: b("/projects/p/pods/ns/big"),
                value: Bytes::from(vec![b'x'; 1_600_000]),
                ..Default::default()
            },
        ),
        (
            "unknown lease",
            PutRequest { key: b("/projects/p/pods/ns/l"), value: b("v"), lease: 0x1234, ..Default::default() },
        ),
        (
            "ignore_value on a missing key",
            PutRequest { key: b("/projects/p/pods/ns/none"), ignore_value: true, ..Default::default() },
        ),
    ];
    for (what, req) in same {
        let via_mux = err(m.put(req.clone()).await);
        let direct = err(d.put(req).await);
        assert_eq!(via_mux, direct, "{what}");
    }
    let ranges: Vec<(&str, RangeRequest)> = vec![
        ("empty key", RangeRequest { key: Bytes::new(), range_end: b("\0"), ..Default::default() }),
        ("compacted revision", RangeRequest { key: b("/projects/p/pods/ns/a"), revision: 2, ..Default::default() }),
        (
            "future revision",
            RangeRequest { key: b("/projects/p/pods/ns/a"), revision: 1_000_000, ..Default::default() },
        ),
        (
            "compacted revision across roots",
            RangeRequest { key: b("/projects/p/"), range_end: b("/projects/p0"), revision: 2, ..Default::default() },
        ),
        (
            "future revision across roots",
            RangeRequest {
                key: b("/projects/p/"),
                range_end: b("/projects/p0"),
                revision: 1_000_000,
                ..Default::default()
            },
        ),
    ];
    for (what, req) in ranges {
        let via_mux = err(m.range(req.clone()).await);
        let direct = err(d.range(req).await);
        assert_eq!(via_mux, direct, "{what}");
    }
    let (code, msg) =
        err(m.range(RangeRequest { key: b("/projects/p/pods/ns/a"), revision: 2, ..Default::default() }).await);
    assert_eq!((code, msg.as_str()), (Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted"));

    // A value too large for any gRPC server is refused by etcdmux before etcd.
    let huge = PutRequest {
        key: b("/projects/p/pods/ns/huge"),
        value: Bytes::from(vec![b'x'; 4 << 20]),
        ..Default::default()
    };
    let (code, _) = err(m.put(huge).await);
    assert!(matches!(code, Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument), "{code:?}");

    // etcdmux's own refusals: clear codes and messages naming the problem.
    let own: Vec<(&str, RangeRequest, Code, &str)> = vec![
        (
            "unmatched key",
            RangeRequest { key: b("/elsewhere/x"), ..Default::default() },
            Code::InvalidArgument,
            "matches no tenant rule",
        ),
        (
            "cross-tenant range",
            RangeRequest { key: b("/projects/p/a"), range_end: b("/projects/q/a"), ..Default::default() },
            Code::InvalidArgument,
            "may not span tenants",
        ),
        (
            "empty tenant",
            RangeRequest { key: b("/projects//pods/x"), ..Default::default() },
            Code::InvalidArgument,
            "invalid tenant name",
        ),
        (
            "reserved tenant",
            RangeRequest { key: b("/projects/root/pods/x"), ..Default::default() },
            Code::InvalidArgument,
            "reserved",
        ),
        (
            "non-UTF-8 tenant",
            RangeRequest { key: Bytes::from_static(b"/projects/\xff/pods/x"), ..Default::default() },
            Code::InvalidArgument,
            "UTF-8",
        ),
        (
            "control character",
            RangeRequest { key: b("/projects/a\nb/pods/x"), ..Default::default() },
            Code::InvalidArgument,
            "control character",
        ),
    ];
    for (what, req, code, text) in own {
        let (c, msg) = err(m.range(req.clone()).await);
        assert_eq!(c, code, "{what}: {msg}");
        assert!(msg.contains(text), "{what}: {msg:?} should mention {text:?}");
        if req.range_end.is_empty() {
            let put = PutRequest { key: req.key.clone(), value: b("v"), ..Default::default() };
            assert!(m.put(put).await.is_err(), "{what}: put must fail too");
        }
    }

    // Nothing above was written; the server still serves.
    assert_eq!(stored_revision(&storage).await, before, "a refused request wrote something");
    let ok =
        m.range(RangeRequest { key: b("/projects/p/pods/ns/a"), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(ok.kvs[0].value, b("4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_tenants_may_not_compact_or_write_globals() {
    static_tenants_may_not_compact_or_write_globals_on(common::Store::Etcd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_sql_backend_static_tenants_may_not_compact_or_write_globals() {
    static_tenants_may_not_compact_or_write_globals_on(common::Store::Sql).await
}

async fn static_tenants_may_not_compact_or_write_globals_on(store: common::Store) {
    let (mux, _behind) = common::start_on(store, &common::static_toml("p")).await;
    let mut m = KvClient::connect(mux.url.clone()).await.unwrap();
    m.put(PutRequest { key: b("/pods/a"), value: b("v"), ..Default::default() }).await.unwrap();
    let (code, msg) = err(m.compact(CompactionRequest { revision: 1, physical: false }).await);
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("Compact") && msg.contains("admin"), "{msg}");
    let (code, _) = err(m.put(PutRequest { key: b("compact_rev_key"), value: b("1"), ..Default::default() }).await);
    assert_eq!(code, Code::PermissionDenied);
    // Reading the global key is fine.
    m.range(RangeRequest { key: b("compact_rev_key"), ..Default::default() }).await.unwrap();
}
