//! TLS towards clients: a listener's TLS settings (swapped when its files change),
//! and the scope of a request on an mTLS listener, read from its client certificate.
//!
//! The rustls config in use is read once per handshake ([`ServerTls::current`]), so
//! a new certificate or client CA applies to connections accepted after the swap;
//! established connections and their streams keep the one they were accepted with.

use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tonic::Request;
use x509_parser::extensions::GeneralName;

use crate::certs::{provider, BoxError, Checked, Reloader, TlsPaths};
use crate::config::ListenerConfig;
use crate::error::{Error, Result};
use crate::keyspace::{IdentityField, Resolver, Scope};

/// h2's ALPN id: gRPC clients ask for it.
const ALPN_H2: &[u8] = b"h2";

/// A listener's TLS config, shared by its accept loop and its reloader.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ServerTls {
    /// The TLS of listener `l` and the reloader that keeps it current; `None` for a
    /// plaintext listener. With `client_cert_auth`, a client without a certificate
    /// from `trusted_ca_file` is refused at the handshake.
    pub fn load(l: &ListenerConfig) -> std::result::Result<Option<(ServerTls, Reloader)>, BoxError> {
        let (Some(cert), Some(key)) = (&l.cert_file, &l.key_file) else { return Ok(None) };
        let ca = if l.client_cert_auth { l.trusted_ca_file.clone() } else { None };
        let paths = TlsPaths { cert: Some(cert.clone()), key: Some(key.clone()), ca };
        let files = paths.read()?.check()?;
        let tls = ServerTls { config: Arc::new(RwLock::new(Arc::new(server_config(&files)?))) };
        let swapped = tls.clone();
        let apply = Box::new(move |files: &Checked| {
            let config = Arc::new(server_config(files)?);
            *swapped.config.write().unwrap_or_else(|p| p.into_inner()) = config;
            Ok(())
        });
        let reloader = Reloader::new("listener", l.addr.to_string(), paths, &files, apply);
        Ok(Some((tls, reloader)))
    }

    /// The config for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// rustls's server config from checked files: the certificate, h2 by ALPN, and with
/// a CA bundle, client certificates required from it.
fn server_config(files: &Checked) -> std::result::Result<ServerConfig, BoxError> {
    let id = files.identity.as_ref().ok_or("a listener's TLS needs cert_file and key_file")?;
    let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match &files.roots {
        Some(roots) => {
            let mut store = RootCertStore::empty();
            for c in roots {
                store.add(c.clone())?;
            }
            builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(store.into(), provider()).build()?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(id.chain.clone(), id.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A client's certificate chain, as tonic's connect info gives it.
pub type PeerCerts = Arc<Vec<CertificateDer<'static>>>;

/// Where a listener's requests get their [`Scope`]: the listener's own, or, on a
/// listener with `client_cert_auth` under `[tenancy.identity]`, the listener's with
/// the principal of each request's client certificate.
#[derive(Debug, Clone)]
pub struct ScopeSource {
    listener: Scope,
    from_cert: bool,
}

impl ScopeSource {
    pub fn new(resolver: &Resolver, l: &ListenerConfig) -> Result<ScopeSource> {
        let listener = resolver.scope(l.static_tenant.as_deref())?;
        Ok(ScopeSource { listener, from_cert: l.client_cert_auth && resolver.identity().is_some() })
    }

    /// The scope of one request.
    pub fn of<T>(&self, resolver: &Resolver, req: &Request<T>) -> Result<Scope> {
        self.of_certs(resolver, || req.peer_certs())
    }

    /// The scope of a request on a connection whose client certificates `certs`
    /// gives (read only when the listener takes identities from them).
    pub fn of_certs(&self, resolver: &Resolver, certs: impl FnOnce() -> Option<PeerCerts>) -> Result<Scope> {
        if !self.from_cert {
            return Ok(self.listener.clone());
        }
        let Some(rules) = resolver.identity() else { return Ok(self.listener.clone()) };
        let certs = certs();
        let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
            return Err(Error::PermissionDenied("the request carries no client certificate".to_string()));
        };
        let values = cert_values(leaf, rules.from)?;
        let scope = resolver.cert_scope(&self.listener, &values)?;
        crate::trace::record_tenant(scope.principal.as_str());
        Ok(scope)
    }
}

/// A listener's own scope for every request (no identity from certificates).
impl From<Scope> for ScopeSource {
    fn from(listener: Scope) -> ScopeSource {
        ScopeSource { listener, from_cert: false }
    }
}

/// The values of `field` in a DER client certificate (already verified by the TLS
/// handshake against the listener's trusted CA).
fn cert_values(der: &[u8], field: IdentityField) -> Result<Vec<String>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::PermissionDenied(format!("unreadable client certificate: {e}")))?;
    let values = match field {
        IdentityField::Cn => {
            cert.subject().iter_common_name().filter_map(|a| a.as_str().ok()).map(str::to_string).collect()
        }
        IdentityField::DnsSan | IdentityField::UriSan => {
            let san = cert
                .subject_alternative_name()
                .map_err(|e| Error::PermissionDenied(format!("client certificate with invalid SANs: {e}")))?;
            san.map(|s| {
                s.value
                    .general_names
                    .iter()
                    .filter_map(|n| match (field, n) {
                        (IdentityField::DnsSan, GeneralName::DNSName(v))
                        | (IdentityField::UriSan, GeneralName::URI(v)) => Some(v.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
        }
    };
    Ok(values)
}
