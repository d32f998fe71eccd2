//! TLS files (certificate, key, CA bundle): read, checked, and read again while
//! running so that a rotated certificate is used without a restart.
//!
//! cert-manager and the kubelet rotate a mounted Secret by swapping a symlink to a
//! new directory: the path and often the mtime stay the same, so a [`Reloader`]
//! compares the files' contents. A certificate and key read during a rotation can
//! be one old and one new (two files are never read atomically): a set that does
//! not pass is read once more, and if that differs it is still changing and is
//! looked at next time. A set that stays bad (half-written by hand, garbage, a key
//! that does not match) is refused; the ones in use stay until a later read finds a
//! good set.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::sign::CertifiedKey;

use crate::metrics::names;
use crate::shutdown::Tasks;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a set of TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: bad PEM: {source}")]
    Pem { path: String, source: rustls::pki_types::pem::Error },
    #[error("{path}: no certificate in it")]
    NoCertificate { path: String },
    #[error("{path}: not an X.509 certificate: {detail}")]
    X509 { path: String, detail: String },
    #[error("{cert} and {key}: {source}")]
    Pair { cert: String, key: String, source: rustls::Error },
}

/// The crypto provider of every TLS config etcdmux builds (tonic's `tls-ring`).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One file's path and contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemFile {
    pub path: PathBuf,
    pub data: Vec<u8>,
}

impl PemFile {
    fn read(path: &Path) -> Result<PemFile, CertError> {
        let data = std::fs::read(path).map_err(|source| CertError::Read { path: shown(path), source })?;
        Ok(PemFile { path: path.to_path_buf(), data })
    }

    /// Every certificate in the file (at least one), each a parsable X.509.
    fn certs(&self) -> Result<Vec<CertificateDer<'static>>, CertError> {
        let path = || shown(&self.path);
        let certs = CertificateDer::pem_slice_iter(&self.data)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CertError::Pem { path: path(), source })?;
        if certs.is_empty() {
            return Err(CertError::NoCertificate { path: path() });
        }
        for c in &certs {
            not_after(c).map_err(|detail| CertError::X509 { path: path(), detail })?;
        }
        Ok(certs)
    }
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

/// The not-after of a DER certificate, in Unix seconds.
fn not_after(der: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    Ok(cert.validity().not_after.timestamp())
}

/// Which files make up one TLS setting: a certificate and its key (together or
/// neither), and a CA bundle.
#[derive(Debug, Clone, Default)]
pub struct TlsPaths {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

impl TlsPaths {
    pub fn read(&self) -> Result<TlsFiles, CertError> {
        let read = |p: &Option<PathBuf>| p.as_deref().map(PemFile::read).transpose();
        Ok(TlsFiles { cert: read(&self.cert)?, key: read(&self.key)?, ca: read(&self.ca)? })
    }

    fn is_empty(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.ca.is_none()
    }
}

/// The contents of a [`TlsPaths`], read at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsFiles {
    pub cert: Option<PemFile>,
    pub key: Option<PemFile>,
    pub ca: Option<PemFile>,
}

/// A certificate chain and the key that goes with it.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The leaf's not-after, Unix seconds.
    pub not_after: i64,
}

/// [`TlsFiles`] checked: every certificate parses, the key parses and goes with
/// its certificate.
#[derive(Debug)]
pub struct Checked {
    pub files: TlsFiles,
    pub identity: Option<Identity>,
    /// The CA bundle's certificates.
    pub roots: Option<Vec<CertificateDer<'static>>>,
}

impl TlsFiles {
    pub fn check(self) -> Result<Checked, CertError> {
        let roots = self.ca.as_ref().map(PemFile::certs).transpose()?;
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(identity(cert, key)?),
            _ => None,
        };
        Ok(Checked { files: self, identity, roots })
    }
}

fn identity(cert: &PemFile, key: &PemFile) -> Result<Identity, CertError> {
    let chain = cert.certs()?;
    let der =
        PrivateKeyDer::from_pem_slice(&key.data).map_err(|source| CertError::Pem { path: shown(&key.path), source })?;
    // What rustls checks when it takes the pair: the key parses and its public key
    // is the leaf's.
    CertifiedKey::from_der(chain.clone(), der.clone_key(), &provider()).map_err(|source| CertError::Pair {
        cert: shown(&cert.path),
        key: shown(&key.path),
        source,
    })?;
    let not_after = not_after(&chain[0]).map_err(|detail| CertError::X509 { path: shown(&cert.path), detail })?;
    Ok(Identity { chain, key: der, not_after })
}

/// What one [`Reloader::check`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    /// The files changed while they were read: looked at again next time.
    Changing,
    Reloaded,
    /// The files changed but cannot be used; the ones in use stay.
    Refused(String),
}

/// Reads a [`TlsPaths`] again and again; when the contents changed and pass
/// [`TlsFiles::check`] and `apply`, they are the new ones in use.
pub struct Reloader {
    /// `upstream` or `listener`: the metrics' `target`.
    target: &'static str,
    /// For logs: which listener, or `upstream`.
    name: String,
    paths: TlsPaths,
    /// The files in use.
    serving: TlsFiles,
    apply: Apply,
}

/// Takes checked files into use (or says why not).
pub type Apply = Box<dyn FnMut(&Checked) -> Result<(), BoxError> + Send>;

impl Reloader {
    /// `serving`: the files the config in use was built from.
    pub fn new(target: &'static str, name: String, paths: TlsPaths, serving: &Checked, apply: Apply) -> Reloader {
        report_expiry(target, serving);
        Reloader { target, name, paths, serving: serving.files.clone(), apply }
    }

    /// Reads the files; uses them if they changed and are good.
    pub fn check(&mut self) -> Outcome {
        let files = match self.paths.read() {
            Ok(f) if f == self.serving => return Outcome::Unchanged,
            Ok(f) => f,
            Err(e) => return self.refused(e.into()),
        };
        let checked = match files.clone().check() {
            Ok(c) => c,
            // Read while the files were being replaced (a pair from two versions):
            // not an error, the next check sees the finished set.
            Err(_) if self.paths.read().is_ok_and(|again| again != files) => return Outcome::Changing,
            Err(e) => return self.refused(e.into()),
        };
        if let Err(e) = (self.apply)(&checked) {
            return self.refused(e);
        }
        report_expiry(self.target, &checked);
        self.serving = checked.files;
        metrics::counter!(names::TLS_RELOADS, "target" => self.target, "result" => "ok").increment(1);
        tracing::info!(tls = self.target, name = %self.name, "TLS files changed: new connections use them");
        Outcome::Reloaded
    }

    fn refused(&self, e: BoxError) -> Outcome {
        metrics::counter!(names::TLS_RELOADS, "target" => self.target, "result" => "error").increment(1);
        tracing::warn!(tls = self.target, name = %self.name, error = %e,
            "changed TLS files refused; keeping the ones in use, trying again next interval");
        Outcome::Refused(e.to_string())
    }

    /// Checks every `every` until shutdown; with `every` zero, never.
    pub fn spawn(mut self, tasks: &Tasks, every: Duration) {
        if every.is_zero() || self.paths.is_empty() {
            return;
        }
        tasks.spawn_until_shutdown(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                self.check();
            }
        });
    }
}

fn report_expiry(target: &'static str, c: &Checked) {
    if let (Some(id), Some(cert)) = (&c.identity, &c.files.cert) {
        metrics::gauge!(names::TLS_CERT_EXPIRY, "target" => target, "file" => shown(&cert.path))
            .set(id.not_after as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
        let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn reloads_changed_contents_and_refuses_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pem_pair(dir.path(), "a");
        let paths = TlsPaths { cert: Some(cert.clone()), key: Some(key.clone()), ca: Some(cert.clone()) };
        let start = paths.read().unwrap().check().unwrap();
        let applied = std::sync::Arc::new(std::sync::Mutex::new(0));
        let n = applied.clone();
        let apply: Apply = Box::new(move |_| {
            *n.lock().unwrap() += 1;
            Ok(())
        });
        let mut r = Reloader::new("listener", "test".into(), paths, &start, apply);
        assert_eq!(r.check(), Outcome::Unchanged);

        // Another pair written over the same paths, one file at a time.
        let (c2, k2) = pem_pair(dir.path(), "b");
        std::fs::copy(&c2, &cert).unwrap();
        assert!(matches!(r.check(), Outcome::Refused(e) if e.contains("a-key.pem")), "cert and key do not match");
        std::fs::copy(&k2, &key).unwrap();
        assert_eq!(r.check(), Outcome::Reloaded);
        assert_eq!(r.check(), Outcome::Unchanged);

        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nMIIB").unwrap();
        assert!(matches!(r.check(), Outcome::Refused(_)), "half-written");
        std::fs::write(&cert, "garbage").unwrap();
        assert!(matches!(r.check(), Outcome::Refused(e) if e.contains("no certificate")));
        std::fs::remove_file(&cert).unwrap();
        assert!(matches!(r.check(), Outcome::Refused(e) if e.contains("reading")));
        // Back to the pair in use: nothing to do.
        std::fs::copy(&c2, &cert).unwrap();
        assert_eq!(r.check(), Outcome::Unchanged);
        assert_eq!(*applied.lock().unwrap(), 1);
    }

    #[test]
    fn a_refused_apply_keeps_the_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pem_pair(dir.path(), "a");
        let paths = TlsPaths { cert: Some(cert.clone()), key: Some(key.clone()), ca: None };
        let start = paths.read().unwrap().check().unwrap();
        let mut r = Reloader::new("upstream", "test".into(), paths, &start, Box::new(|_| Err("no".into())));
        let (c2, k2) = pem_pair(dir.path(), "b");
        std::fs::copy(&c2, &cert).unwrap();
        std::fs::copy(&k2, &key).unwrap();
        assert_eq!(r.check(), Outcome::Refused("no".into()));
        assert_eq!(r.check(), Outcome::Refused("no".into()), "tried again");
    }
}
