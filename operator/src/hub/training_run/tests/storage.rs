//! A run whose payloads and exchange state are in a bucket: what the exchange pod gets
//! (and the peers do not), and the `ExchangeStorage` condition.

use super::*;

/// The sample run with its payloads in `s3://runs/shakespeare`, credentials in Secret
/// `bucket-keys`.
fn stored_run() -> TrainingRun {
    let mut run = run();
    run.spec.exchange.storage = Some(
        serde_json::from_value(json!({"url": "s3://runs/shakespeare",
            "endpoint": "https://minio.example:9000", "credentialsSecret": "bucket-keys"}))
        .unwrap(),
    );
    run
}

fn env_value<'a>(env: &'a [k8s_openapi::api::core::v1::EnvVar], name: &str) -> Option<&'a str> {
    env.iter().find(|e| e.name == name)?.value.as_deref()
}

#[test]
fn the_exchange_alone_mounts_the_buckets_credentials_and_keeps_no_state_on_its_node() {
    let case = Case::new(stored_run());
    let d = case.decide();
    let (deployment, _) = d.children.exchange.as_ref().unwrap();
    let pod = deployment.spec.template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    let env = container.env.as_deref().unwrap();
    assert_eq!(
        env_value(env, "STARLING_STORAGE"),
        Some("s3://runs/shakespeare")
    );
    let endpoint = env_value(env, "STARLING_STORAGE_ENDPOINT");
    assert_eq!(endpoint, Some("https://minio.example:9000"));
    let dir = env_value(env, "STARLING_STORAGE_CREDENTIALS").unwrap();
    assert_eq!(env_value(env, "STARLING_STATE_DIR"), None);
    let volume = (pod.volumes.iter().flatten())
        .find(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("bucket-keys"))
        .expect("no volume of the credentials Secret");
    let mount = (container.volume_mounts.iter().flatten())
        .find(|m| m.name == volume.name)
        .unwrap();
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        (dir, Some(true))
    );
    assert!(crate::k8s::restricted_violations(pod).is_empty());
    // Peers get signed URLs from the exchange, never the Secret.
    let template = &d.children.groups[0].group.spec.template;
    let peer_env = serde_json::to_string(&template.env).unwrap();
    assert!(!peer_env.contains("bucket-keys") && !peer_env.contains("STARLING_STORAGE"));
}

#[test]
fn without_a_bucket_the_exchange_keeps_its_state_in_its_pod_and_no_condition_is_set() {
    let mut case = Case::new(run());
    case.exchange = exchange(Some(state(2, false)));
    let d = case.decide();
    let (deployment, _) = d.children.exchange.as_ref().unwrap();
    let pod = deployment.spec.template.spec.as_ref().unwrap();
    let env = pod.containers[0].env.as_deref().unwrap();
    assert_eq!(env_value(env, "STARLING_STATE_DIR"), Some("state"));
    assert_eq!(env_value(env, "STARLING_STORAGE"), None);
    assert!(
        d.status
            .conditions
            .iter()
            .all(|c| c.type_ != "ExchangeStorage")
    );
}

#[test]
fn a_bucket_the_exchange_cannot_use_is_a_condition_and_one_warning_until_it_can() {
    let mut case = Case::new(stored_run());
    let mut refused = state(0, false);
    refused.storage = "s3://runs/shakespeare".into();
    refused.storage_error = "writing starling-check in s3://runs/shakespeare: 403 Forbidden: \
                             InvalidAccessKeyId"
        .into();
    case.exchange = exchange(Some(refused.clone()));
    let d = case.decide();
    let (ok, reason, message) = condition(&d, "ExchangeStorage");
    assert_eq!((ok, reason), ("False", "StorageUnavailable"));
    assert!(message.contains("InvalidAccessKeyId"), "{message}");
    assert!(message.contains("Secret bucket-keys"), "{message}");
    assert!(reasons(&d).contains(&"StorageUnavailable"));
    let warning = d
        .events
        .iter()
        .find(|e| e.reason == "StorageUnavailable")
        .unwrap();
    assert!(warning.warning);
    // Still refused on the next look: the condition stays, the warning is not repeated.
    let d = again(&mut case, &d);
    assert_eq!(condition(&d, "ExchangeStorage").1, "StorageUnavailable");
    assert!(!reasons(&d).contains(&"StorageUnavailable"));
    // The Secret fixed: the exchange resumed from the bucket.
    refused.storage_error.clear();
    case.exchange = exchange(Some(refused));
    let d = again(&mut case, &d);
    let (ok, reason, message) = condition(&d, "ExchangeStorage");
    assert_eq!((ok, reason), ("True", "StorageReady"));
    assert!(message.contains("s3://runs/shakespeare"), "{message}");
}
