//! OpenTelemetry end to end: a federation whose operator and agents are given an OTLP
//! endpoint (as the charts' `extraEnv` gives it) exports a span per reconcile, with the
//! run and the decision, and makes each round one trace: the exchange's round, every
//! peer's work on it (inner steps, compress, upload, wait, fetch, outer step) and the
//! exchange's handling of each peer's calls, linked parent to child across processes.

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

#[path = "common/runs.rs"]
mod runs;

use kube::api::{Api, PostParams};
use runs::*;
use starling_e2e::federation::{Federation, MemberSpec, Timing};
use starling_e2e::otlp::{ReceivedSpan, Receiver};
use starling_operator::api::{Phase, Tier, TrainingRun};

/// The one span of `service` named `name` for which `matches` holds.
fn one<'a>(
    spans: &'a [ReceivedSpan],
    service: &str,
    name: &str,
    matches: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = (spans.iter())
        .filter(|s| s.service == service && s.name == name && matches(s))
        .collect();
    assert_eq!(found.len(), 1, "{service} {name}: {found:#?}");
    found[0]
}

fn child_of<'a>(
    spans: &'a [ReceivedSpan],
    parent: &ReceivedSpan,
    service: &str,
    name: &str,
) -> &'a ReceivedSpan {
    one(spans, service, name, |s| {
        s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_is_one_trace_across_its_peers_and_the_exchange_and_reconciles_are_traced() {
    let receiver = Receiver::start().await.unwrap();
    let _one = ONE_AT_A_TIME.lock().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        // Export within a fifth of a second rather than five.
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=e2e"),
    ];
    let env = env.map(|(k, v)| (k.to_owned(), v.to_owned())).to_vec();
    let members = [
        MemberSpec::new("cloud-eu", Tier::Cloud, "eu", 10_000, 1),
        MemberSpec::new("cloud-us", Tier::Cloud, "us", 10_000, 1),
    ];
    let dir = tempfile::tempdir().unwrap();
    let fed = Federation::start_with_env(&members, Timing::default(), dir.path(), &exe_dir(), env)
        .await
        .unwrap();
    let runs: Api<TrainingRun> = Api::namespaced(fed.clusters.hub.client.clone(), "default");
    let mut tr = run("traced", 3);
    tr.spec.peers.max = 2;
    runs.create(&PostParams::default(), &tr).await.unwrap();
    wait_run(&runs, "traced", "Succeeded", 300, |r| {
        phase(r) == Some(Phase::Succeeded)
    })
    .await;

    // Round 1's trace: the exchange's round, then each peer's work on it.
    let round = |s: &ReceivedSpan| s.attribute("round") == Some("1");
    let traced = || {
        let spans = receiver.spans();
        let peers = (spans.iter())
            .filter(|s| s.name == "peer_round" && round(s))
            .count();
        let rounds = (spans.iter())
            .filter(|s| s.service == "starling-exchange" && s.name == "round" && round(s))
            .count();
        async move { peers == 2 && rounds == 1 }
    };
    wait_until(
        "round 1's spans from the exchange and both peers",
        60,
        traced,
    )
    .await;
    let spans = receiver.spans();
    let exchange_round = one(&spans, "starling-exchange", "round", round);
    assert!(
        exchange_round.parent_span_id.is_empty(),
        "a round is a trace's root"
    );
    assert_eq!(exchange_round.attribute("run"), Some("traced"));
    assert_eq!(
        exchange_round
            .resource
            .get("deployment.environment")
            .map(String::as_str),
        Some("e2e"),
        "OTEL_RESOURCE_ATTRIBUTES reach the exchange's pod"
    );
    child_of(&spans, exchange_round, "starling-exchange", "close_round");
    for peer in ["p0", "p1"] {
        let work = one(&spans, "starling-trainer", "peer_round", |s| {
            round(s) && s.attribute("peer") == Some(peer)
        });
        assert_eq!(
            work.trace_id, exchange_round.trace_id,
            "{peer} in the round's trace"
        );
        assert_eq!(work.parent_span_id, exchange_round.span_id, "{peer}");
        for phase in ["inner_steps", "compress", "outer_step"] {
            child_of(&spans, work, "starling-trainer", phase);
        }
        // The exchange's handling of the peer's calls is a child of the peer's span that
        // made them: the context crossed gRPC.
        let upload = child_of(&spans, work, "starling-trainer", "upload");
        let put = child_of(&spans, upload, "starling-exchange", "PutUpdate");
        assert_eq!(put.attribute("peer"), Some(peer));
        let wait = child_of(&spans, work, "starling-trainer", "wait");
        child_of(&spans, wait, "starling-exchange", "FetchRound");
        child_of(&spans, work, "starling-trainer", "fetch");
    }

    // The operator's reconciles name the run and what was decided; the agents', their
    // TrainerGroup.
    let decided = (spans.iter()).find(|s| {
        s.service == "starling-operator"
            && s.name == "reconcile"
            && s.attribute("run") == Some("traced")
            && s.attribute("decision")
                .is_some_and(|d| d.contains("phase=Running"))
    });
    assert!(
        decided.is_some(),
        "no reconcile decided Running: {spans:#?}"
    );
    let agent = (spans.iter()).find(|s| s.service == "starling-agent" && s.name == "reconcile");
    assert!(
        agent.is_some_and(|s| s.attribute("group").is_some()),
        "no agent reconcile: {agent:?}"
    );
}
