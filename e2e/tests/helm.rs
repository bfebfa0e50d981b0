//! A platform team's install, as the README's "Install on real clusters" walks it, on a
//! hub and two member clusters of the local control plane: `helm install --wait` of the
//! hub chart, `starling-operator member add` and `helm install --wait` of the member chart
//! on each member, the Shakespeare sample trained to the end by the operator and agents
//! the charts run (in-cluster, with the charts' ServiceAccounts and RBAC), a `helm
//! upgrade` mid-run that the run rides out, and `helm uninstall`, which takes what the
//! chart made and leaves the CRDs and the runs.

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use starling_e2e::harness::{ClusterSpec, LocalCluster, LocalClusters, starling_images};
use starling_operator::api::{MemberCluster, Phase, TrainingRun};

#[path = "common/helm.rs"]
mod helm_cli;
#[path = "common/runs.rs"]
mod runs;
use helm_cli::{chart, helm, helm_ok};
use runs::{exe_dir, kubectl, wait_run};

const NAMESPACE: &str = "starling-system";
const RELEASE: &str = "starling";
const INSTANCE: &str = "app.kubernetes.io/instance=starling";

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Waits (condition-driven) until `done` holds of what `probe` returns.
async fn eventually<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    what: &str,
    secs: u64,
    probe: impl Fn() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let start = Instant::now();
    loop {
        let seen = probe().await;
        if done(&seen) {
            return seen;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs} s; last seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `starling-operator member add` against the hub, writing the member's files to `out`.
fn member_add(hub: &LocalCluster, name: &str, tier: &str, out: &Path) {
    let operator = starling_images(&exe_dir())
        .into_iter()
        .find(|(pattern, _)| pattern.contains("operator"))
        .unwrap()
        .1;
    let (region, mbps) = if tier == "home" {
        ("lagos", "50")
    } else {
        ("eu", "10000")
    };
    let result = std::process::Command::new(operator)
        .args(["member", "add", name, "--tier", tier, "--region", region])
        .args([
            "--bandwidth-mbps",
            mbps,
            "--hub-url",
            &hub.url,
            "--out",
            path(out),
        ])
        .env("KUBECONFIG", &hub.kubeconfig)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
}

/// What `member add` says to do on the member: its namespace, its Secret, then the chart
/// with the written values over the chart's test values.
fn install_member(helm: &Path, member: &LocalCluster, out: &Path) {
    let name = &member.name;
    kubectl(&member.kubeconfig, &["create", "namespace", NAMESPACE]);
    let secret = out.join(format!("member-{name}-secret.yaml"));
    kubectl(&member.kubeconfig, &["apply", "-f", path(&secret)]);
    let chart = chart("starling-member");
    let test_values = chart.join("ci/test-values.yaml");
    let values = out.join(format!("member-{name}.yaml"));
    helm_ok(
        helm,
        &member.kubeconfig,
        &[
            "install",
            "starling-member",
            path(&chart),
            "-n",
            NAMESPACE,
            "-f",
            path(&test_values),
            "-f",
            path(&values),
            "--wait",
            "--timeout",
            "180s",
        ],
    );
}

fn member_ready(m: &MemberCluster) -> bool {
    let v = serde_json::to_value(m).unwrap();
    let conditions = v["status"]["conditions"].as_array().cloned();
    (conditions.unwrap_or_default().iter()).any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// The operator's pods (the hub release's), by name.
async fn operator_pods(hub: &Client) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(hub.clone(), NAMESPACE);
    let listed = pods.list(&ListParams::default().labels(INSTANCE)).await;
    listed.unwrap().items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_team_installs_the_charts_trains_the_sample_upgrades_mid_run_and_uninstalls() {
    let Some(helm) = helm() else { return };
    if !starling_e2e::kubelet::may_mount() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("skipped: in-cluster pods need the process kubelet to mount, as root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let members = [
        ClusterSpec::single_node("cloud-eu", 2),
        ClusterSpec::single_node("home-lagos", 1),
    ];
    let images = starling_images(&exe_dir());
    let hub_spec = ClusterSpec::single_node("hub", 0);
    let clusters = LocalClusters::start(&hub_spec, &members, &images, dir.path())
        .await
        .unwrap();
    let hub = &clusters.hub;
    let hub_chart = chart("starling-hub");
    let hub_values = hub_chart.join("ci/test-values.yaml");
    helm_ok(
        &helm,
        &hub.kubeconfig,
        &[
            "install",
            RELEASE,
            path(&hub_chart),
            "-n",
            NAMESPACE,
            "--create-namespace",
            "-f",
            path(&hub_values),
            "--wait",
            "--timeout",
            "180s",
        ],
    );

    // Onboard both members as NOTES.txt says; each turns Ready through its agent.
    let out = dir.path().join("onboarding");
    for (member, tier) in clusters.members.iter().zip(["cloud", "home"]) {
        member_add(hub, &member.name, tier, &out);
        install_member(&helm, member, &out);
    }
    let mcs: Api<MemberCluster> = Api::all(hub.client.clone());
    eventually(
        "both members Ready",
        60,
        || async { mcs.list(&ListParams::default()).await.unwrap().items },
        |all| all.len() == 2 && all.iter().all(member_ready),
    )
    .await;

    let sample =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/samples/trainingrun-shakespeare.yaml");
    kubectl(&hub.kubeconfig, &["apply", "-f", path(&sample)]);
    let runs: Api<TrainingRun> = Api::namespaced(hub.client.clone(), "default");
    let going = |r: &TrainingRun| r.status.as_ref().is_some_and(|s| s.round >= 2);
    wait_run(&runs, "shakespeare", "round 2", 300, going).await;

    // An upgrade with a changed value replaces the operator's pods; the run goes on.
    let before: Vec<String> = operator_pods(&hub.client)
        .await
        .iter()
        .map(|p| p.name_any())
        .collect();
    helm_ok(
        &helm,
        &hub.kubeconfig,
        &[
            "upgrade",
            RELEASE,
            path(&hub_chart),
            "-n",
            NAMESPACE,
            "--reuse-values",
            "--set",
            "logLevel=debug",
            "--wait",
            "--timeout",
            "180s",
        ],
    );
    let after = operator_pods(&hub.client).await;
    assert!(
        after.iter().all(|p| !before.contains(&p.name_any())),
        "{before:?}"
    );
    let env = &after[0].spec.as_ref().unwrap().containers[0].env;
    let log = env.iter().flatten().find(|e| e.name == "RUST_LOG");
    assert_eq!(log.and_then(|e| e.value.as_deref()), Some("debug"));
    let done = wait_run(&runs, "shakespeare", "Succeeded", 600, |r| {
        runs::phase(r).is_some_and(|p| p.is_terminal())
    })
    .await;
    let status = done.status.unwrap();
    assert_eq!((status.phase, status.round), (Some(Phase::Succeeded), 12));

    // Uninstalling takes what the chart made; the CRDs and the runs stay.
    helm_ok(
        &helm,
        &hub.kubeconfig,
        &[
            "uninstall",
            RELEASE,
            "-n",
            NAMESPACE,
            "--wait",
            "--timeout",
            "120s",
        ],
    );
    let left = kubectl(
        &hub.kubeconfig,
        &[
            "get",
            "all,serviceaccounts,configmaps,roles,rolebindings,clusterroles,clusterrolebindings,poddisruptionbudgets",
            "-A",
            "-l",
            INSTANCE,
            "-o",
            "name",
        ],
    );
    assert_eq!(left.trim(), "", "the release's objects are gone");
    let crds = kubectl(&hub.kubeconfig, &["get", "crd", "-o", "name"]);
    assert_eq!(crds.lines().count(), 3, "{crds}");
    assert!(runs.get_opt("shakespeare").await.unwrap().is_some());

    let member = &clusters.members[0];
    helm_ok(
        &helm,
        &member.kubeconfig,
        &[
            "uninstall",
            "starling-member",
            "-n",
            NAMESPACE,
            "--wait",
            "--timeout",
            "120s",
        ],
    );
    let agents: Api<Deployment> = Api::namespaced(member.client.clone(), NAMESPACE);
    assert!(
        agents
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}
