//! The TLS settings of the config: pairs that go together, files that exist and
//! hold PEM (checked by [`Config::validate`]).

use super::{read_pem, Config, ConfigError};

impl Config {
    /// TLS settings: pairs that go together, files that exist and hold PEM.
    pub(super) fn validate_tls(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let u = &self.upstream;
        let https = u.endpoints.iter().any(|e| e.starts_with("https://"));
        if https && u.cacert.is_none() {
            return bad("https:// upstream endpoints need upstream.cacert (--upstream-cacert)".into());
        }
        if u.cert.is_some() != u.key.is_some() {
            return bad("upstream.cert and upstream.key go together".into());
        }
        let upstream_tls = u.cacert.is_some() || u.cert.is_some() || u.server_name.is_some();
        if upstream_tls && !https {
            return bad("upstream.cacert, cert, key and server_name apply to https:// endpoints; none is".into());
        }
        for f in [&u.cacert, &u.cert, &u.key].into_iter().flatten() {
            read_pem(f)?;
        }
        for l in &self.listeners {
            let a = l.addr;
            if l.cert_file.is_some() != l.key_file.is_some() {
                return bad(format!("listener {a}: cert_file and key_file go together"));
            }
            if l.client_cert_auth != l.trusted_ca_file.is_some() {
                return bad(format!("listener {a}: client_cert_auth and trusted_ca_file go together"));
            }
            if l.client_cert_auth && !l.is_tls() {
                return bad(format!("listener {a}: client_cert_auth needs cert_file and key_file"));
            }
            for f in [&l.cert_file, &l.key_file, &l.trusted_ca_file].into_iter().flatten() {
                read_pem(f)?;
            }
        }
        if self.tenancy.identity.is_some() && !self.listeners.iter().any(|l| l.client_cert_auth) {
            return bad("tenancy.identity is set but no listener has client_cert_auth = true".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_go_together() {
        let refused = |text: &str| Config::parse(text, "x").unwrap().validate().unwrap_err().to_string();
        assert!(refused("[upstream]\nendpoints = [\"https://127.0.0.1:2379\"]").contains("cacert"));
        assert!(refused("[upstream]\ncacert = \"/nonexistent\"").contains("https://"));
        let e = refused("[upstream]\nendpoints = [\"https://h:1\"]\ncacert = \"/nonexistent/ca.pem\"");
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let l = |extra: &str| format!("[[listener]]\naddr = \"127.0.0.1:0\"\n{extra}");
        assert!(refused(&l("cert_file = \"/c\"")).contains("go together"));
        assert!(refused(&l("client_cert_auth = true")).contains("go together"));
        assert!(refused(&l("client_cert_auth = true\ntrusted_ca_file = \"/ca\"")).contains("needs cert_file"));
        assert!(refused(&format!("{}\n[tenancy.identity]\nfrom = \"cn\"", l(""))).contains("client_cert_auth"));
    }
}
