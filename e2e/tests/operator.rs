//! The operator end to end: a hub and member clusters on loopback, the hub operator and
//! one agent per member as processes, TrainingRuns applied through the API as a user
//! would, and the trainers really training.

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

mod common;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use starling_e2e::federation::{MemberSpec, Timing};
use starling_operator::api::{MemberCluster, Phase, Tier, TrainerGroup, TrainingRun};
use starling_operator::hub::run_tls;

#[path = "common/runs.rs"]
mod runs;

use runs::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_run_waits_for_a_fix_then_trains_to_a_checkpoint() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (fed, _dir) = federation(&three_members()).await;
    let hub = fed.clusters.hub.client.clone();
    let runs: Api<TrainingRun> = Api::namespaced(hub.clone(), "default");

    // The schema accepts 5 heads for 128 dimensions; the controller's validator does not.
    let mut bad = run("shakespeare", 6);
    bad.spec.model.preset = None;
    bad.spec.model.config = Some(
        serde_json::from_value(json!({
        "vocabSize": 256, "hiddenSize": 128, "numHiddenLayers": 2, "numAttentionHeads": 5,
        "intermediateSize": 256, "maxPositionEmbeddings": 128}))
        .unwrap(),
    );
    runs.create(&PostParams::default(), &bad).await.unwrap();
    let invalid = wait_run(&runs, "shakespeare", "InvalidSpec", 30, |r| {
        condition(r, "Ready").is_some_and(|(_, reason, _)| reason == "InvalidSpec")
    })
    .await;
    let (status, _, message) = condition(&invalid, "Ready").unwrap();
    assert_eq!(status, "False");
    assert!(
        message.contains("spec.model.config.numAttentionHeads"),
        "{message}"
    );
    // Nothing was created for it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deployments = Api::<Deployment>::namespaced(hub.clone(), "default")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(deployments.items.is_empty());
    let groups = Api::<TrainerGroup>::all(hub.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(groups.items.is_empty());

    // Fixing the spec makes it proceed.
    let fix = json!({"spec": {"model": {"config": null, "preset": "tiny"}}});
    runs.patch("shakespeare", &PatchParams::default(), &Patch::Merge(fix))
        .await
        .unwrap();

    // A member's agent token reaches its own namespace and nothing else.
    let eu = fed
        .clusters
        .hub
        .client_with_token(&fed.agent_tokens["cloud-eu"])
        .unwrap();
    let own: Api<TrainerGroup> = Api::namespaced(eu.clone(), "starling-member-cloud-eu");
    own.list(&ListParams::default()).await.unwrap();
    let other: Api<TrainerGroup> = Api::namespaced(eu.clone(), "starling-member-cloud-us");
    match other.list(&ListParams::default()).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("expected 403, got {other:?}"),
    }
    let forbidden = |result: kube::Result<_>, what: &str| match result {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{what}: {e:?}"),
        Ok(_) => panic!("{what}: allowed"),
        Err(e) => panic!("{what}: {e:?}"),
    };
    let secrets: Api<Secret> = Api::namespaced(eu.clone(), "default");
    forbidden(
        secrets.list(&ListParams::default()).await.map(|_| ()),
        "the run's Secrets",
    );
    let mcs: Api<MemberCluster> = Api::all(eu);
    // It reports its own member's status (the heartbeat), and reads no MemberCluster.
    let heartbeat = Patch::Merge(json!({"status": {"agentVersion": env!("CARGO_PKG_VERSION")}}));
    mcs.patch_status("cloud-eu", &PatchParams::default(), &heartbeat)
        .await
        .unwrap();
    forbidden(
        mcs.patch_status("cloud-us", &PatchParams::default(), &heartbeat)
            .await
            .map(|_| ()),
        "another member's status",
    );
    forbidden(
        mcs.get("cloud-us").await.map(|_| ()),
        "another member's MemberCluster",
    );

    let done = wait_run(&runs, "shakespeare", "Succeeded", 420, |r| {
        phase(r) == Some(Phase::Succeeded)
    })
    .await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.round, 6);
    // A byte-level model starts at about ln(256) = 5.55 nats.
    let loss = status.last_loss.unwrap();
    assert!(loss < 5.0, "final validation loss {loss}");
    assert!(status.compression_ratio.unwrap() > 50.0, "{status:?}");
    // It trained over TLS, every peer verifying the exchange with the run's own CA.
    let (tls, reason, _) = condition(&done, "ExchangeTLS").unwrap();
    assert_eq!((tls, reason), ("True", "RunCA"));
    let run_secrets: Api<Secret> = Api::namespaced(hub.clone(), "default");
    let credentials = run_secrets.get("shakespeare-credentials").await.unwrap();
    assert!(credentials.data.unwrap().contains_key("ca.crt"));
    assert_eq!(
        status
            .checkpoints
            .iter()
            .map(|c| c.round)
            .collect::<Vec<_>>(),
        vec![4, 6]
    );
    let exchange = exchange_pod(&hub).await;
    let weights = fed
        .hub_pod_dir("default", &exchange.name_any())
        .join("checkpoints/round-000006/model.safetensors");
    assert!(weights.exists(), "{} missing", weights.display());
    // Every peer ran on its own member.
    let members: std::collections::BTreeSet<_> =
        status.peers.iter().map(|p| p.member.clone()).collect();
    assert_eq!(members.len(), 3, "{:?}", status.peers);

    let table = kubectl(&fed.clusters.hub.kubeconfig, &["get", "tr", "shakespeare"]);
    let row = table.lines().nth(1).unwrap();
    assert!(row.contains("Succeeded") && row.contains(" 6 "), "{table}");
    let described = kubectl(
        &fed.clusters.hub.kubeconfig,
        &["describe", "tr", "shakespeare"],
    );
    assert!(described.contains("Placed"), "{described}");
    // The exchange's log, through the API from its node, as kubectl logs reads it.
    let log = kubectl(
        &fed.clusters.hub.kubeconfig,
        &["logs", "-n", "default", &exchange.name_any()],
    );
    assert!(
        log.contains("peer joined") && log.contains("checkpoint written"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_run_takes_a_new_length_in_place_and_refuses_a_new_seed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (fed, _dir) = federation(&three_members()).await;
    let hub = fed.clusters.hub.client.clone();
    let kubeconfig = &fed.clusters.hub.kubeconfig;
    let runs: Api<TrainingRun> = Api::namespaced(hub.clone(), "default");
    let before = start_run(&runs, run("edited", 3)).await;
    let round_at_edit = before.status.unwrap().round;
    let exchange_pods = Api::<Pod>::namespaced(hub.clone(), "default");
    let exchange = |label| ListParams::default().labels(label);
    let exchange_before = exchange_pods
        .list(&exchange("app.kubernetes.io/component=exchange"))
        .await
        .unwrap()
        .items;
    let trainers_before = every_members_trainer_pods(&fed).await;

    // What the run trains is fixed once it runs: the API server says why and what to do.
    let refused = merge_patch(kubeconfig, "edited", r#"{"spec":{"seed":8}}"#).unwrap_err();
    assert!(
        refused.contains("cannot change once the run has started")
            && refused.contains("Create a new TrainingRun"),
        "{refused}"
    );
    // Its length is not: two more rounds, in the running exchange.
    merge_patch(
        kubeconfig,
        "edited",
        r#"{"spec":{"schedule":{"outerRounds":5}}}"#,
    )
    .unwrap();
    let mut rounds_seen = vec![round_at_edit];
    let start = Instant::now();
    let done = loop {
        let run = runs.get("edited").await.unwrap();
        let round = run.status.as_ref().map_or(0, |s| s.round);
        rounds_seen.push(round);
        if phase(&run) == Some(Phase::Succeeded) {
            break run;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "not Succeeded within 300 s: {:#?}",
            run.status
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let status = done.status.unwrap();
    assert_eq!(status.round, 5, "{status:?}");
    assert!(
        rounds_seen.is_sorted(),
        "the run went back a round: {rounds_seen:?}"
    );
    // Nothing was replaced: the exchange (and its state) and every trainer stayed.
    let exchange_after = exchange_pods
        .list(&exchange("app.kubernetes.io/component=exchange"))
        .await
        .unwrap()
        .items;
    assert_eq!(uids(&exchange_after), uids(&exchange_before));
    let restarts = exchange_after[0]
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .restart_count;
    assert_eq!(restarts, 0);
    let trainers_after = every_members_trainer_pods(&fed).await;
    assert_eq!(uids(&trainers_after), uids(&trainers_before));
    let described = kubectl(kubeconfig, &["describe", "tr", "edited"]);
    assert!(
        described.contains("SettingsChanged") && described.contains("schedule.outerRounds 3 → 5"),
        "{described}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_goes_dark_is_replaced_and_the_run_still_succeeds() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut members = three_members();
    members.push(MemberSpec::new("cloud-ap", Tier::Cloud, "ap", 10_000, 1));
    let (mut fed, _dir) = federation(&members).await;
    let hub = fed.clusters.hub.client.clone();
    let runs: Api<TrainingRun> = Api::namespaced(hub.clone(), "default");
    let running = start_run(&runs, run("dark", 6)).await;
    let placed = running.status.unwrap().peers;
    let victim = placed[0].member.clone();
    let spare: Vec<String> = members
        .iter()
        .map(|m| m.name.clone())
        .filter(|m| !placed.iter().any(|p| p.member == *m))
        .collect();
    assert_eq!(spare.len(), 1, "{placed:?}");

    fed.go_dark(&victim).await;
    let mcs: Api<MemberCluster> = Api::all(hub.clone());
    wait_until("the member turns Ready=False", 120, || async {
        mcs.get(&victim).await.unwrap().status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "HeartbeatMissed")
        })
    })
    .await;
    // Not before the grace had passed since the last heartbeat, by the hub's own clock.
    let status = mcs.get(&victim).await.unwrap().status.unwrap();
    let last = status.last_heartbeat.unwrap().0;
    let dark_at = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .last_transition_time
        .0;
    let grace = Timing::default().heartbeat_grace_seconds as i64;
    assert!(
        dark_at.duration_since(last).as_secs() >= grace,
        "marked dark at {dark_at}, last heartbeat {last}"
    );
    let degraded = wait_run(&runs, "dark", "Degraded", 30, |r| {
        condition(r, "Degraded").is_some_and(|(s, _, _)| s == "True")
    })
    .await;
    assert_eq!(phase(&degraded), Some(Phase::Running));
    let moved = wait_run(&runs, "dark", "peer re-placed", 30, |r| {
        r.status
            .as_ref()
            .is_some_and(|s| s.peers[0].member == spare[0])
    })
    .await;
    assert_ne!(moved.status.unwrap().peers[0].member, victim);

    let done = wait_run(&runs, "dark", "Succeeded", 420, |r| {
        phase(r) == Some(Phase::Succeeded)
    })
    .await;
    assert_eq!(done.status.unwrap().round, 6);
    // The re-placed peer ran on the spare member.
    let pods = trainer_pods(&fed.member(&spare[0]).client).await;
    assert_eq!(pods.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_restarts_mid_run_and_deleting_the_run_cleans_every_member() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut fed, _dir) = federation(&three_members()).await;
    let hub = fed.clusters.hub.client.clone();
    let runs: Api<TrainingRun> = Api::namespaced(hub.clone(), "default");
    // It brings its own exchange certificate, as cert-manager would write it.
    let own = run_tls::mint_for("acme CA", vec!["exchange.example.org".into()]).unwrap();
    let certificate: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "restart-cert", "namespace": "default"},
        "stringData": {"tls.crt": own.cert, "tls.key": own.key, "ca.crt": own.ca},
    }))
    .unwrap();
    let secrets: Api<Secret> = Api::namespaced(hub.clone(), "default");
    secrets
        .create(&PostParams::default(), &certificate)
        .await
        .unwrap();
    let mut restart = run("restart", 40);
    restart.spec.exchange.tls = serde_json::from_value(json!({
        "secretName": "restart-cert", "serverName": "exchange.example.org"}))
    .unwrap();
    let before = start_run(&runs, restart).await;
    let (tls, reason, _) = condition(&before, "ExchangeTLS").unwrap();
    assert_eq!((tls, reason), ("True", "CertificateSecret"));
    let uids = |items: Vec<TrainerGroup>| {
        let mut v: Vec<String> = items.iter().filter_map(|g| g.uid()).collect();
        v.sort();
        v
    };
    let groups: Api<TrainerGroup> = Api::all(hub.clone());
    let groups_before = uids(groups.list(&ListParams::default()).await.unwrap().items);
    assert_eq!(groups_before.len(), 3);
    let mut pods_before = vec![];
    for m in &fed.clusters.members {
        pods_before.extend(trainer_pods(&m.client).await.iter().filter_map(|p| p.uid()));
    }
    assert_eq!(pods_before.len(), 3);

    fed.kill_operator().await;
    let round_at_kill = runs.get("restart").await.unwrap().status.unwrap().round;
    assert!(round_at_kill >= before.status.unwrap().round);
    fed.start_operator().unwrap();
    // The new operator takes over once the dead one's Lease expires, and the run keeps
    // counting from where it was.
    let after = wait_run(&runs, "restart", "progress after the restart", 120, |r| {
        r.status
            .as_ref()
            .is_some_and(|s| s.round >= round_at_kill + 2)
    })
    .await;
    assert_eq!(phase(&after), Some(Phase::Running));
    assert_eq!(
        uids(groups.list(&ListParams::default()).await.unwrap().items),
        groups_before,
        "TrainerGroups were re-created"
    );
    let mut pods_after = vec![];
    for m in &fed.clusters.members {
        pods_after.extend(trainer_pods(&m.client).await.iter().filter_map(|p| p.uid()));
    }
    pods_before.sort();
    pods_after.sort();
    assert_eq!(
        pods_after, pods_before,
        "trainer pods were duplicated or replaced"
    );

    // Deleting the running run removes everything it made, on the hub and every member.
    runs.delete("restart", &DeleteParams::default())
        .await
        .unwrap();
    wait_until("the run's finalizer is released", 30, || async {
        runs.get_opt("restart").await.unwrap().is_none()
    })
    .await;
    let deployments: Api<Deployment> = Api::namespaced(hub.clone(), "default");
    let services: Api<Service> = Api::namespaced(hub.clone(), "default");
    let secrets: Api<Secret> = Api::all(hub.clone());
    wait_until("the exchange and credentials are collected", 30, || async {
        deployments
            .get_opt("restart-exchange")
            .await
            .unwrap()
            .is_none()
            && services
                .get_opt("restart-exchange")
                .await
                .unwrap()
                .is_none()
            && secrets
                .list(&ListParams::default().labels("starling.dev/run=restart"))
                .await
                .unwrap()
                .items
                .is_empty()
    })
    .await;
    assert!(
        groups
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    for m in &fed.clusters.members {
        wait_until(
            &format!("{}'s trainer pods are deleted", m.name),
            30,
            || async { trainer_pods(&m.client).await.is_empty() },
        )
        .await;
    }
    assert_rbac_held(&fed, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_exchange_keeps_crashing_fails_and_stays_failed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (fed, _dir) = federation(&three_members()).await;
    let hub = fed.clusters.hub.client.clone();
    let runs: Api<TrainingRun> = Api::namespaced(hub.clone(), "default");
    // A corpus the schema and the operator accept but no pod has: the exchange exits
    // at start, every time.
    let mut doomed = run("doomed", 6);
    doomed.spec.data.corpus =
        serde_json::from_value(json!({"path": "/nonexistent/plays"})).unwrap();
    runs.create(&PostParams::default(), &doomed).await.unwrap();
    let failed = wait_run(&runs, "doomed", "Failed", 240, |r| {
        phase(r) == Some(Phase::Failed)
    })
    .await;
    let (status, reason, message) = condition(&failed, "Ready").unwrap();
    assert_eq!((status, reason), ("False", "ExchangeFailed"));
    assert!(message.contains("crashed 5 times"), "{message}");
    assert_eq!(condition(&failed, "Progressing").unwrap().0, "False");
    let described = kubectl(&fed.clusters.hub.kubeconfig, &["describe", "tr", "doomed"]);
    assert!(described.contains("ExchangeFailed"), "{described}");

    // Its trainers are stopped, and nothing comes back while the run stays Failed.
    let groups: Api<TrainerGroup> = Api::all(hub.clone());
    wait_until("the failed run's groups are removed", 30, || async {
        groups
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    })
    .await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            groups
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .is_empty()
        );
        let now = runs.get("doomed").await.unwrap();
        assert_eq!(phase(&now), Some(Phase::Failed));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_hub_replicas_exactly_one_leads_and_the_other_takes_over_when_it_dies() {
    use k8s_openapi::api::coordination::v1::Lease;
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut fed, dir) = federation(&three_members()).await;
    let hub = fed.clusters.hub.client.clone();
    let runs: Api<TrainingRun> = Api::namespaced(hub.clone(), "default");
    let leader = fed.operator_identity().unwrap().to_string();
    runs.create(&PostParams::default(), &run("contest", 40))
        .await
        .unwrap();
    let standby = fed.start_replica().unwrap();
    wait_run(&runs, "contest", "round 1", 240, |r| {
        r.status.as_ref().is_some_and(|s| s.round >= 1)
    })
    .await;

    let leases: Api<Lease> = Api::namespaced(hub.clone(), "starling-system");
    let holder = |l: &Lease| l.spec.as_ref().and_then(|s| s.holder_identity.clone());
    let lease = leases.get("starling-hub").await.unwrap();
    assert_eq!(holder(&lease).as_deref(), Some(leader.as_str()));
    let standby_log = std::fs::read_to_string(dir.path().join(format!("{standby}.log"))).unwrap();
    assert!(
        standby_log.contains("waiting for leadership"),
        "{standby_log}"
    );
    assert!(
        !standby_log.contains("leading"),
        "the standby acted: {standby_log}"
    );
    // Every Event so far was written by the leader.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(hub.clone(), "default");
    let reporters: std::collections::BTreeSet<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|e| e.reporting_instance.clone())
        .collect();
    assert_eq!(
        reporters,
        [leader.clone()].into(),
        "events by other replicas"
    );

    let last_renewal = lease.spec.unwrap().renew_time.unwrap().0;
    fed.kill_operator().await;
    wait_until("the standby takes the Lease", 120, || async {
        leases
            .get("starling-hub")
            .await
            .ok()
            .and_then(|l| holder(&l))
            == Some(standby.clone())
    })
    .await;
    let taken = leases.get("starling-hub").await.unwrap().spec.unwrap();
    let waited = taken.acquire_time.unwrap().0.duration_since(last_renewal);
    let lease_seconds = i64::from(taken.lease_duration_seconds.unwrap());
    // Not before the dead leader's Lease expired, and soon after (it retries every
    // third of the Lease; one more Lease of slack for a loaded machine).
    assert!(waited.as_secs() >= lease_seconds, "taken after {waited:?}");
    assert!(
        waited.as_secs() < 2 * lease_seconds + 2,
        "taken after {waited:?}"
    );

    let round = runs.get("contest").await.unwrap().status.unwrap().round;
    wait_run(
        &runs,
        "contest",
        "progress under the new leader",
        180,
        |r| r.status.as_ref().is_some_and(|s| s.round >= round + 2),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_publishes_to_the_hub_through_publishing_and_a_bad_token_never_stops_training() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (fed, dir) = federation(&three_members()).await;
    let hub_dir = dir.path().join("hub");
    let accounts = std::collections::HashMap::from([(
        "hf_good_token_0123".to_owned(),
        starling_e2e::hub::Account {
            user: "starling".into(),
            role: starling_e2e::hub::Role::Write,
            orgs: vec!["starling-dev".into()],
        },
    )]);
    let double = starling_e2e::hub::HubDouble::new(&hub_dir, accounts)
        .unwrap()
        .start(0)
        .await
        .unwrap();
    let hub = fed.clusters.hub.client.clone();
    let secrets: Api<Secret> = Api::namespaced(hub.clone(), "default");
    let secret = |token: &str| -> Secret {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "hf", "namespace": "default"},
            "stringData": {"token": token}}))
        .unwrap()
    };
    secrets
        .create(&PostParams::default(), &secret("hf_wrong"))
        .await
        .unwrap();
    let runs: Api<TrainingRun> = Api::namespaced(hub.clone(), "default");
    let mut tr = run("published", 4);
    tr.spec.publish = Some(
        serde_json::from_value(json!({"repo": "starling-dev/shakespeare-tiny",
            "tokenSecretRef": {"name": "hf"}, "endpoint": double.url, "every": 1,
            "license": "apache-2.0"}))
        .unwrap(),
    );
    runs.create(&PostParams::default(), &tr).await.unwrap();

    // The first checkpoint's publisher is refused; the run trains on regardless.
    let refused = wait_run(&runs, "published", "Published=False", 300, |r| {
        condition(r, "Published")
            .is_some_and(|(s, reason, _)| s == "False" && reason == "PublishFailed")
    })
    .await;
    let (_, _, message) = condition(&refused, "Published").unwrap();
    assert!(message.contains("Invalid credentials"), "{message}");
    assert!(!phase(&refused).unwrap().is_terminal());
    secrets
        .replace("hf", &PostParams::default(), &secret("hf_good_token_0123"))
        .await
        .unwrap();

    let done = wait_run(&runs, "published", "Succeeded", 420, |r| {
        phase(r) == Some(Phase::Succeeded)
    })
    .await;
    let status = done.status.clone().unwrap();
    let last = status.checkpoints.last().unwrap();
    assert_eq!(last.round, 4);
    let published = last
        .published
        .as_ref()
        .expect("the final checkpoint is published");
    assert_eq!(published.revision, "round-4");
    assert_eq!(
        status.last_published.as_deref(),
        Some("starling-dev/shakespeare-tiny@round-4")
    );
    assert_eq!(condition(&done, "Published").unwrap().0, "True");
    let repo = double.hub.repo("starling-dev/shakespeare-tiny").unwrap();
    assert_eq!(repo.tags["round-4"], published.commit);

    // It went through Publishing, and said so.
    let described = kubectl(
        &fed.clusters.hub.kubeconfig,
        &["describe", "tr", "published"],
    );
    for reason in ["Publishing", "CheckpointPublished", "PublishFailed"] {
        assert!(described.contains(reason), "{reason} missing:\n{described}");
    }
    let wide = kubectl(
        &fed.clusters.hub.kubeconfig,
        &["get", "tr", "published", "-o", "wide"],
    );
    assert!(
        wide.contains("starling-dev/shakespeare-tiny@round-4"),
        "{wide}"
    );

    // What a Hugging Face user downloads is the exchange's checkpoint, byte for byte.
    let exchange = exchange_pod(&hub).await;
    let checkpoint = fed
        .hub_pod_dir("default", &exchange.name_any())
        .join("checkpoints/round-000004");
    let cache = dir.path().join("hf-cache");
    let args = [
        "download",
        "starling-dev/shakespeare-tiny",
        "round-4",
        cache.to_str().unwrap(),
    ];
    if let Some(snapshot) = common::hub_client(
        &double.url,
        "hf_good_token_0123",
        &dir.path().join("hf-home"),
        &args,
    ) {
        for entry in std::fs::read_dir(&checkpoint).unwrap() {
            let name = entry.unwrap().file_name();
            let got = std::fs::read(std::path::Path::new(&snapshot).join(&name)).unwrap();
            assert!(
                got == std::fs::read(checkpoint.join(&name)).unwrap(),
                "{name:?} differs"
            );
        }
        let card =
            std::fs::read_to_string(std::path::Path::new(&snapshot).join("README.md")).unwrap();
        assert!(card.contains("| Run | `published` |"), "{card}");
    }
}
