//! Clients of a TLS listener: a TLS channel to etcdmux, a put and get over a new
//! connection, and the listener's config.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use etcdmux::pb::etcdserverpb::kv_client::KvClient;
use etcdmux::pb::etcdserverpb::{PutRequest, RangeRequest};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::common::MILO_TOML;
use super::pki::{Pair, Pki};

/// One listener with TLS (`server`) and, with `client_ca`, client certificates
/// required from that CA; MILO_TOML's tenancy, then `extra`.
pub fn listener_toml(server: &Pair, client_ca: Option<&Pki>, extra: &str) -> String {
    listener_toml_at(&server.cert, &server.key, client_ca.map(|p| p.ca_file.as_path()), extra)
}

/// [`listener_toml`] with the files at these paths.
pub fn listener_toml_at(cert: &Path, key: &Path, client_ca: Option<&Path>, extra: &str) -> String {
    let mut l = format!(
        "addr = \"127.0.0.1:0\"\ncert_file = {:?}\nkey_file = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    if let Some(ca) = client_ca {
        l += &format!("trusted_ca_file = {:?}\nclient_cert_auth = true\n", ca.display().to_string());
    }
    format!("{}\n{extra}", MILO_TOML.replacen("addr = \"127.0.0.1:0\"\n", &l, 1))
}

/// A gRPC channel to etcdmux at `addr` over TLS, trusting `ca`, with `cert` as the
/// client certificate.
pub async fn tls_channel(addr: SocketAddr, ca: &Pki, cert: Option<&Pair>) -> Result<Channel, String> {
    let read = |p: &std::path::Path| std::fs::read(p).expect("reading a test pem");
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&ca.ca_file)));
    if let Some(c) = cert {
        tls = tls.identity(Identity::from_pem(read(&c.cert), read(&c.key)));
    }
    let ep = Endpoint::from_shared(format!("https://127.0.0.1:{}", addr.port())).map_err(|e| e.to_string())?;
    let ep = ep.tls_config(tls).map_err(|e| e.to_string())?.connect_timeout(Duration::from_secs(5));
    ep.connect().await.map_err(|e| format!("{e:?}"))
}

pub fn b(s: &str) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(s.as_bytes())
}

pub fn put(key: &str, value: &str) -> PutRequest {
    PutRequest { key: b(key), value: b(value), ..Default::default() }
}

pub fn get(key: &str) -> RangeRequest {
    RangeRequest { key: b(key), ..Default::default() }
}

/// A put then a get of `key` on a new TLS connection; the error of the first
/// step that fails (the handshake, or the first call after it: with TLS 1.3 a
/// client learns of a refused certificate on its first read).
pub async fn put_get(addr: SocketAddr, ca: &Pki, cert: Option<&Pair>, key: &str) -> Result<Vec<u8>, String> {
    let mut kv = KvClient::new(tls_channel(addr, ca, cert).await?);
    let call = async {
        kv.put(put(key, "v")).await?;
        kv.range(get(key)).await
    };
    let resp = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| "no answer in 10s".to_string())?
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(resp.into_inner().kvs.first().map(|kv| kv.value.to_vec()).unwrap_or_default())
}
