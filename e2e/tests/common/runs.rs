//! Helpers of the end-to-end tests that run federations: a hub and members on loopback,
//! the sample-sized run, and waiting on a run's status. Each test binary that includes
//! it (`#[path]`) uses a different part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use starling_e2e::federation::{Federation, MemberSpec, Timing};
use starling_operator::api::{Phase, Tier, TrainingRun};

/// Federations are CPU-heavy (every peer trains); one at a time keeps heartbeats on time
/// on a 2-core machine.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn exe_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

pub async fn federation(members: &[MemberSpec]) -> (Federation, tempfile::TempDir) {
    let mut dir = tempfile::tempdir().unwrap();
    // STARLING_E2E_KEEP=1 keeps the federation's logs and files for a post-mortem.
    if std::env::var_os("STARLING_E2E_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("federation files kept in {}", dir.path().display());
    }
    let federation = Federation::start(members, Timing::default(), dir.path(), &exe_dir())
        .await
        .unwrap();
    (federation, dir)
}

pub fn three_members() -> Vec<MemberSpec> {
    vec![
        MemberSpec::new("cloud-eu", Tier::Cloud, "eu", 10_000, 2),
        MemberSpec::new("cloud-us", Tier::Cloud, "us", 10_000, 2),
        MemberSpec::new("home-lagos", Tier::Home, "lagos", 50, 1),
    ]
}

/// A small run: 3 peers (one per member), a tiny LLaMA on Shakespeare.
pub fn run(name: &str, rounds: u32) -> TrainingRun {
    serde_json::from_value(json!({
        "apiVersion": "starling.dev/v1alpha1", "kind": "TrainingRun",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "seed": 7,
            "model": {"preset": "tiny"},
            "data": {"corpus": {"builtin": "shakespeare"}, "sequenceLength": 64},
            "schedule": {"outerRounds": rounds, "innerSteps": 10, "batchSize": 4,
                "innerOptimizer": {"lr": 0.003, "warmupSteps": 5}},
            "peers": {"min": 2, "max": 3},
            "placement": {"maxPeersPerMember": 1, "roundDeadlineSeconds": 60},
            "checkpoint": {"everyRounds": 2, "keepLast": 2},
        },
    }))
    .unwrap()
}

/// Polls the run until `done` holds; panics with the run's status after `secs`.
pub async fn wait_run(
    runs: &Api<TrainingRun>,
    name: &str,
    what: &str,
    secs: u64,
    done: impl Fn(&TrainingRun) -> bool,
) -> TrainingRun {
    let start = Instant::now();
    loop {
        if let Some(run) = runs.get_opt(name).await.unwrap()
            && done(&run)
        {
            return run;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            let run = runs.get_opt(name).await.unwrap();
            panic!(
                "{what}: not within {secs} s; run status: {:#?}",
                run.and_then(|r| r.status)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Creates `run` and waits until it has trained a round.
pub async fn start_run(runs: &Api<TrainingRun>, run: TrainingRun) -> TrainingRun {
    let name = run.name_any();
    runs.create(&PostParams::default(), &run).await.unwrap();
    wait_run(runs, &name, "round 1", 240, |r| {
        r.status.as_ref().is_some_and(|s| s.round >= 1)
    })
    .await
}

pub async fn wait_until<F, Fut>(what: &str, secs: u64, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub fn phase(run: &TrainingRun) -> Option<Phase> {
    run.status.as_ref().and_then(|s| s.phase)
}

pub fn condition<'a>(run: &'a TrainingRun, type_: &str) -> Option<(&'a str, &'a str, &'a str)> {
    run.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()))
}

/// The exchange pod of the (only) run in `default`.
pub async fn exchange_pod(hub: &Client) -> Pod {
    Api::<Pod>::namespaced(hub.clone(), "default")
        .list(&ListParams::default().labels("app.kubernetes.io/component=exchange"))
        .await
        .unwrap()
        .items
        .remove(0)
}

pub async fn trainer_pods(client: &Client) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), "starling-trainers")
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

pub fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    match try_kubectl(kubeconfig, args) {
        Ok(out) => out,
        Err(err) => panic!("kubectl {args:?}: {err}"),
    }
}

/// `kubectl patch tr NAME --type merge -p PATCH`, as a user edits a run.
pub fn merge_patch(kubeconfig: &std::path::Path, run: &str, patch: &str) -> Result<String, String> {
    try_kubectl(
        kubeconfig,
        &["patch", "tr", run, "--type", "merge", "-p", patch],
    )
}

/// The trainer pods of every member cluster.
pub async fn every_members_trainer_pods(fed: &Federation) -> Vec<Pod> {
    let mut pods = vec![];
    for m in &fed.clusters.members {
        pods.extend(trainer_pods(&m.client).await);
    }
    pods
}

/// kubectl's stdout, or its stderr when it fails.
pub fn try_kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The uids of `pods`, sorted.
pub fn uids(pods: &[Pod]) -> Vec<String> {
    let mut v: Vec<String> = pods.iter().filter_map(|p| p.uid()).collect();
    v.sort();
    v
}

/// The operator's identities ran under exactly the charts' RBAC: nothing they asked was
/// refused (a permission missing), and, when `whole_life`, every permission granted was
/// used (one granted for nothing).
pub fn assert_rbac_held(fed: &Federation, whole_life: bool) {
    let report = fed.rbac_report();
    assert!(report.refused.is_empty(), "refused: {:#?}", report.refused);
    if whole_life {
        // kube's event recorder patches an Event only when the same one repeats within
        // its series window, which a run may or may not do: that grant is held to use
        // only when it happened (a refusal still fails above).
        let unused: Vec<&String> = report
            .unused
            .iter()
            .filter(|u| *u != "HUB: events.k8s.io/events patch")
            .collect();
        assert!(unused.is_empty(), "granted but never used: {unused:#?}");
    }
}
