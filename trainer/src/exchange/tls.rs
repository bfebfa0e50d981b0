//! How the run's pods trust its exchange, and how the exchange proves itself.
//!
//! The operator gives every run a CA of its own and a server certificate issued by it for
//! [`EXCHANGE_SERVER_NAME`] (and the Service's cluster names). Peers, evaluators, the
//! publisher and the operator dial whatever address the exchange has (a load balancer's
//! IP, a NodePort, an Ingress) and verify the certificate against that fixed name with
//! the run's CA, so an address that changes or is only known later needs no new
//! certificate, and no other run's certificate is accepted. With a certificate the user
//! brings (say from cert-manager, for the advertised host name), no server name is set
//! and the dialled host is verified, as browsers do.
//!
//! PEM reaches pods inline from Secret keys (environment variables) and people as files;
//! [`pem`] takes either.

use std::path::Path;

/// The name a run's generated exchange certificate is issued for.
pub const EXCHANGE_SERVER_NAME: &str = "exchange.starling.internal";

/// What a client trusts: the run's CA, and the name to verify instead of the dialled
/// host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificate(s), PEM.
    pub ca: Vec<u8>,
    /// The name the exchange's certificate must carry; `None` verifies the URL's host.
    pub server_name: Option<String>,
}

/// PEM given inline (text starting `-----BEGIN`) or as the path of a file holding it.
pub fn pem(value: &str) -> Result<Vec<u8>, String> {
    if value.trim_start().starts_with("-----BEGIN") {
        return Ok(value.as_bytes().to_vec());
    }
    let path = Path::new(value);
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN") {
        return Err(format!("{} holds no PEM", path.display()));
    }
    Ok(bytes)
}

/// The flags (and environment) of a client of the exchange: `--tls-ca`, and
/// `--tls-server-name` with it.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// CA certificate (PEM, or a file holding it) to verify an `https://` exchange with.
    #[arg(long, env = crate::env::TLS_CA, hide_env_values = true)]
    pub tls_ca: Option<String>,
    /// The name the exchange's certificate is issued for, when it is not the URL's host
    /// (a run's generated certificate: `exchange.starling.internal`).
    #[arg(long, env = crate::env::TLS_SERVER_NAME, requires = "tls_ca")]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    /// What the client trusts; `None` without a CA (a plaintext `http://` exchange).
    pub fn load(&self) -> Result<Option<ClientTls>, String> {
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        Ok(Some(ClientTls {
            ca: pem(ca).map_err(|e| format!("--tls-ca: {e}"))?,
            server_name: self.tls_server_name.clone(),
        }))
    }
}

/// Whether `error` (or what caused it) is a certificate the client refused.
pub fn untrusted(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        let text = e.to_string();
        if text.contains("certificate") || text.contains("Certificate") {
            return Some(text);
        }
        cause = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_comes_inline_or_from_a_file_and_anything_else_is_refused() {
        let text = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert_eq!(pem(text).unwrap(), text.as_bytes());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, text).unwrap();
        assert_eq!(pem(file.to_str().unwrap()).unwrap(), text.as_bytes());
        std::fs::write(&file, "not a certificate").unwrap();
        let e = pem(file.to_str().unwrap()).unwrap_err();
        assert!(e.contains("holds no PEM"), "{e}");
        let e = pem("/nonexistent/ca.pem").unwrap_err();
        assert!(e.contains("reading /nonexistent/ca.pem"), "{e}");
    }
}
