//! Test certificates, generated at test time with rcgen: one CA, server
//! certificates for 127.0.0.1 and client certificates with a chosen CN and SANs,
//! written as PEM files into a temp dir; and a directory laid out like a Secret the
//! kubelet mounts, updated the way it rotates one.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (PEM).
    pub ca_file: PathBuf,
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::Builder::new().prefix("etcdmux-test-pki-").tempdir().expect("temp dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key")).expect("ca cert");
        let ca_file = dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, ca.pem()).expect("writing ca");
        Pki { dir, ca, ca_file }
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self, name: &str) -> Pair {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("sans");
        params.distinguished_name = dn(name);
        self.issue(name, params)
    }

    /// A server certificate like [`Pki::server`], valid until January 1st of `year`.
    #[allow(dead_code)]
    pub fn server_until(&self, name: &str, year: i32) -> Pair {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("sans");
        params.distinguished_name = dn(name);
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        self.issue(name, params)
    }

    /// A client certificate with common name `cn`, valid until January 1st of `year`.
    #[allow(dead_code)]
    pub fn client_until(&self, file: &str, cn: &str, year: i32) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = dn(cn);
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        self.issue(file, params)
    }

    /// A client certificate with common name `cn` and these SANs.
    #[allow(dead_code)]
    pub fn client(&self, file: &str, cn: &str, sans: Vec<SanType>) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = dn(cn);
        params.subject_alt_names = sans;
        self.issue(file, params)
    }

    fn issue(&self, file: &str, mut params: CertificateParams) -> Pair {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("signing");
        let pair = Pair {
            cert: self.dir.path().join(format!("{file}.pem")),
            key: self.dir.path().join(format!("{file}-key.pem")),
        };
        std::fs::write(&pair.cert, cert.pem()).expect("writing cert");
        std::fs::write(&pair.key, key.serialize_pem()).expect("writing key");
        pair
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

#[allow(dead_code)]
pub fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("uri san"))
}

#[allow(dead_code)]
pub fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().expect("dns san"))
}

/// January 1st of `year`, 00:00 UTC, in Unix seconds.
#[allow(dead_code)]
pub fn jan1(year: i32) -> i64 {
    rcgen::date_time_ymd(year, 1, 1).unix_timestamp()
}

/// A directory laid out as the kubelet mounts a Secret: `<dir>/<name>` is a symlink
/// to `..data/<name>`, and `..data` a symlink to the current version's directory.
/// [`SecretDir::update`] writes a new version and swaps `..data` in one rename, so
/// the paths never change, only what they point to.
#[allow(dead_code)]
pub struct SecretDir {
    dir: tempfile::TempDir,
    version: usize,
}

#[allow(dead_code)]
impl SecretDir {
    /// A Secret with these files: (name in the Secret, file whose contents it gets).
    pub fn new(files: &[(&str, &Path)]) -> SecretDir {
        let dir = tempfile::Builder::new().prefix("etcdmux-test-secret-").tempdir().expect("temp dir");
        let mut s = SecretDir { dir, version: 0 };
        s.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(Path::new("..data").join(name), s.path(name)).expect("file symlink");
        }
        s
    }

    /// Where the Secret's file `name` is mounted.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replaces the Secret's contents at once (the kubelet's atomic writer).
    pub fn update(&mut self, files: &[(&str, &Path)]) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        let vdir = self.dir.path().join(&version);
        std::fs::create_dir(&vdir).expect("version dir");
        for (name, from) in files {
            std::fs::copy(from, vdir.join(name)).expect("copying into the secret");
        }
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).expect("data symlink");
        std::fs::rename(&tmp, self.dir.path().join("..data")).expect("swapping ..data");
    }
}
