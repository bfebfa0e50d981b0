//! Onboarding a member as a hub administrator does: `starling-operator member add`
//! registers it and writes the Secret and the member chart's values; the token in the
//! Secret lets the member's agent do its job and nothing else; `member rotate-token`
//! issues a new one without disturbing the member.

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

use std::path::Path;
use std::process::Command;

use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use starling_e2e::federation::MemberSpec;
use starling_operator::api::{MemberCluster, Tier};

#[path = "common/runs.rs"]
mod runs;
use runs::*;

fn operator_binary() -> std::path::PathBuf {
    starling_e2e::harness::starling_images(&exe_dir())
        .into_iter()
        .find(|(pattern, _)| pattern.contains("operator"))
        .unwrap()
        .1
}

fn member_command(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    Command::new(operator_binary())
        .arg("member")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .unwrap()
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// A client from the kubeconfig inside a written Secret manifest.
async fn client_from_secret(path: &Path) -> (kube::Client, String) {
    let secret = yaml(path);
    let kubeconfig = secret["stringData"]["kubeconfig"].as_str().unwrap();
    let plain: Value = serde_yaml::from_str(kubeconfig).unwrap();
    let token = plain["users"][0]["user"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let parsed: kube::config::Kubeconfig = serde_yaml::from_str(kubeconfig).unwrap();
    let config =
        kube::Config::from_custom_kubeconfig(parsed, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    (kube::Client::try_from(config).unwrap(), token)
}

async fn heartbeat(client: &kube::Client, member: &str) -> Result<(), kube::Error> {
    let api: Api<MemberCluster> = Api::all(client.clone());
    api.patch_status(
        member,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"agentVersion": "onboarding-test"}})),
    )
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_add_writes_a_secret_whose_token_lets_only_that_members_agent_in() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (fed, _dir) =
        federation(&[MemberSpec::new("cloud-eu", Tier::Cloud, "eu", 10_000, 1)]).await;
    let hub = &fed.clusters.hub;
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();

    // The federation's own agent got its token this way (for 24 hours) and reports when
    // it expires; the hub judges it good for now.
    let members: Api<MemberCluster> = Api::all(hub.client.clone());
    wait_until("cloud-eu reports its token's expiry", 30, || async {
        let m = members.get("cloud-eu").await.unwrap();
        m.status.is_some_and(|s| {
            s.credentials_expire.is_some()
                && s.conditions.iter().any(|c| {
                    c.type_ == "Credentials" && c.status == "True" && c.reason == "CredentialsValid"
                })
        })
    })
    .await;
    let status = members.get("cloud-eu").await.unwrap().status.unwrap();
    let lifetime = status
        .credentials_expire
        .unwrap()
        .0
        .duration_since(status.credentials_issued.unwrap().0);
    assert_eq!(lifetime.as_secs(), 24 * 3600);

    let added = member_command(
        &hub.kubeconfig,
        &[
            "add",
            "home-lagos",
            "--tier",
            "home",
            "--region",
            "lagos",
            "--bandwidth-mbps",
            "20",
            "--token-hours",
            "48",
            "--out",
            out_dir,
        ],
    );
    let stdout = String::from_utf8_lossy(&added.stdout);
    assert!(
        added.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&added.stderr)
    );
    assert!(stdout.contains("kubectl apply -f"), "{stdout}");

    // The MemberCluster, as the flags describe it.
    let member = members.get("home-lagos").await.unwrap();
    assert_eq!(member.spec.tier, Tier::Home);
    assert_eq!(member.spec.region, "lagos");
    assert_eq!(member.spec.bandwidth.upload_mbps, 20);

    // The Secret manifest for the member, and the values file that names it.
    let secret_path = out.path().join("member-home-lagos-secret.yaml");
    let secret = yaml(&secret_path);
    assert_eq!(secret["kind"], "Secret");
    assert_eq!(secret["metadata"]["name"], "starling-hub-kubeconfig");
    assert_eq!(secret["metadata"]["namespace"], "starling-system");
    let expires = secret["metadata"]["annotations"]["starling.dev/token-expires"]
        .as_str()
        .unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(expires).unwrap();
    let hours =
        (expires.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_minutes() as f64 / 60.0;
    assert!((47.0..=48.0).contains(&hours), "expires in {hours} h");
    let values = yaml(&out.path().join("member-home-lagos.yaml"));
    assert_eq!(
        values,
        json!({"member": {"name": "home-lagos"},
            "hub": {"existingSecret": "starling-hub-kubeconfig", "key": "kubeconfig"},
            "trainers": {"uploadLimitMbps": 20}})
    );

    // The token is the member's agent: it reports its own member's status, no other's.
    let (agent, first_token) = client_from_secret(&secret_path).await;
    heartbeat(&agent, "home-lagos").await.unwrap();
    match heartbeat(&agent, "cloud-eu").await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("another member's status was writable: {other:?}"),
    }

    // A rotated token works at once, and the old one until it expires: the agent can
    // pick the new Secret up without a gap.
    let rotated = member_command(
        &hub.kubeconfig,
        &["rotate-token", "home-lagos", "--out", out_dir],
    );
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let (new_agent, second_token) = client_from_secret(&secret_path).await;
    assert_ne!(first_token, second_token);
    heartbeat(&new_agent, "home-lagos").await.unwrap();
    heartbeat(&agent, "home-lagos").await.unwrap();
    assert_eq!(
        members.get("home-lagos").await.unwrap().spec.region,
        "lagos"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_add_refuses_a_bad_tier_and_a_member_the_operator_never_sets_up() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut fed, _dir) = federation(&[]).await;
    let hub_kubeconfig = fed.clusters.hub.kubeconfig.clone();
    let out = tempfile::tempdir().unwrap();
    let bad = member_command(
        &hub_kubeconfig,
        &[
            "add",
            "x",
            "--tier",
            "basement",
            "--region",
            "r",
            "--bandwidth-mbps",
            "5",
        ],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("\"basement\" is not a tier: cloud or home")
    );
    // Without an operator nothing makes the agent's ServiceAccount: the command says so
    // instead of waiting for ever.
    fed.kill_operator().await;
    let stuck = member_command(
        &hub_kubeconfig,
        &[
            "rotate-token",
            "nobody",
            "--wait-seconds",
            "2",
            "--out",
            out.path().to_str().unwrap(),
        ],
    );
    assert!(!stuck.status.success());
    let stderr = String::from_utf8_lossy(&stuck.stderr);
    assert!(
        stderr.contains("did not make ServiceAccount starling-member-nobody/agent within 2s"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_another_members_token_turns_not_ready_and_recovers_with_its_own() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut fed, dir) =
        federation(&[MemberSpec::new("cloud-eu", Tier::Cloud, "eu", 10_000, 1)]).await;
    let hub = fed.clusters.hub.client.clone();
    let members: Api<MemberCluster> = Api::all(hub.clone());
    let ready = |m: &MemberCluster| {
        m.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    wait_until("cloud-eu is Ready", 30, || async {
        ready(&members.get("cloud-eu").await.unwrap()).is_some_and(|(s, _)| s == "True")
    })
    .await;

    // The administrator installs cloud-eu's agent with the Secret written for another
    // member.
    let out = tempfile::tempdir().unwrap();
    let added = member_command(
        &fed.clusters.hub.kubeconfig,
        &[
            "add",
            "other",
            "--tier",
            "cloud",
            "--region",
            "us",
            "--bandwidth-mbps",
            "100",
            "--out",
            out.path().to_str().unwrap(),
        ],
    );
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let secret = yaml(&out.path().join("member-other-secret.yaml"));
    let wrong = secret["stringData"]["kubeconfig"]
        .as_str()
        .unwrap()
        .to_owned();
    fed.start_agent_with("cloud-eu", &wrong).await.unwrap();
    wait_until("cloud-eu turns Ready=False", 60, || async {
        ready(&members.get("cloud-eu").await.unwrap()).is_some_and(|(s, _)| s == "False")
    })
    .await;
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::all(hub.clone());
    wait_until("a HeartbeatMissed Event on cloud-eu", 30, || async {
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| {
                e.involved_object.name.as_deref() == Some("cloud-eu")
                    && e.reason.as_deref() == Some("HeartbeatMissed")
            })
    })
    .await;
    // The agent's log says why: the hub's 403 for another member's identity.
    let log = std::fs::read_to_string(dir.path().join("agent-cloud-eu.log")).unwrap();
    assert!(
        log.contains("403") && log.contains("system:serviceaccount:starling-member-other:agent"),
        "{log}"
    );

    // With its own token it is back.
    fed.start_agent("cloud-eu").await.unwrap();
    wait_until("cloud-eu is Ready again", 60, || async {
        ready(&members.get("cloud-eu").await.unwrap()).is_some_and(|(s, _)| s == "True")
    })
    .await;
}
