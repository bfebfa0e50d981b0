//! Streaming lists (client-go's WatchList, on by default in its recent releases, which
//! Helm's `--wait` uses): a watch with `sendInitialEvents` gets the current objects and
//! then a bookmark annotated `k8s.io/initial-events-end`, after which the client knows
//! its list is complete.

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use starling_e2e::apiserver::ApiServer;

#[tokio::test]
async fn a_streaming_list_delivers_every_object_then_says_the_list_is_complete() {
    let running = ApiServer::new().start(0).await.unwrap();
    let client = running.client();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for name in ["a", "b"] {
        let map: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": name}, "data": {"k": name}}))
                .unwrap();
        maps.create(&PostParams::default(), &map).await.unwrap();
    }
    let config = watcher::Config::default().streaming_lists();
    let mut events = watcher(maps.clone(), config).boxed();
    let mut listed = vec![];
    let done = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(event) = events.next().await {
            match event.unwrap() {
                watcher::Event::InitApply(m) => listed.push(m.metadata.name.unwrap()),
                watcher::Event::InitDone => return true,
                _ => {}
            }
        }
        false
    })
    .await;
    assert_eq!(done, Ok(true), "the list never completed");
    listed.sort();
    assert_eq!(listed, ["a", "b"]);
}

#[tokio::test]
async fn a_streaming_list_without_bookmarks_is_refused_as_a_real_server_refuses_it() {
    let running = ApiServer::new().start(0).await.unwrap();
    let request = http::Request::get(
        "/api/v1/namespaces/default/configmaps?watch=true&sendInitialEvents=true\
         &resourceVersionMatch=NotOlderThan",
    )
    .body(vec![])
    .unwrap();
    match running.client().request_text(request).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422);
            assert!(e.message.contains("allowWatchBookmarks"), "{}", e.message);
        }
        other => panic!("expected 422, got {other:?}"),
    }
}
