//! TLS to the SQL backend's database: a PostgreSQL that refuses plain TCP
//! connections (`hostnossl ... reject`), reached by `etcdmux backend init` and by a
//! running etcdmux only with `backend.cacert`; a wrong CA, a wrong name or no TLS
//! is refused with the reason.

mod common;
#[path = "tls/pki.rs"]
mod pki;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Postgres, MILO_TOML};
use etcd_client::{GetOptions, WatchOptions};

const MUX: &str = env!("CARGO_BIN_EXE_etcdmux");

/// A config for the SQL backend at `pg` with `tls` (TOML lines of `[backend]`).
fn config(dir: &Path, pg: &Postgres, tls: &str) -> std::path::PathBuf {
    config_as(dir, &pg.dsn, tls)
}

fn config_as(dir: &Path, dsn: &str, tls: &str) -> std::path::PathBuf {
    let path = dir.join("mux.toml");
    let text = format!("{MILO_TOML}\n[backend]\nkind = \"sql\"\ndsn = \"{dsn} sslmode=require\"\n{tls}\n");
    std::fs::write(&path, text).expect("writing the config");
    path
}

fn backend_init(config: &Path) -> Output {
    Command::new(MUX)
        .arg("--config")
        .arg(config)
        .args(["backend", "init"])
        .stdin(Stdio::null())
        .output()
        .expect("running etcdmux backend init")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_requires_tls_is_reached_with_backend_cacert_only() {
    let ca = pki::Pki::new("db");
    let server = ca.server("db");
    let mut pg = Postgres::start();
    pg.require_tls(&server.cert, &server.key);
    let dir = tempfile::tempdir().expect("temp dir");

    // Refused, each with its reason: no TLS, another CA, another name.
    let plain = config(dir.path(), &pg, "");
    let out = backend_init(&plain);
    assert!(!out.status.success(), "init without TLS: {}", text(&out));
    assert!(text(&out).contains("TLS"), "says TLS was not offered: {}", text(&out));

    let other = pki::Pki::new("other");
    let wrong_ca = config(dir.path(), &pg, &format!("cacert = {:?}", other.ca_file));
    let out = backend_init(&wrong_ca);
    assert!(!out.status.success(), "init with another CA: {}", text(&out));
    assert!(text(&out).contains("certificate"), "says the certificate is not trusted: {}", text(&out));

    let wrong_name = config(dir.path(), &pg, &format!("cacert = {:?}\nserver_name = \"db.example\"", ca.ca_file));
    let out = backend_init(&wrong_name);
    assert!(!out.status.success(), "init with another name: {}", text(&out));
    assert!(text(&out).contains("certificate"), "says the name does not match: {}", text(&out));

    // Reached with the CA: init, then etcdmux serves puts, ranges and watches.
    let good = config(dir.path(), &pg, &format!("cacert = {:?}", ca.ca_file));
    let out = backend_init(&good);
    assert!(out.status.success(), "init over TLS: {}", text(&out));
    let (_mux, url) = common::spawn_mux_process(&good).await;
    let mut c = etcd_client::Client::connect([url.as_str()], None).await.expect("connecting");
    let mut w = c.watch("/projects/a/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
    assert!(w.message().await.expect("watch stream").expect("created").created());
    c.put("/projects/a/pods/ns/x", "v", None).await.expect("put over a TLS database connection");
    let got = c.get("/projects/a/", Some(GetOptions::new().with_prefix())).await.expect("get");
    assert_eq!(got.kvs().len(), 1);
    let ev = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let r = w.message().await.expect("watch stream").expect("open");
            if let Some(e) = r.events().first() {
                return e.kv().expect("kv").key_str().expect("utf-8").to_string();
            }
        }
    })
    .await
    .expect("the event within 10 s");
    assert_eq!(ev, "/projects/a/pods/ns/x");
    // Every connection etcdmux holds is encrypted (the server refuses any other).
    let encrypted = pg.psql(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'etcdmux' AND s.ssl",
    );
    assert!(encrypted.trim().parse::<u32>().unwrap_or(0) >= 1, "etcdmux's connections use TLS: {encrypted}");
}

#[test]
fn a_client_certificate_is_presented_from_backend_cert_and_key() {
    let ca = pki::Pki::new("db");
    let server = ca.server("db");
    let mut pg = Postgres::start();
    pg.require_tls(&server.cert, &server.key);
    pg.require_client_cert(&ca.ca_file, "certuser");
    let dsn = pg.dsn.replace("user=etcdmux", "user=certuser");
    let dir = tempfile::tempdir().expect("temp dir");

    let without = config_as(dir.path(), &dsn, &format!("cacert = {:?}", ca.ca_file));
    let out = backend_init(&without);
    assert!(!out.status.success(), "init without a client certificate: {}", text(&out));
    assert!(text(&out).contains("certificate"), "says a certificate is needed: {}", text(&out));

    let client = ca.client("certuser", "certuser", vec![]);
    let tls = format!("cacert = {:?}\ncert = {:?}\nkey = {:?}", ca.ca_file, client.cert, client.key);
    let with = config_as(dir.path(), &dsn, &tls);
    let out = backend_init(&with);
    assert!(out.status.success(), "init with the client certificate: {}", text(&out));
    assert!(pg.psql("SELECT count(*) FROM etcdmux_head").trim() == "1", "the schema was created as certuser");
}
