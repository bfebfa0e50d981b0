//! Scoring end to end on the local clusters: a run with a peer that flips the sign of
//! its updates, its evaluator, the operator's signed ledger, and the exclusion as a user
//! follows it with `kubectl`.

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

#[path = "common/runs.rs"]
mod runs;

use std::collections::BTreeMap;

use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use starling_operator::api::{Phase, Standing, TrainingRun};

use runs::*;

/// The round each PeerExcluded Event names, for `peer`.
async fn excluded_in(events: &Api<Event>, peer: &str) -> Vec<u32> {
    let prefix = format!("{peer} excluded in round ");
    (events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter())
    .filter(|e| e.reason.as_deref() == Some("PeerExcluded"))
    .filter_map(|e| {
        let rest = e.note.as_deref()?.strip_prefix(&prefix)?;
        rest.split(':').next()?.parse().ok()
    })
    .collect()
}

fn standing(run: &TrainingRun, peer: usize) -> Option<Standing> {
    run.status.as_ref()?.peers.get(peer)?.standing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_flipping_peer_is_excluded_within_three_rounds_and_the_ledger_verifies() {
    let (fed, _dir) = federation(&three_members()).await;
    let hub = fed.clusters.hub.client.clone();
    let runs: Api<TrainingRun> = Api::namespaced(hub.clone(), "default");
    let mut tr = run("scored", 7);
    // The testing aid: p2 cheats from round 1 on.
    tr.metadata.annotations = Some(BTreeMap::from([
        ("starling.dev/test-adversary".into(), "p2=signflip".into()),
        ("starling.dev/test-adversary-from".into(), "1".into()),
    ]));
    runs.create(&PostParams::default(), &tr).await.unwrap();

    let excluded = wait_run(&runs, "scored", "p2 Excluded", 420, |r| {
        standing(r, 2) == Some(Standing::Excluded)
    })
    .await;
    let status = excluded.status.clone().unwrap();
    assert_eq!(status.excluded_peers, 1, "{:#?}", status.peers);
    assert_eq!(status.peers[2].weight, Some(0.0));
    assert!(status.peers[2].reason.is_some(), "{:#?}", status.peers[2]);
    let events: Api<Event> = Api::namespaced(hub.clone(), "default");
    let rounds = excluded_in(&events, "p2").await;
    assert!(
        rounds.first().is_some_and(|r| *r < 1 + 3),
        "excluded in rounds {rounds:?}"
    );
    // `kubectl get` shows the count in the status. Scoring goes on meanwhile (a cheater
    // can be reset or readmitted by a later round), so the status is read on both sides
    // of the table, until it held still across it.
    let excluded = || async {
        runs.get("scored")
            .await
            .unwrap()
            .status
            .unwrap()
            .excluded_peers
    };
    let shown = loop {
        let before = excluded().await;
        let table = kubectl(&fed.clusters.hub.kubeconfig, &["get", "tr", "scored"]);
        if excluded().await == before {
            break (table, before);
        }
    };
    let (table, count) = shown;
    let (header, row) = (table.lines().next().unwrap(), table.lines().nth(1).unwrap());
    let column = header
        .split_whitespace()
        .position(|c| c == "EXCLUDED")
        .unwrap();
    assert_eq!(
        row.split_whitespace().nth(column),
        Some(&*count.to_string()),
        "{table}"
    );

    let done = wait_run(&runs, "scored", "Succeeded", 420, |r| {
        phase(r) == Some(Phase::Succeeded)
    })
    .await;
    let status = done.status.clone().unwrap();
    for honest in 0..2 {
        assert_eq!(
            standing(&done, honest),
            Some(Standing::Active),
            "{status:#?}"
        );
    }
    assert!(excluded_in(&events, "p0").await.is_empty());
    assert!(excluded_in(&events, "p1").await.is_empty());
    let loss = status.last_loss.unwrap();
    assert!(loss < 5.0, "final validation loss {loss}");

    // The final checkpoint carries the ledger, which verifies with the key in the status.
    let key = status.scoring.as_ref().unwrap().public_key.clone();
    let exchange = exchange_pod(&hub).await;
    let checkpoint = fed
        .hub_pod_dir("default", &exchange.name_any())
        .join("checkpoints/round-000007");
    let images = starling_e2e::harness::starling_images(&exe_dir());
    let operator = &images
        .iter()
        .find(|(i, _)| i.contains("operator"))
        .unwrap()
        .1;
    let out = std::process::Command::new(operator)
        .args(["ledger", "verify"])
        .arg(&checkpoint)
        .args(["--public-key", &key])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("every one signed, chained and replayed"),
        "{text}"
    );
}
