//! Certificate rotation without a restart (`server.tls_reload_interval_ms`), against
//! a real etcd with TLS and real clients: the listener's certificate and client CA,
//! and etcdmux's own certificates towards etcd, each swapped the way the kubelet
//! updates a mounted Secret, while watch streams stay open. Bad files are refused
//! and the old ones keep serving; TLS handshakes are bounded in number and time.
//! The tests read process-wide metrics, so they run one at a time.

#[path = "tls/clients.rs"]
mod clients;
mod common;
#[path = "tls/pki.rs"]
mod pki;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use clients::{b, listener_toml, listener_toml_at, put, put_get, tls_channel};
use common::*;
use etcd_client::{GetOptions, WatchOptions};
use etcdmux::metrics::names;
use etcdmux::pb::etcdserverpb::kv_client::KvClient;
use etcdmux::pb::etcdserverpb::watch_client::WatchClient;
use etcdmux::pb::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest, WatchResponse};
use pki::{jan1, Pki, SecretDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::Streaming;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Checks files every 100 ms.
const RELOAD_FAST: &str = "[server]\ntls_reload_interval_ms = 100\n";

/// The sum of metric `name`'s series that carry every one of `labels`.
fn metric(name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = etcdmux::metrics::install().expect("metrics recorder").render();
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

fn reloads(target: &str, result: &str) -> f64 {
    metric(names::TLS_RELOADS, &[("target", target), ("result", result)])
}

fn expiry(target: &str, file: &Path) -> f64 {
    metric(names::TLS_CERT_EXPIRY, &[("target", target), ("file", &file.display().to_string())])
}

/// Runs `f` until it succeeds (every 100 ms, for up to 20 s); panics with its last error.
async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("{what}: still failing after 20s: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A watch on every key under `prefix` over `ch`, created; keep the sender to keep
/// the stream open.
async fn open_watch(ch: Channel, prefix: &str) -> (mpsc::Sender<WatchRequest>, Streaming<WatchResponse>) {
    let (tx, rx) = mpsc::channel(4);
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("a prefix") += 1;
    let create = WatchCreateRequest { key: b(prefix), range_end: bytes::Bytes::from(end), ..Default::default() };
    tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) })
        .await
        .expect("send create");
    let mut ws = WatchClient::new(ch)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("watch over TLS")
        .into_inner();
    let created = ws.message().await.expect("watch stream").expect("created");
    assert!(created.created, "{created:?}");
    (tx, ws)
}

/// The key of the next event on `ws`; panics on a stream error or end.
async fn next_key(ws: &mut Streaming<WatchResponse>) -> String {
    let resp = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let r = ws.message().await.expect("the watch stream has no error").expect("the watch stream is open");
            if !r.events.is_empty() {
                return r;
            }
        }
    })
    .await
    .expect("an event within 10s");
    let kv = resp.events[0].kv.as_ref().expect("kv");
    String::from_utf8_lossy(&kv.key).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_rotation_to_a_new_ca_keeps_open_watches() {
    let _serial = SERIAL.lock().await;
    etcdmux::metrics::install().expect("metrics recorder");
    let (old, new) = (Pki::new("old"), Pki::new("new"));
    let (server_old, server_new) = (old.server("etcdmux"), new.server_until("etcdmux-new", 2040));
    let mut secret = SecretDir::new(&[("tls.crt", &server_old.cert), ("tls.key", &server_old.key)]);
    let (crt, key) = (secret.path("tls.crt"), secret.path("tls.key"));
    let etcd = Etcd::start();
    let (running, _) =
        start_mux_with(&listener_toml_at(&crt, &key, None, RELOAD_FAST), vec![etcd.client_url.clone()]).await;
    let addr = running.addrs[0];
    let (ok, error) = (reloads("listener", "ok"), reloads("listener", "error"));

    // A client of the old CA watches, on one connection with its KV calls.
    let ch = tls_channel(addr, &old, None).await.expect("a client of the old CA");
    let (_tx, mut ws) = open_watch(ch.clone(), "/projects/a/pods/").await;
    let mut kv = KvClient::new(ch);
    kv.put(put("/projects/a/pods/before", "v")).await.expect("put");
    assert_eq!(next_key(&mut ws).await, "/projects/a/pods/before");
    assert!(put_get(addr, &new, None, "/projects/a/pods/x").await.is_err(), "the new CA is not in use yet");

    secret.update(&[("tls.crt", &server_new.cert), ("tls.key", &server_new.key)]);
    // A client that trusts only the new CA gets in once the listener reloaded.
    until("a client of the new CA", || put_get(addr, &new, None, "/projects/a/pods/after")).await;
    assert_eq!(next_key(&mut ws).await, "/projects/a/pods/after", "the old watch stream goes on");
    kv.put(put("/projects/a/pods/old-conn", "v")).await.expect("the old connection still serves calls");
    assert_eq!(next_key(&mut ws).await, "/projects/a/pods/old-conn");
    let refused = put_get(addr, &old, None, "/projects/a/pods/y").await;
    assert!(refused.is_err(), "new connections get the new certificate: {refused:?}");

    assert_eq!(reloads("listener", "ok") - ok, 1.0);
    assert_eq!(reloads("listener", "error") - error, 0.0);
    assert_eq!(expiry("listener", &crt), jan1(2040) as f64);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_client_ca_rotation() {
    let _serial = SERIAL.lock().await;
    let server_pki = Pki::new("server");
    let server = server_pki.server("etcdmux");
    let (ca_old, ca_new) = (Pki::new("clients-old"), Pki::new("clients-new"));
    let mut secret =
        SecretDir::new(&[("tls.crt", &server.cert), ("tls.key", &server.key), ("ca.crt", &ca_old.ca_file)]);
    let toml =
        listener_toml_at(&secret.path("tls.crt"), &secret.path("tls.key"), Some(&secret.path("ca.crt")), RELOAD_FAST);
    let etcd = Etcd::start();
    let (running, _) = start_mux_with(&toml, vec![etcd.client_url.clone()]).await;
    let addr = running.addrs[0];
    let (client_old, client_new) =
        (ca_old.client("old", "apiserver", vec![]), ca_new.client("new", "apiserver", vec![]));

    let mut established = KvClient::new(tls_channel(addr, &server_pki, Some(&client_old)).await.expect("old client"));
    established.put(put("/projects/a/pods/1", "v")).await.expect("a client of the old CA");
    assert!(put_get(addr, &server_pki, Some(&client_new), "/projects/a/pods/2").await.is_err(), "not trusted yet");

    secret.update(&[("tls.crt", &server.cert), ("tls.key", &server.key), ("ca.crt", &ca_new.ca_file)]);
    until("a client certificate of the new CA", || put_get(addr, &server_pki, Some(&client_new), "/projects/a/pods/3"))
        .await;
    let refused = put_get(addr, &server_pki, Some(&client_old), "/projects/a/pods/4").await;
    assert!(refused.is_err(), "a new connection with the old CA's certificate is refused: {refused:?}");
    established.put(put("/projects/a/pods/5", "v")).await.expect("the established connection is untouched");
    running.shutdown().await;
}

/// An etcd serving https:// with the certificate files under `dir` (`ca.pem`,
/// `server.pem`, `server-key.pem`), requiring client certificates from `ca.pem`.
fn tls_etcd_in(dir: &Path) -> Etcd {
    let f = |name: &str| dir.join(name).display().to_string();
    Etcd::builder()
        .https()
        .args(["--client-cert-auth", "--trusted-ca-file", &f("ca.pem")])
        .args(["--cert-file", &f("server.pem"), "--key-file", &f("server-key.pem")])
        .start()
}

/// Puts `pki`'s CA and a server certificate of it into `dir` for [`tls_etcd_in`].
fn etcd_files(dir: &Path, pki: &Pki) {
    let server = pki.server("etcd");
    for (from, to) in [(&pki.ca_file, "ca.pem"), (&server.cert, "server.pem"), (&server.key, "server-key.pem")] {
        std::fs::copy(from, dir.join(to)).expect("etcd's files");
    }
}

/// MILO_TOML (checking files every 100 ms) with `[upstream]` TLS from the `ca.crt`,
/// `tls.crt` and `tls.key` of `secret`.
fn upstream_toml(secret: &SecretDir) -> String {
    let p = |n: &str| secret.path(n).display().to_string();
    format!(
        "{MILO_TOML}\n{RELOAD_FAST}\n[upstream]\ncacert = {:?}\ncert = {:?}\nkey = {:?}\n",
        p("ca.crt"),
        p("tls.crt"),
        p("tls.key")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_rotation_to_new_cas() {
    let _serial = SERIAL.lock().await;
    etcdmux::metrics::install().expect("metrics recorder");
    let etcd_dir = tempfile::tempdir().expect("temp dir");
    let (old, new) = (Pki::new("etcd-old"), Pki::new("etcd-new"));
    etcd_files(etcd_dir.path(), &old);
    let mut etcd = tls_etcd_in(etcd_dir.path());
    let client_old = old.client("etcdmux", "etcdmux", vec![]);
    let mut secret =
        SecretDir::new(&[("ca.crt", &old.ca_file), ("tls.crt", &client_old.cert), ("tls.key", &client_old.key)]);
    let (running, url) = start_mux_with(&upstream_toml(&secret), vec![etcd.client_url.clone()]).await;
    let c = client(&url).await;
    let get = |key: &'static str| {
        let mut c = c.clone();
        async move {
            match tokio::time::timeout(Duration::from_secs(3), c.get(key, None)).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer in 3s".to_string()),
            }
        }
    };
    c.clone().put("/projects/a/pods/x", "v1", None).await.expect("put through etcdmux");
    let ok = reloads("upstream", "ok");

    // etcd moves to a server certificate of a new CA and trusts only the new client CA.
    etcd_files(etcd_dir.path(), &new);
    tokio::task::block_in_place(|| etcd.restart());
    assert!(get("/projects/a/pods/x").await.is_err(), "etcdmux with the old files cannot reach etcd");

    let client_new = new.client("etcdmux", "etcdmux", vec![]);
    secret.update(&[("ca.crt", &new.ca_file), ("tls.crt", &client_new.cert), ("tls.key", &client_new.key)]);
    let got = until("a get through etcdmux after the rotation", || get("/projects/a/pods/x")).await;
    assert_eq!(got.kvs()[0].value(), b"v1");
    c.clone().put("/projects/a/pods/y", "v2", None).await.expect("a put after the rotation");
    assert_eq!(reloads("upstream", "ok") - ok, 1.0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_client_cert_rotation_keeps_the_hub_watch() {
    let _serial = SERIAL.lock().await;
    etcdmux::metrics::install().expect("metrics recorder");
    let etcd_dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new("etcd");
    etcd_files(etcd_dir.path(), &pki);
    let etcd = tls_etcd_in(etcd_dir.path());
    let (first, second) = (pki.client("etcdmux", "etcdmux", vec![]), pki.client_until("etcdmux-2", "etcdmux", 2040));
    let mut secret = SecretDir::new(&[("ca.crt", &pki.ca_file), ("tls.crt", &first.cert), ("tls.key", &first.key)]);
    let (running, url) = start_mux_with(&upstream_toml(&secret), vec![etcd.client_url.clone()]).await;
    let mut c = client(&url).await;
    let mut events =
        c.watch("/projects/a/pods/", Some(WatchOptions::new().with_prefix())).await.expect("watch through etcdmux");
    assert!(events.message().await.expect("watch stream").expect("created").created());
    let mut next = async |c: &mut etcd_client::Client, key: &str| {
        c.put(key, "v", None).await.expect("put through etcdmux");
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let r = events.message().await.expect("the watch has no error").expect("the watch is open");
                if !r.events().is_empty() {
                    return r;
                }
            }
        })
        .await
        .expect("the event within 10s");
        assert_eq!(r.events()[0].kv().map(|kv| kv.key().to_vec()), Some(key.as_bytes().to_vec()));
    };
    next(&mut c, "/projects/a/pods/1").await;
    let restarts = metric(names::WATCH_UPSTREAM_RESTARTS, &[]);
    let (ok, error) = (reloads("upstream", "ok"), reloads("upstream", "error"));

    // A half-written key is refused; the files in use keep serving.
    let garbage = etcd_dir.path().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN PRIVATE KEY-----\nMIGH").expect("garbage");
    secret.update(&[("ca.crt", &pki.ca_file), ("tls.crt", &second.cert), ("tls.key", &garbage)]);
    until("the refusal counted", || async {
        if reloads("upstream", "error") > error {
            Ok(())
        } else {
            Err("no error counted".to_string())
        }
    })
    .await;
    next(&mut c, "/projects/a/pods/2").await;

    secret.update(&[("ca.crt", &pki.ca_file), ("tls.crt", &second.cert), ("tls.key", &second.key)]);
    let cert = secret.path("tls.crt");
    until("the new client certificate in use", || async {
        if expiry("upstream", &cert) == jan1(2040) as f64 {
            Ok(())
        } else {
            Err("old expiry".to_string())
        }
    })
    .await;
    assert_eq!(reloads("upstream", "ok") - ok, 1.0);
    // New calls go over new channels; the hub's upstream watch was not restarted.
    next(&mut c, "/projects/a/pods/3").await;
    let got = c.get("/projects/a/pods/", Some(GetOptions::new().with_prefix())).await.expect("get");
    assert_eq!(got.kvs().len(), 3);
    assert_eq!(metric(names::WATCH_UPSTREAM_RESTARTS, &[]) - restarts, 0.0, "the hub's upstream watch restarted");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_listener_files_are_refused_and_the_old_ones_serve() {
    let _serial = SERIAL.lock().await;
    etcdmux::metrics::install().expect("metrics recorder");
    let (old, new) = (Pki::new("old"), Pki::new("new"));
    let (server_old, server_new) = (old.server("etcdmux"), new.server("etcdmux"));
    let mut secret = SecretDir::new(&[("tls.crt", &server_old.cert), ("tls.key", &server_old.key)]);
    let toml = listener_toml_at(&secret.path("tls.crt"), &secret.path("tls.key"), None, RELOAD_FAST);
    let etcd = Etcd::start();
    let (running, _) = start_mux_with(&toml, vec![etcd.client_url.clone()]).await;
    let addr = running.addrs[0];
    let (ok, error) = (reloads("listener", "ok"), reloads("listener", "error"));
    let refusals_above = |n: f64| async move {
        if reloads("listener", "error") > n {
            Ok(reloads("listener", "error"))
        } else {
            Err("none".to_string())
        }
    };

    // Garbage as the certificate.
    let dir = tempfile::tempdir().expect("temp dir");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").expect("garbage");
    secret.update(&[("tls.crt", &garbage), ("tls.key", &server_old.key)]);
    let seen = until("garbage refused", || refusals_above(error)).await;
    put_get(addr, &old, None, "/projects/a/pods/1").await.expect("the old certificate still serves");

    // Half a rotation: the new certificate with the old key.
    secret.update(&[("tls.crt", &server_new.cert), ("tls.key", &server_old.key)]);
    until("a mismatched pair refused", || refusals_above(seen)).await;
    put_get(addr, &old, None, "/projects/a/pods/2").await.expect("the old certificate still serves");
    assert!(put_get(addr, &new, None, "/projects/a/pods/3").await.is_err());
    assert_eq!(reloads("listener", "ok") - ok, 0.0);

    // The rest of it arrives.
    secret.update(&[("tls.crt", &server_new.cert), ("tls.key", &server_new.key)]);
    until("the new pair", || put_get(addr, &new, None, "/projects/a/pods/4")).await;
    assert_eq!(reloads("listener", "ok") - ok, 1.0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_are_bounded_in_number_and_time() {
    let _serial = SERIAL.lock().await;
    etcdmux::metrics::install().expect("metrics recorder");
    let pki = Pki::new("clients");
    let server = pki.server("etcdmux");
    let extra = "[server]\ntls_handshake_timeout_ms = 1000\ntls_max_handshakes = 1\n";
    let etcd = Etcd::start();
    let (running, _) = start_mux_with(&listener_toml(&server, None, extra), vec![etcd.client_url.clone()]).await;
    let addr: SocketAddr = running.addrs[0];
    let failures = |reason: &str| metric(names::TLS_HANDSHAKE_FAILURES, &[("reason", reason)]);
    let (timeouts, tls_errors) = (failures("timeout"), failures("tls"));

    // A client that connects and says nothing holds the only handshake slot ...
    let mut silent = tokio::net::TcpStream::connect(addr).await.expect("tcp connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    // ... until its handshake times out; then the next client gets in.
    // (a TLS client's connect timeout does not cover the handshake: bound it here)
    let first = tokio::time::timeout(Duration::from_secs(10), put_get(addr, &pki, None, "/projects/a/pods/1")).await;
    first.expect("in time").expect("a TLS client after the silent one");
    assert!(start.elapsed() >= Duration::from_millis(500), "waited for the slot: {:?}", start.elapsed());
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the silent client is disconnected: {closed:?}");
    assert_eq!(failures("timeout") - timeouts, 1.0);

    // A client that speaks something else fails its handshake; accepting goes on.
    let mut junk = tokio::net::TcpStream::connect(addr).await.expect("tcp connect");
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let _ = tokio::time::timeout(Duration::from_secs(5), junk.read(&mut buf)).await;
    put_get(addr, &pki, None, "/projects/a/pods/2").await.expect("a TLS client after the junk");
    assert_eq!(failures("tls") - tls_errors, 1.0);
    running.shutdown().await;
}
