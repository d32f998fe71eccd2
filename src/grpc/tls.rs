//! TLS towards clients: a listener's TLS settings, and the scope of a request on an
//! mTLS listener, read from its client certificate.
//!
//! Certificates are read once, when the listener starts: rotating them needs a
//! restart (no reloading yet).

use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::Request;
use x509_parser::extensions::GeneralName;

use crate::config::{read_pem, ConfigError, ListenerConfig};
use crate::error::{Error, Result};
use crate::keyspace::{IdentityField, Resolver, Scope};

/// The TLS settings of listener `l`; `None` for a plaintext listener. With
/// `client_cert_auth`, a client without a certificate from `trusted_ca_file` is
/// refused at the handshake.
pub fn server_tls(l: &ListenerConfig) -> Result<Option<ServerTlsConfig>, ConfigError> {
    let (Some(cert), Some(key)) = (&l.cert_file, &l.key_file) else { return Ok(None) };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
    if let (true, Some(ca)) = (l.client_cert_auth, &l.trusted_ca_file) {
        tls = tls.client_ca_root(Certificate::from_pem(read_pem(ca)?));
    }
    Ok(Some(tls))
}

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
        if !self.from_cert {
            return Ok(self.listener.clone());
        }
        let Some(rules) = resolver.identity() else { return Ok(self.listener.clone()) };
        let certs = req.peer_certs();
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
