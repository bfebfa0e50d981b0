//! A run that brings its own exchange certificate (`spec.exchange.tls.secretName`).

use super::*;

#[test]
fn with_its_own_certificate_every_client_verifies_the_exchange_by_the_name_on_it() {
    let mut run = run();
    run.spec.exchange.tls = serde_json::from_value(json!({
        "secretName": "exchange-cert", "serverName": "exchange.example.org"}))
    .unwrap();
    let d = Case::new(run).decide();
    let (ok, reason, message) = condition(&d, "ExchangeTLS");
    assert_eq!((ok, reason), ("True", "CertificateSecret"));
    assert!(message.contains("exchange.example.org") && message.contains("exchange-cert"));
    let env = &d.children.groups[0].group.spec.template.env;
    let name = env
        .iter()
        .find(|e| e.name == "STARLING_TLS_SERVER_NAME")
        .unwrap();
    assert_eq!(name.value.as_deref(), Some("exchange.example.org"));
}
