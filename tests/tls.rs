//! TLS both ways: etcdmux in front of an etcd that requires client certificates,
//! clients over TLS (and mTLS) to etcdmux. Certificates are generated per test.

mod common;
#[path = "tls/pki.rs"]
mod pki;

use std::time::Duration;

use common::*;
use etcd_client::{GetOptions, WatchOptions};
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
