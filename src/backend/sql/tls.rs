//! TLS to the database: rustls (the same provider as every other TLS of etcdmux)
//! behind tokio-postgres's connector traits.
//!
//! With `backend.cacert` set, every connection (pool, change feed, schema check,
//! `backend init`) offers TLS, verifies the server's certificate against that CA and
//! its name (`backend.server_name`, else the DSN's host), and presents
//! `backend.cert` when given; the DSN's `sslmode` says whether a server without TLS
//! is refused (`require`) or used in clear (`prefer`). Without `cacert`, connections
//! are plain, as before.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Client, NoTls, Socket};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::certs::{provider, BoxError, TlsPaths};
use crate::config::BackendConfig;

/// How connections to the database are made: plain, or TLS with this config.
#[derive(Clone, Default)]
pub struct DbTls {
    config: Option<Arc<ClientConfig>>,
    server_name: Option<String>,
}

/// A connection's driver, as a stream of its asynchronous messages (notifications,
/// notices); it ends when the connection does.
pub type Messages = Pin<Box<dyn Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Send>>;

impl DbTls {
    /// From `[backend]`: the files read and checked now (a bad file stops the start).
    pub fn from_config(b: &BackendConfig) -> Result<DbTls, BoxError> {
        let Some(ca) = &b.cacert else { return Ok(DbTls::default()) };
        let paths = TlsPaths { cert: b.cert.clone(), key: b.key.clone(), ca: Some(ca.clone()) };
        let checked = paths.read()?.check()?;
        let mut roots = RootCertStore::empty();
        for c in checked.roots.iter().flatten() {
            roots.add(c.clone())?;
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match checked.identity {
            Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
            None => builder.with_no_client_auth(),
        };
        Ok(DbTls { config: Some(Arc::new(config)), server_name: b.server_name.clone() })
    }

    /// Opens one connection; its driver must be polled (to its end) for the client
    /// to work.
    pub async fn connect(&self, cfg: &tokio_postgres::Config) -> Result<(Client, Messages), tokio_postgres::Error> {
        match &self.config {
            None => {
                let (client, mut conn) = cfg.connect(NoTls).await?;
                Ok((client, Box::pin(futures::stream::poll_fn(move |cx| conn.poll_message(cx)))))
            }
            Some(config) => {
                let tls = MakeRustls { config: config.clone(), server_name: self.server_name.clone() };
                let (client, mut conn) = cfg.connect(tls).await?;
                Ok((client, Box::pin(futures::stream::poll_fn(move |cx| conn.poll_message(cx)))))
            }
        }
    }
}

/// `e` with its causes: tokio-postgres's own text ("error performing TLS
/// handshake") leaves out why.
pub fn explain(e: &tokio_postgres::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Drives a connection to its end; the error that ended it, if one did.
pub async fn drive(mut messages: Messages) -> Result<(), tokio_postgres::Error> {
    use futures::StreamExt;
    while let Some(m) = messages.next().await {
        m?;
    }
    Ok(())
}

struct MakeRustls {
    config: Arc<ClientConfig>,
    server_name: Option<String>,
}

impl MakeTlsConnect<Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = BoxError;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnect, BoxError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| format!("the database's name {name:?} cannot be checked against a certificate: {e}"))?;
        Ok(RustlsConnect { config: self.config.clone(), name })
    }
}

struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move { Ok(RustlsStream(Box::new(connector.connect(self.name, stream).await?))) })
    }
}

pub struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl tokio_postgres::tls::TlsStream for RustlsStream {
    /// No channel binding: SCRAM authenticates without it (`channel_binding=prefer`,
    /// the default, falls back), and the certificate check already pins the server.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}
