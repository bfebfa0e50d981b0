//! The Grafana dashboard the hub chart ships queries only metrics that exist: every
//! `starling_*` series its panels name is found in live scrapes of a running federation
//! (operator, agents, the exchange and the trainers), with samples, not just declared.

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

#[path = "common/runs.rs"]
mod runs;

use std::collections::BTreeSet;
use std::path::Path;

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use runs::*;
use starling_e2e::federation::MemberSpec;
use starling_e2e::scrape::{Sample, pod_url, scrape};
use starling_operator::api::{Tier, TrainingRun};
use starling_operator::contract::PEER_METRICS_PORT;

/// Every metric a panel's query names, by the name its samples carry (a histogram's
/// `_bucket`, `_sum` and `_count` as they are queried).
fn dashboard_metrics() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/starling-hub/dashboards/starling.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let name = regex::Regex::new(r"starling_[a-z0-9_]+").unwrap();
    let mut names = BTreeSet::new();
    let panels = dashboard["panels"].as_array().unwrap();
    for target in panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
    {
        let expr = target["expr"].as_str().unwrap();
        names.extend(name.find_iter(expr).map(|m| m.as_str().to_owned()));
    }
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    for v in variables.iter().filter_map(|v| v["definition"].as_str()) {
        names.extend(name.find_iter(v).map(|m| m.as_str().to_owned()));
    }
    names
}

async fn scraped(url: &str, what: &str) -> Vec<Sample> {
    match scrape(url).await {
        Ok(samples) => samples,
        Err(e) => panic!("scraping {what} at {url}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_in_a_live_scrape_of_a_run() {
    let wanted = dashboard_metrics();
    assert!(wanted.len() > 15, "{wanted:?}");
    let _one = ONE_AT_A_TIME.lock().await;
    let members = [
        MemberSpec::new("cloud-eu", Tier::Cloud, "eu", 10_000, 1),
        MemberSpec::new("home-lagos", Tier::Home, "lagos", 50, 1),
    ];
    let (fed, _dir) = federation(&members).await;
    let hub = fed.clusters.hub.client.clone();
    let runs: Api<TrainingRun> = Api::namespaced(hub.clone(), "default");
    let mut tr = run("watched", 40);
    tr.spec.peers.max = 2;
    runs.create(&PostParams::default(), &tr).await.unwrap();
    // Scored peers carry rating and weight; two rounds have given every phase a sample.
    wait_run(&runs, "watched", "peers scored in round 2", 300, |r| {
        r.status
            .as_ref()
            .is_some_and(|s| s.round >= 2 && s.peers.iter().all(|p| p.rating.is_some()))
    })
    .await;

    let mut samples = scraped(&fed.metrics_url("operator").unwrap(), "the operator").await;
    for m in &members {
        let log = format!("agent-{}", m.name);
        samples.extend(scraped(&fed.metrics_url(&log).unwrap(), &log).await);
    }
    let exchange = exchange_pod(&hub).await;
    let url = pod_url(&exchange, PEER_METRICS_PORT).unwrap();
    samples.extend(scraped(&url, "the exchange").await);
    let trainers = every_members_trainer_pods(&fed).await;
    assert_eq!(trainers.len(), 2, "{:?}", uids(&trainers));
    for pod in &trainers {
        let url = pod_url(pod, PEER_METRICS_PORT).unwrap();
        samples.extend(scraped(&url, &pod.name_any()).await);
    }

    let found: BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|m| !found.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which no scrape has; found {found:?}"
    );
    // The trainers' series name their peer, and each has run every phase.
    for peer in ["p0", "p1"] {
        let counted = |phase: &str| {
            samples.iter().any(|s| {
                s.name == "starling_trainer_round_phase_seconds_count"
                    && s.label("peer") == Some(peer)
                    && s.label("phase") == Some(phase)
                    && s.value >= 1.0
            })
        };
        for phase in starling_trainer::roles::metrics::Phase::ALL {
            assert!(
                counted(phase.name()),
                "{peer} has no {} round",
                phase.name()
            );
        }
    }
    runs.delete("watched", &DeleteParams::default())
        .await
        .unwrap();
}
