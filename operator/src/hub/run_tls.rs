//! Each run's own certificate authority and its exchange's certificate, minted with the
//! run's tokens and kept in its credentials Secret (see
//! `starling_trainer::exchange::tls` for how the run's pods use them).
//!
//! A CA per run, rather than one for the operator, means a certificate can only ever
//! vouch for its own run's exchange: no other run's pods trust it. The certificate
//! names [`EXCHANGE_SERVER_NAME`], which every client verifies whatever address it
//! dials, and the exchange Service's cluster names for clients inside the hub.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{Timestamp, tz::TimeZone};
use kube::ResourceExt;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use starling_trainer::exchange::tls::EXCHANGE_SERVER_NAME;

use crate::api::TrainingRun;
use crate::hub::children::exchange_name;

/// Key of the run's CA certificate (PEM) in its credentials Secret and its members'.
pub const CA_KEY: &str = "ca.crt";
/// Key of the exchange's certificate (PEM), as in a `kubernetes.io/tls` Secret.
pub const CERT_KEY: &str = "tls.crt";
/// Key of the exchange certificate's private key (PEM): only the exchange reads it.
pub const KEY_KEY: &str = "tls.key";

/// How long a run's CA and certificate are valid: longer than any run trains.
const VALID_YEARS: i16 = 5;

/// A run's CA and its exchange's certificate and key, PEM.
pub struct RunTls {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

/// Mints the CA of the run named `run` in `namespace`, whose exchange Service is
/// `service`, and the exchange's certificate.
pub fn mint(run: &str, namespace: &str, service: &str) -> Result<RunTls, rcgen::Error> {
    let names = vec![
        EXCHANGE_SERVER_NAME.to_owned(),
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    mint_for(&format!("starling run {namespace}/{run}"), names)
}

/// Mints a CA called `ca_name` and a server certificate it signs for `names` (the first
/// is its common name).
pub fn mint_for(ca_name: &str, names: Vec<String>) -> Result<RunTls, rcgen::Error> {
    let year = Timestamp::now().to_zoned(TimeZone::UTC).year();
    let validity = |params: &mut CertificateParams| {
        params.not_before = rcgen::date_time_ymd(i32::from(year) - 1, 1, 1);
        params.not_after = rcgen::date_time_ymd(i32::from(year + VALID_YEARS), 1, 1);
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    validity(&mut ca_params);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let common_name = names.first().cloned().unwrap_or_default();
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok(RunTls {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The name every client verifies on the run's exchange certificate.
pub fn server_name(run: &TrainingRun) -> &str {
    let tls = &run.spec.exchange.tls;
    tls.server_name.as_deref().unwrap_or(EXCHANGE_SERVER_NAME)
}

/// The CA, certificate and key of a user's certificate Secret (`spec.exchange.tls.secretName`),
/// or what is missing from it.
pub fn from_secret(secret: &Secret) -> Result<RunTls, String> {
    let data = secret.data.clone().unwrap_or_default();
    let pem = |key: &str| {
        let text = (data.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            .ok_or_else(|| format!("it has no key {key}"))?;
        match text.trim_start().starts_with("-----BEGIN") {
            true => Ok(text),
            false => Err(format!("its {key} is not PEM")),
        }
    };
    Ok(RunTls {
        ca: pem(CA_KEY)?,
        cert: pem(CERT_KEY)?,
        key: pem(KEY_KEY)?,
    })
}

/// Adds the run's CA, certificate and key to its freshly minted `credentials` when its
/// exchange speaks TLS (`spec.exchange.tls.enabled`): those of `provided`, the user's
/// certificate Secret (`spec.exchange.tls.secretName`), or else minted for the run.
pub fn add_to(
    credentials: &mut BTreeMap<String, String>,
    run: &TrainingRun,
    provided: Option<RunTls>,
) -> Result<(), rcgen::Error> {
    if !run.spec.exchange.tls.enabled {
        return Ok(());
    }
    let tls = match provided {
        Some(tls) => tls,
        None => {
            let ns = run.namespace().unwrap_or_default();
            mint(&run.name_any(), &ns, &exchange_name(run))?
        }
    };
    credentials.insert(CA_KEY.into(), tls.ca);
    credentials.insert(CERT_KEY.into(), tls.cert);
    credentials.insert(KEY_KEY.into(), tls.key);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_secret_gives_its_ca_certificate_and_key_or_says_what_it_lacks() {
        let tls = mint_for("acme CA", vec!["exchange.example.org".into()]).unwrap();
        let secret = |keys: &[(&str, &str)]| -> Secret {
            let data: serde_json::Map<_, _> = (keys.iter())
                .map(|(k, v)| (k.to_string(), serde_json::json!(base64(v))))
                .collect();
            serde_json::from_value(serde_json::json!({"metadata": {"name": "c"}, "data": data}))
                .unwrap()
        };
        let whole = secret(&[
            (CA_KEY, &tls.ca),
            (CERT_KEY, &tls.cert),
            (KEY_KEY, &tls.key),
        ]);
        let read = from_secret(&whole).unwrap();
        assert_eq!(
            (read.ca, read.cert, read.key),
            (tls.ca.clone(), tls.cert.clone(), tls.key.clone())
        );
        let no_ca = secret(&[(CERT_KEY, &tls.cert), (KEY_KEY, &tls.key)]);
        assert_eq!(from_secret(&no_ca).err().unwrap(), "it has no key ca.crt");
        let garbled = secret(&[
            (CA_KEY, "hello"),
            (CERT_KEY, &tls.cert),
            (KEY_KEY, &tls.key),
        ]);
        assert_eq!(
            from_secret(&garbled).err().unwrap(),
            "its ca.crt is not PEM"
        );
    }

    fn base64(text: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn each_run_gets_its_own_ca_and_a_certificate_for_the_exchange_name() {
        let a = mint("shakespeare", "default", "shakespeare-exchange").unwrap();
        let b = mint("shakespeare", "default", "shakespeare-exchange").unwrap();
        assert_ne!(a.ca, b.ca, "a CA per run");
        assert!(a.ca.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(a.cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(a.key.starts_with("-----BEGIN PRIVATE KEY-----"));
    }
}
