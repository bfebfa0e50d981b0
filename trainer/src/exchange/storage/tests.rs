use bytes::Bytes;
use reqwest::Method;

use super::s3_server::S3Server;
use super::{Credentials, Storage, StorageSource};

/// A bucket on a fresh S3 server, or `None` where none is installed (outside CI).
fn bucket(name: &str) -> Option<(S3Server, Storage)> {
    let server = S3Server::start()?;
    server.create_bucket(name);
    let source = StorageSource {
        url: format!("s3://{name}/runs/r1"),
        endpoint: Some(server.endpoint()),
        credentials: server.credentials(),
    };
    let storage = source.open().unwrap();
    Some((server, storage))
}

#[tokio::test]
async fn a_bucket_keeps_objects_under_its_prefix_and_deletes_a_round_at_once() {
    let Some((_server, s)) = bucket("keeps") else {
        return;
    };
    s.check().await.unwrap();
    s.put("rounds/000001/p1", Bytes::from_static(b"one"))
        .await
        .unwrap();
    s.put("rounds/000001/p2", Bytes::from_static(b"two"))
        .await
        .unwrap();
    s.put("rounds/000002/p1", Bytes::from_static(b"three"))
        .await
        .unwrap();
    assert_eq!(s.get("rounds/000001/p2").await.unwrap().unwrap(), "two");
    assert_eq!(s.get("rounds/000009/p1").await.unwrap(), None);
    s.delete_prefix("rounds/000001").await.unwrap();
    assert_eq!(s.get("rounds/000001/p1").await.unwrap(), None);
    assert_eq!(s.get("rounds/000002/p1").await.unwrap().unwrap(), "three");
}

#[tokio::test]
async fn a_signed_url_lets_its_holder_put_and_get_one_object_without_credentials() {
    let Some((_server, s)) = bucket("signed") else {
        return;
    };
    assert!(s.signs_urls());
    let http = reqwest::Client::new();
    let put = s
        .signed_url(Method::PUT, "rounds/000003/p2")
        .await
        .unwrap()
        .unwrap();
    assert!(put.contains("X-Amz-Signature"), "{put}");
    let sent = http.put(&put).body("update bytes").send().await.unwrap();
    assert!(sent.status().is_success(), "{:?}", sent.text().await);
    assert_eq!(
        s.get("rounds/000003/p2").await.unwrap().unwrap(),
        "update bytes"
    );
    let get = s
        .signed_url(Method::GET, "rounds/000003/p2")
        .await
        .unwrap()
        .unwrap();
    let got = http.get(&get).send().await.unwrap();
    assert_eq!(got.bytes().await.unwrap(), "update bytes");
}

#[test]
fn a_directory_is_storage_too_but_signs_no_urls() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::local(&dir.path().join("state")).unwrap();
    assert!(!s.signs_urls());
    s.put_blocking("state.safetensors", Bytes::from_static(b"weights"))
        .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("state/state.safetensors")).unwrap(),
        b"weights"
    );
    assert_eq!(s.get_blocking("settings.json").unwrap(), None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(s.signed_url(Method::GET, "x")).unwrap(), None);
}

#[test]
fn an_unknown_scheme_is_refused_by_name() {
    let source = StorageSource {
        url: "ftp://bucket/x".into(),
        endpoint: None,
        credentials: Credentials::Environment,
    };
    let e = source.open().unwrap_err();
    assert!(e.to_string().contains("unknown scheme \"ftp\""), "{e}");
}

#[tokio::test]
async fn a_wrong_access_key_is_refused_with_the_storage_s_own_words() {
    let Some(server) = S3Server::start() else {
        return;
    };
    server.create_bucket("keys");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("AWS_ACCESS_KEY_ID"), "someone-else\n").unwrap();
    std::fs::write(dir.path().join("AWS_SECRET_ACCESS_KEY"), "wrong").unwrap();
    // A mounted Secret's own entries are not settings.
    std::fs::create_dir(dir.path().join("..2026_12_07")).unwrap();
    let source = StorageSource {
        url: "s3://keys/run".into(),
        endpoint: Some(server.endpoint()),
        credentials: Credentials::Dir(dir.path().to_owned()),
    };
    let e = source
        .open()
        .unwrap()
        .check()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("InvalidAccessKeyId"), "{e}");
    // The Secret fixed: the same source opens with the new key.
    server.write_credentials(dir.path());
    source.open().unwrap().check().await.unwrap();
}

#[test]
fn an_unknown_setting_in_the_credentials_is_named() {
    let source = StorageSource {
        url: "s3://bucket/x".into(),
        endpoint: None,
        credentials: Credentials::Given(vec![("AWS_ACCES_KEY".into(), "k".into())]),
    };
    let e = source.open().unwrap_err().to_string();
    assert!(e.contains("\"aws_acces_key\" is not a setting"), "{e}");
}
