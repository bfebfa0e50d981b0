//! The TrainingRun decision, case by case: what was observed → what the run should look
//! like, what is written and what is said.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use starling_trainer::exchange::proto;

use super::decide::{
    CAPACITY_POLL, Decision, ExchangeObserved, Observed, PodHealth, RESYNC, decide,
};
use crate::api::{
    MemberCluster, MemberClusterStatus, PeerState, Phase, PodState, TrainerGroup,
    TrainerGroupStatus, TrainingRun, TrainingRunStatus,
};
use crate::contract::{self, mint_credentials};
use crate::hub::children::{ExchangeEndpoint, GroupSettings, LEDGER_KEY, trainer_group};
use crate::k8s::set_condition;

const NOW: i64 = 1_800_000_000;

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(NOW + s).unwrap()
}

/// The sample run: 3 peers (min 2), at most one per member.
fn run() -> TrainingRun {
    let yaml = include_str!("../../../../../crds/samples/trainingrun-shakespeare.yaml");
    let mut run: TrainingRun = serde_yaml::from_str(yaml).unwrap();
    run.metadata.uid = Some("run-uid".into());
    run.metadata.generation = Some(1);
    run
}

fn with_status(mut run: TrainingRun, status: TrainingRunStatus) -> TrainingRun {
    run.status = Some(status);
    run
}

fn member(name: &str, tier: &str, ready: bool) -> Arc<MemberCluster> {
    let mut m: MemberCluster = serde_json::from_value(json!({
        "apiVersion": "starling.dev/v1alpha1", "kind": "MemberCluster",
        "metadata": {"name": name, "uid": format!("{name}-uid")},
        "spec": {"tier": tier, "region": name, "bandwidth": {"uploadMbps": 1000, "downloadMbps": 1000}},
    }))
    .unwrap();
    let mut status = MemberClusterStatus::default();
    set_condition(
        &mut status.conditions,
        "Ready",
        ready,
        "HeartbeatReceived",
        "",
        None,
        at(-60),
    );
    m.status = Some(status);
    Arc::new(m)
}

fn with_gpus(m: Arc<MemberCluster>, gpus: u32) -> Arc<MemberCluster> {
    let mut m = (*m).clone();
    m.status.as_mut().unwrap().gpus_allocatable = gpus;
    Arc::new(m)
}

fn with_max_trainers(m: Arc<MemberCluster>, max: u32) -> Arc<MemberCluster> {
    let mut m = (*m).clone();
    m.spec.max_trainers = Some(max);
    Arc::new(m)
}

fn three_clouds() -> Vec<Arc<MemberCluster>> {
    ["cloud-a", "cloud-b", "cloud-c"]
        .iter()
        .map(|n| member(n, "cloud", true))
        .collect()
}

/// `run`'s group on `member` with `peers`, each pod in `phase` (or unreported).
fn group(
    run: &TrainingRun,
    member: &MemberCluster,
    peers: &[u32],
    phase: Option<&str>,
) -> Arc<TrainerGroup> {
    // The cases' credentials hold the run's certificate: its exchange speaks TLS.
    let endpoint = ExchangeEndpoint::new("10.0.0.1:7070", true, "exchange.starling.internal");
    let settings = GroupSettings {
        image: "img",
        run_env: &[],
        resources: None,
        endpoint: &endpoint,
    };
    let peers: Vec<_> = peers.iter().map(|p| crate::api::PeerId::new(*p)).collect();
    let mut g = trainer_group(run, member, &peers, &BTreeMap::new(), &settings).group;
    if let Some(phase) = phase {
        g.status = Some(TrainerGroupStatus {
            pods: peers
                .iter()
                .map(|p| PodState {
                    peer: *p,
                    pod: format!("pod-{p}"),
                    phase: phase.into(),
                    restarts: 0,
                    message: None,
                })
                .collect(),
            ..TrainerGroupStatus::default()
        });
    }
    Arc::new(g)
}

/// The sample run placed one peer per cloud, every pod Running.
fn placed(run: &TrainingRun, members: &[Arc<MemberCluster>]) -> Vec<Arc<TrainerGroup>> {
    members
        .iter()
        .take(3)
        .enumerate()
        .map(|(i, m)| group(run, m, &[i as u32], Some("Running")))
        .collect()
}

fn state(round: u32, done: bool) -> proto::RunState {
    proto::RunState {
        open_round: round,
        rounds: 12,
        done,
        peers: (0..3)
            .map(|i| proto::PeerState {
                peer: format!("p{i}"),
                alive: true,
                weight: 1.0,
                updates_accepted: round,
                last_train_loss: 3.0,
                ..Default::default()
            })
            .collect(),
        recent: vec![proto::RoundSummary {
            round,
            validation_loss: 2.5,
            contributors: vec!["p0".into(), "p2".into()],
            closed_by: "quorum".into(),
            waited_seconds: 41.234,
            deadline_seconds: 97.55,
            ..Default::default()
        }],
        bytes_received: 1_000,
        dense_update_bytes: 100_000,
        tokens: 5_000,
        // The exchange already runs with the sample's settings.
        settings: Some(contract::settings(&run().spec).into()),
        ..Default::default()
    }
}

fn exchange(state: Option<proto::RunState>) -> ExchangeObserved {
    ExchangeObserved {
        address: Some("10.0.0.1:7070".into()),
        pod: Some(PodHealth::default()),
        state,
    }
}

struct Case {
    run: TrainingRun,
    credentials: bool,
    /// The run's ledger key, the same on every look (tokens are minted afresh).
    ledger_key: String,
    exchange: ExchangeObserved,
    members: Vec<Arc<MemberCluster>>,
    groups: Vec<Arc<TrainerGroup>>,
}

impl Case {
    fn new(run: TrainingRun) -> Self {
        Self {
            ledger_key: mint_credentials(0, 0)[LEDGER_KEY].clone(),
            run,
            credentials: true,
            exchange: exchange(None),
            members: three_clouds(),
            groups: vec![],
        }
    }

    fn decide(&self) -> Decision {
        decide(&Observed {
            run: &self.run,
            now: at(0),
            default_image: "starling-trainer:default",
            trace_env: &[],
            credentials: self.credentials.then(|| {
                let mut tokens = mint_credentials(self.run.spec.peers.max, 1);
                tokens.insert(LEDGER_KEY.into(), self.ledger_key.clone());
                crate::hub::run_tls::add_to(&mut tokens, &self.run, None).unwrap();
                tokens
            }),
            exchange: self.exchange.clone(),
            members: &self.members,
            groups: &self.groups,
        })
    }
}

fn reasons(d: &Decision) -> Vec<&str> {
    d.events.iter().map(|e| e.reason).collect()
}

fn condition<'a>(d: &'a Decision, type_: &str) -> (&'a str, &'a str, &'a str) {
    let c = d
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {:?}", d.status.conditions));
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

fn group_members(d: &Decision) -> Vec<(String, Vec<String>)> {
    d.children
        .groups
        .iter()
        .map(|c| {
            let peers = c.group.spec.peers.iter().map(|p| p.to_string()).collect();
            (c.group.spec.member.clone(), peers)
        })
        .collect()
}

/// Runs the decision once more on its own status, as the next reconcile would.
fn again(case: &mut Case, d: &Decision) -> Decision {
    case.run = with_status(case.run.clone(), d.status.clone());
    case.decide()
}

#[test]
fn an_invalid_spec_waits_with_every_problem_and_creates_nothing() {
    let mut run = run();
    run.spec.model.preset = None;
    run.spec.model.config = Some(
        serde_json::from_value(json!({"vocabSize": 256, "hiddenSize": 100,
            "numHiddenLayers": 2, "numAttentionHeads": 6, "intermediateSize": 256,
            "maxPositionEmbeddings": 128}))
        .unwrap(),
    );
    let d = Case::new(run).decide();
    let (status, reason, message) = condition(&d, "Ready");
    assert_eq!((status, reason), ("False", "InvalidSpec"));
    assert!(
        message.contains("spec.model.config.numAttentionHeads"),
        "{message}"
    );
    assert_eq!(d.status.phase, Some(Phase::Pending));
    assert!(d.children.exchange.is_none() && d.children.groups.is_empty());
    assert!(!d.children.mint_credentials);
    assert_eq!(d.requeue, None, "no retries until the spec changes");
    assert_eq!(reasons(&d), vec!["InvalidSpec", "Pending"]);
}

#[test]
fn an_invalid_spec_is_announced_once() {
    let mut case = Case::new(run());
    case.run.spec.data.tokenizer = "meta/llama".into();
    let first = case.decide();
    let second = again(&mut case, &first);
    assert!(reasons(&first).contains(&"InvalidSpec"));
    assert!(second.events.is_empty(), "{:?}", second.events);
    assert_eq!(second.status, first.status);
}

#[test]
fn a_new_run_mints_its_credentials_before_anything_else() {
    let mut case = Case::new(run());
    case.credentials = false;
    let d = case.decide();
    assert!(d.children.mint_credentials);
    assert!(d.children.exchange.is_none());
    assert_eq!(
        d.status,
        TrainingRunStatus {
            observed_generation: Some(1),
            ..Default::default()
        }
    );
    assert_eq!(reasons(&d), vec!["CredentialsCreated"]);
}

#[test]
fn the_exchange_comes_first_and_peers_wait_for_its_address() {
    let mut case = Case::new(run());
    case.exchange = ExchangeObserved::default();
    let d = case.decide();
    let (deployment, service) = d.children.exchange.as_ref().unwrap();
    assert_eq!(deployment.name_any(), "shakespeare-exchange");
    assert_eq!(service.name_any(), "shakespeare-exchange");
    assert!(d.children.groups.is_empty());
    assert_eq!(condition(&d, "Ready").1, "ExchangeStarting");
    assert_eq!(d.requeue, Some(RESYNC));
}

#[test]
fn the_exchange_speaks_tls_with_the_runs_own_ca_unless_the_spec_turns_it_off() {
    let mut case = Case::new(run());
    let d = case.decide();
    let (ok, reason, _) = condition(&d, "ExchangeTLS");
    assert_eq!((ok, reason), ("True", "RunCA"));
    assert!(
        d.children.groups[0]
            .group
            .spec
            .exchange_endpoint
            .starts_with("https://")
    );

    // Off: minted without a certificate, plain text, and the condition says so.
    case.run.spec.exchange.tls.enabled = false;
    let mut tokens = mint_credentials(case.run.spec.peers.max, 1);
    crate::hub::run_tls::add_to(&mut tokens, &case.run, None).unwrap();
    assert!(!tokens.contains_key("ca.crt"), "no certificate is minted");
    let d = case.decide();
    let (ok, reason, message) = condition(&d, "ExchangeTLS");
    assert_eq!((ok, reason), ("False", "TLSDisabled"));
    assert!(message.contains("plain text"), "{message}");
    let group = &d.children.groups[0];
    assert_eq!(group.group.spec.exchange_endpoint, "http://10.0.0.1:7070");
    let env = &group.group.spec.template.env;
    assert!(
        env.iter().all(|e| !e.name.starts_with("STARLING_TLS")),
        "{env:?}"
    );
}

#[test]
fn the_runs_image_overrides_the_operators_default() {
    let mut case = Case::new(run());
    let d = case.decide();
    let image = |d: &Decision| {
        let pod = d
            .children
            .exchange
            .as_ref()
            .unwrap()
            .0
            .spec
            .template
            .spec
            .clone()
            .unwrap();
        pod.containers[0].image.clone().unwrap()
    };
    assert_eq!(image(&d), "starling-trainer:default");
    assert_eq!(
        d.children.groups[0].group.spec.template.image,
        "starling-trainer:default"
    );
    case.run.spec.peers.image = Some("registry.example/trainer:1".into());
    let d = case.decide();
    assert_eq!(image(&d), "registry.example/trainer:1");
    assert_eq!(
        d.children.groups[0].group.spec.template.image,
        "registry.example/trainer:1"
    );
}

#[test]
fn a_run_with_no_members_is_unschedulable_and_says_why() {
    let mut case = Case::new(run());
    case.members = vec![];
    let d = case.decide();
    assert_eq!(d.status.phase, Some(Phase::Pending));
    let (status, reason, message) = condition(&d, "Ready");
    assert_eq!((status, reason), ("False", "Unschedulable"));
    assert!(message.contains("0 of the 2 peers"), "{message}");
    assert_eq!(d.status.unschedulable_since, Some(Time(at(0))));
    assert!(d.children.groups.is_empty());
    assert!(reasons(&d).contains(&"Unschedulable"));
}

#[test]
fn fewer_placeable_members_than_min_peers_is_unschedulable() {
    let mut case = Case::new(run());
    // One member Ready, one dark: with at most one peer per member only 1 of 2 fits.
    case.members = vec![
        member("cloud-a", "cloud", true),
        member("cloud-b", "cloud", false),
    ];
    let d = case.decide();
    assert_eq!(condition(&d, "Ready").1, "Unschedulable");
    assert!(
        condition(&d, "Ready").2.contains("1 of the 2"),
        "{}",
        condition(&d, "Ready").2
    );
}

#[test]
fn waiting_for_capacity_keeps_its_start_and_is_announced_once() {
    let mut case = Case::new(run());
    case.members = vec![];
    let first = case.decide();
    let mut status = first.status.clone();
    status.unschedulable_since = Some(Time(at(-3_600)));
    case.run = with_status(case.run.clone(), status);
    let later = case.decide();
    assert_eq!(later.status.unschedulable_since, Some(Time(at(-3_600))));
    assert!(later.events.is_empty(), "{:?}", later.events);
    assert_eq!(later.status.phase, Some(Phase::Pending));
}

#[test]
fn a_run_unschedulable_past_its_placement_deadline_fails() {
    let mut case = Case::new(run());
    case.members = vec![];
    case.run.spec.placement.placement_deadline_seconds = 600;
    let status = TrainingRunStatus {
        phase: Some(Phase::Pending),
        unschedulable_since: Some(Time(at(-601))),
        ..Default::default()
    };
    case.run = with_status(case.run.clone(), status);
    let d = case.decide();
    assert_eq!(d.status.phase, Some(Phase::Failed));
    let (status, reason, message) = condition(&d, "Ready");
    assert_eq!((status, reason), ("False", "Unschedulable"));
    assert!(message.contains("placementDeadlineSeconds"), "{message}");
    assert_eq!(condition(&d, "Progressing").0, "False");
    assert!(reasons(&d).contains(&"Failed"));
    assert_eq!(d.requeue, None);
}

#[test]
fn a_placeable_run_gets_one_group_per_member_holding_its_peers() {
    let d = Case::new(run()).decide();
    assert_eq!(
        group_members(&d),
        vec![
            ("cloud-a".into(), vec!["p0".into()]),
            ("cloud-b".into(), vec!["p1".into()]),
            ("cloud-c".into(), vec!["p2".into()]),
        ]
    );
    let child = &d.children.groups[0];
    assert_eq!(
        child.group.namespace().as_deref(),
        Some("starling-member-cloud-a")
    );
    assert_eq!(child.group.spec.exchange_endpoint, "https://10.0.0.1:7070");
    assert_eq!(
        child
            .secret
            .data
            .as_ref()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        vec!["ca.crt", "p0"],
        "its own peer's token, and the run's CA"
    );
    assert!(reasons(&d).contains(&"Placed"));
    assert!(d.children.remove.is_empty());
}

#[test]
fn a_placed_run_waits_for_its_exchange_to_answer() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    let d = case.decide();
    assert_eq!(d.status.phase, Some(Phase::Placing));
    assert_eq!(condition(&d, "Ready").1, "ExchangeStarting");
    assert!(
        !reasons(&d).contains(&"Placed"),
        "placed before: not announced again"
    );
    assert_eq!(d.requeue, Some(RESYNC));
}

#[test]
fn a_running_run_reports_round_loss_tokens_and_compression() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.exchange = exchange(Some(state(3, false)));
    let d = case.decide();
    assert_eq!(d.status.phase, Some(Phase::Running));
    assert_eq!(condition(&d, "Ready"), ("True", "Running", "round 3 of 12"));
    assert_eq!(condition(&d, "Degraded").0, "False");
    assert_eq!(d.status.round, 3);
    assert_eq!(d.status.last_loss, Some(2.5));
    assert_eq!(d.status.loss.as_deref(), Some("2.500"));
    // How the last round closed, to a tenth of a second.
    let last = d.status.last_round.clone().unwrap();
    assert_eq!(
        (last.closed_by.as_str(), last.updates, last.waited_seconds),
        ("quorum", 2, 41.2)
    );
    assert_eq!(last.deadline_seconds, 97.6);
    assert_eq!(d.status.tokens_seen, 5_000);
    // 9 updates × 100 kB dense over 1 kB on the wire.
    assert_eq!(d.status.compression_ratio, Some(900.0));
    assert_eq!(d.status.active_peers, 3);
    assert!(d.status.peers.iter().all(|p| p.state == PeerState::Running));
}

#[test]
fn a_running_run_whose_nothing_changed_decides_the_same_status_without_events() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.exchange = exchange(Some(state(3, false)));
    let first = case.decide();
    let second = again(&mut case, &first);
    assert_eq!(
        second.status, first.status,
        "an unchanged run is not rewritten"
    );
    assert!(second.events.is_empty(), "{:?}", second.events);
    assert_eq!(second.children.configure, None, "settings already in force");
}

#[test]
fn an_exchange_awaiting_its_settings_is_given_the_specs_without_an_event() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    let mut s = state(0, false);
    s.settings = None;
    case.exchange = exchange(Some(s));
    let d = case.decide();
    let settings = d.children.configure.unwrap();
    assert_eq!(settings, contract::settings(&case.run.spec));
    assert_eq!(
        (settings.rounds, settings.min_peers, settings.round_deadline),
        (12, 2, 120.0)
    );
    assert!(!reasons(&d).contains(&"SettingsChanged"), "{:?}", d.events);
}

#[test]
fn an_edit_of_the_runs_length_reaches_the_running_exchange_in_place() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.exchange = exchange(Some(state(1, false)));
    let before = case.decide();
    case.run.spec.schedule.outer_rounds = 14;
    case.run.spec.checkpoint.every_rounds = 2;
    let d = again(&mut case, &before);
    let settings = d.children.configure.unwrap();
    assert_eq!((settings.rounds, settings.checkpoint_every), (14, 2));
    assert_eq!(reasons(&d), ["SettingsChanged"]);
    let message = &d.events[0].message;
    assert!(
        message.contains("schedule.outerRounds 12 → 14")
            && message.contains("checkpoint.everyRounds 4 → 2")
            && !message.contains("peers.min"),
        "{message}"
    );
    // Nothing is replaced: not the exchange pod (its state), not a peer.
    let deployment = |d: &Decision| d.children.exchange.as_ref().unwrap().0.clone();
    assert_eq!(
        deployment(&before),
        deployment(&d),
        "the exchange Deployment changed"
    );
    let groups = |d: &Decision| {
        d.children
            .groups
            .iter()
            .map(|g| g.group.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(groups(&before), groups(&d));
}

#[test]
fn a_run_shortened_below_its_round_in_progress_ends_after_that_round() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.exchange = exchange(Some(state(5, false)));
    case.run.spec.schedule.outer_rounds = 3;
    let d = case.decide();
    assert_eq!(d.children.configure.unwrap().rounds, 6);
    assert_eq!(d.status.phase, Some(Phase::Running));
}

#[test]
fn a_peer_without_an_accepted_update_shows_no_score_so_its_status_stays_equal() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    let mut s = state(1, false);
    s.peers[2].updates_accepted = 0;
    s.peers[2].last_train_loss = f32::NAN;
    case.exchange = exchange(Some(s));
    let first = case.decide();
    assert_eq!(first.status.peers[2].last_score, None);
    assert_eq!(first.status.peers[0].last_score, Some(3.0));
    let second = again(&mut case, &first);
    assert_eq!(second.status, first.status);
}

#[test]
fn checkpoints_are_listed_as_the_exchange_writes_them_keeping_the_last_two() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.exchange = exchange(Some(state(12, false)));
    let d = case.decide();
    let rounds: Vec<u32> = d.status.checkpoints.iter().map(|c| c.round).collect();
    assert_eq!(rounds, vec![8, 12]);
    assert!(
        d.status.checkpoints[1]
            .location
            .ends_with("checkpoints/round-000012")
    );
}

#[test]
fn a_peer_on_a_member_gone_dark_is_replaced_on_a_spare_one() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.members[0] = member("cloud-a", "cloud", false);
    case.members.push(member("cloud-d", "cloud", true));
    case.exchange = exchange(Some(state(2, false)));
    let d = case.decide();
    assert_eq!(
        group_members(&d),
        vec![
            ("cloud-b".into(), vec!["p1".into()]),
            ("cloud-c".into(), vec!["p2".into()]),
            ("cloud-d".into(), vec!["p0".into()]),
        ]
    );
    assert_eq!(d.children.remove.len(), 1);
    assert_eq!(d.children.remove[0].namespace, "starling-member-cloud-a");
    let lost = d.events.iter().find(|e| e.reason == "PeerLost").unwrap();
    assert!(
        lost.message.contains("re-placed on cloud-d"),
        "{}",
        lost.message
    );
    assert_eq!(condition(&d, "Degraded").1, "MemberLost");
    assert_eq!(d.status.phase, Some(Phase::Running));
}

#[test]
fn a_lost_peer_with_nowhere_to_go_leaves_the_others_training() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.members[0] = member("cloud-a", "cloud", false);
    case.exchange = exchange(Some(state(2, false)));
    let d = case.decide();
    assert_eq!(
        group_members(&d),
        vec![
            ("cloud-b".into(), vec!["p1".into()]),
            ("cloud-c".into(), vec!["p2".into()]),
        ]
    );
    let lost = d.events.iter().find(|e| e.reason == "PeerLost").unwrap();
    assert!(
        lost.message.contains("no member has room"),
        "{}",
        lost.message
    );
    assert_eq!(condition(&d, "Degraded").0, "True");
    assert_eq!(d.status.phase, Some(Phase::Running));
    assert_eq!(d.status.peers[0].state, PeerState::Lost);
}

#[test]
fn a_run_that_drops_below_min_peers_keeps_what_runs_and_waits() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.members[0] = member("cloud-a", "cloud", false);
    case.members[1] = member("cloud-b", "cloud", false);
    case.exchange = exchange(Some(state(2, false)));
    let d = case.decide();
    assert_eq!(
        group_members(&d),
        vec![("cloud-c".into(), vec!["p2".into()])]
    );
    assert_eq!(
        d.status.phase,
        Some(Phase::Running),
        "degraded, not restarted"
    );
    assert_eq!(condition(&d, "Degraded").0, "True");
}

#[test]
fn peers_not_training_after_the_first_round_degrade_the_run() {
    let mut case = Case::new(run());
    let members = case.members.clone();
    case.groups = vec![
        group(&case.run, &members[0], &[0], Some("Running")),
        group(&case.run, &members[1], &[1], Some("Running")),
        group(&case.run, &members[2], &[2], Some("Pending")),
    ];
    case.exchange = exchange(Some(state(2, false)));
    let d = case.decide();
    assert_eq!(
        condition(&d, "Degraded"),
        ("True", "PeersMissing", "1 of 3 peers are not training")
    );
    assert!(reasons(&d).contains(&"PeersMissing"));
    assert_eq!(d.status.active_peers, 2);
}

#[test]
fn an_exchange_that_stops_answering_degrades_a_running_run_but_keeps_its_progress() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.exchange = exchange(Some(state(4, false)));
    let running = case.decide();
    case.exchange = exchange(None);
    let d = again(&mut case, &running);
    assert_eq!(d.status.phase, Some(Phase::Running));
    assert_eq!(d.status.round, 4);
    assert_eq!(condition(&d, "Degraded").1, "ExchangeUnreachable");
    assert_eq!(reasons(&d), vec!["ExchangeUnreachable"]);
    assert_eq!(d.requeue, Some(RESYNC));
}

#[test]
fn a_finished_exchange_succeeds_the_run_and_stops_looking() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.exchange = exchange(Some(state(12, true)));
    let d = case.decide();
    assert_eq!(d.status.phase, Some(Phase::Succeeded));
    assert_eq!(
        condition(&d, "Ready"),
        ("True", "Succeeded", "trained 12 rounds")
    );
    assert_eq!(condition(&d, "Progressing").0, "False");
    assert_eq!(d.requeue, None);
    assert!(reasons(&d).contains(&"Succeeded"));
}

#[test]
fn a_succeeded_run_is_never_placed_again() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.exchange = exchange(Some(state(12, true)));
    let done = case.decide();
    // Every member goes dark and the exchange is gone: nothing is re-created or said.
    case.members = case
        .members
        .iter()
        .map(|m| member(&m.name_any(), "cloud", false))
        .collect();
    case.members.push(member("cloud-new", "cloud", true));
    case.exchange = ExchangeObserved::default();
    case.credentials = false;
    let d = again(&mut case, &done);
    assert_eq!(d.status, done.status);
    assert!(d.events.is_empty());
    assert!(!d.children.mint_credentials);
    assert!(
        d.children.exchange.is_none()
            && d.children.groups.is_empty()
            && d.children.remove.is_empty()
    );
    assert_eq!(d.requeue, None);
}

#[test]
fn a_spec_edit_after_success_is_acknowledged_but_changes_nothing() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.exchange = exchange(Some(state(12, true)));
    let done = case.decide();
    case.run.metadata.generation = Some(2);
    case.run.spec.schedule.outer_rounds = 20;
    let d = again(&mut case, &done);
    assert_eq!(d.status.phase, Some(Phase::Succeeded));
    assert!(d.children.groups.is_empty() && d.children.exchange.is_none());
}

#[test]
fn an_exchange_that_keeps_crashing_fails_the_run_and_stops_its_trainers() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.exchange.pod = Some(PodHealth {
        restarts: 5,
        failed: false,
        message: Some("Error, exit code 70".into()),
    });
    let d = case.decide();
    assert_eq!(d.status.phase, Some(Phase::Failed));
    let (_, reason, message) = condition(&d, "Ready");
    assert_eq!(reason, "ExchangeFailed");
    assert!(
        message.contains("crashed 5 times") && message.contains("exit code 70"),
        "{message}"
    );
    assert_eq!(
        d.children.remove.len(),
        3,
        "trainers of a failed run are stopped"
    );
    assert!(d.children.groups.is_empty());
    assert!(reasons(&d).contains(&"ExchangeFailed") && reasons(&d).contains(&"Failed"));
    assert_eq!(d.requeue, None);
}

#[test]
fn an_exchange_pod_that_failed_outright_fails_the_run() {
    let mut case = Case::new(run());
    case.exchange.pod = Some(PodHealth {
        restarts: 0,
        failed: true,
        message: None,
    });
    let d = case.decide();
    assert_eq!(d.status.phase, Some(Phase::Failed));
    assert!(condition(&d, "Ready").2.contains("the exchange pod failed"));
}

#[test]
fn an_exchange_that_restarted_a_few_times_gets_another_chance() {
    let mut case = Case::new(run());
    case.exchange.pod = Some(PodHealth {
        restarts: 4,
        failed: false,
        message: None,
    });
    let d = case.decide();
    assert_ne!(d.status.phase, Some(Phase::Failed));
    assert_eq!(d.children.groups.len(), 3);
}

#[test]
fn a_failed_run_stays_failed_and_recreates_nothing() {
    let status = TrainingRunStatus {
        phase: Some(Phase::Failed),
        ..Default::default()
    };
    let case = Case::new(with_status(run(), status.clone()));
    let d = case.decide();
    assert_eq!(d.status.phase, Some(Phase::Failed));
    assert!(d.children.exchange.is_none() && d.children.groups.is_empty());
    assert!(d.events.is_empty());
}

#[test]
fn a_spec_edit_mid_run_is_reflected_in_observed_generation() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.exchange = exchange(Some(state(3, false)));
    let running = case.decide();
    case.run.metadata.generation = Some(2);
    case.run.spec.schedule.outer_rounds = 14;
    let d = again(&mut case, &running);
    assert_eq!(d.status.observed_generation, Some(2));
    assert_eq!(condition(&d, "Ready").2, "round 3 of 14");
    assert_eq!(d.children.groups.len(), 3, "no peer moves for an edit");
}

#[test]
fn other_runs_trainers_hold_their_members_capacity() {
    let mut case = Case::new(run());
    case.members = ["cloud-a", "cloud-b", "cloud-c", "cloud-d"]
        .iter()
        .map(|n| with_max_trainers(member(n, "cloud", true), 1))
        .collect();
    let mut other = run();
    other.metadata.name = Some("other".into());
    other.metadata.uid = Some("other-uid".into());
    case.groups = vec![group(&other, &case.members[0], &[0], Some("Running"))];
    let d = case.decide();
    let used: Vec<String> = group_members(&d).into_iter().map(|(m, _)| m).collect();
    assert_eq!(used, vec!["cloud-b", "cloud-c", "cloud-d"]);
}

#[test]
fn finished_trainers_of_other_runs_hold_no_capacity() {
    let mut case = Case::new(run());
    case.members = ["cloud-a", "cloud-b", "cloud-c"]
        .iter()
        .map(|n| with_max_trainers(member(n, "cloud", true), 1))
        .collect();
    let mut other = run();
    other.metadata.uid = Some("other-uid".into());
    other.metadata.namespace = Some("team-b".into());
    case.groups = vec![group(&other, &case.members[0], &[0], Some("Succeeded"))];
    let d = case.decide();
    assert_eq!(d.children.groups.len(), 3);
}

#[test]
fn members_without_free_gpus_are_not_used_for_gpu_peers() {
    let mut case = Case::new(run());
    case.run.spec.peers.resources =
        Some(serde_json::from_value(json!({"limits": {"nvidia.com/gpu": "1"}})).unwrap());
    case.members = vec![
        with_gpus(member("cloud-a", "cloud", true), 0),
        with_gpus(member("cloud-b", "cloud", true), 1),
        with_gpus(member("cloud-c", "cloud", true), 2),
    ];
    let d = case.decide();
    let used: Vec<String> = group_members(&d).into_iter().map(|(m, _)| m).collect();
    assert_eq!(used, vec!["cloud-b", "cloud-c"]);
    assert!(
        d.status.peers.iter().any(|p| p.member.is_empty()),
        "one peer waits"
    );
}

#[test]
fn cloud_members_are_used_before_home_ones_whatever_their_names() {
    let mut case = Case::new(run());
    case.run.spec.peers.min = 1;
    case.run.spec.peers.max = 2;
    case.members = vec![
        member("a-home", "home", true),
        member("b-home", "home", true),
        member("y-cloud", "cloud", true),
        member("z-cloud", "cloud", true),
    ];
    let d = case.decide();
    let used: Vec<String> = group_members(&d).into_iter().map(|(m, _)| m).collect();
    assert_eq!(used, vec!["y-cloud", "z-cloud"]);
}

#[test]
fn a_home_members_trainers_are_capped_at_its_declared_upload() {
    let mut case = Case::new(run());
    case.members[2] = member("home-lagos", "home", true);
    let d = case.decide();
    let home = d
        .children
        .groups
        .iter()
        .find(|c| c.group.spec.member == "home-lagos")
        .unwrap();
    assert_eq!(home.group.spec.template.upload_limit_mbps, Some(1000));
    assert_eq!(
        d.children.groups[0].group.spec.template.upload_limit_mbps,
        None
    );
}

#[test]
fn only_a_run_waiting_for_capacity_looks_again_on_a_clock() {
    let mut case = Case::new(run());
    case.members = vec![];
    assert_eq!(case.decide().requeue, Some(CAPACITY_POLL));
    // Placed, training, waiting for its exchange: woken by what changes, resynced rarely.
    case.members = three_clouds();
    assert_eq!(case.decide().requeue, Some(RESYNC));
    case.groups = placed(&case.run, &case.members);
    case.exchange = exchange(Some(state(4, false)));
    let running = case.decide();
    assert_eq!(running.requeue, Some(RESYNC));
    case.exchange = exchange(Some(state(12, true)));
    assert_eq!(again(&mut case, &running).requeue, None);
}

#[test]
fn every_child_that_wakes_its_run_names_it() {
    let case = Case::new(run());
    let d = case.decide();
    let me = vec![ObjectRef::from_obj(&case.run)];
    let (deployment, service) = d.children.exchange.as_ref().unwrap();
    let template = deployment.spec.template.metadata.clone();
    let pod = k8s_openapi::api::core::v1::Pod {
        metadata: template.unwrap(),
        ..Default::default()
    };
    assert_eq!(super::concerned_by_labels(service), me);
    assert_eq!(super::concerned_by_labels(&pod), me);
    assert!(!d.children.groups.is_empty());
    for child in &d.children.groups {
        assert_eq!(super::concerned_by_group(&child.group), me);
    }
}

#[test]
fn a_heartbeat_wakes_no_run_but_a_member_turning_unready_wakes_the_runs_there() {
    let case = Case::new(run());
    let (groups, mut writer) = kube::runtime::reflector::store();
    for g in placed(&case.run, &case.members) {
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply((*g).clone()));
    }
    let wakes = super::runs_on_flipped_member(groups);
    let me = vec![ObjectRef::from_obj(&case.run)];
    assert_eq!(wakes(&member("cloud-a", "cloud", true)), me, "first seen");
    assert!(
        wakes(&member("cloud-a", "cloud", true)).is_empty(),
        "a heartbeat"
    );
    assert_eq!(wakes(&member("cloud-a", "cloud", false)), me, "dark");
    assert!(
        wakes(&member("cloud-z", "cloud", false)).is_empty(),
        "no peers there"
    );
    assert_eq!(wakes(&member("cloud-a", "cloud", true)), me, "back");
}

#[test]
fn a_run_read_before_its_last_status_write_is_decided_on_that_status() {
    let mut case = Case::new(run());
    let first = case.decide();
    let written = super::WrittenStatuses::default();
    written.record(&case.run, first.status.clone());
    // The controller's copy still has no status: decided on it, the phase would be
    // announced and written again.
    let fresh = written.fresh(&case.run).into_owned();
    assert_eq!(fresh.status.as_ref(), Some(&first.status));
    case.run = fresh;
    let next = case.decide();
    assert_eq!(next.status, first.status);
    assert!(next.events.is_empty(), "{:?}", reasons(&next));
    written.forget(&case.run.uid().unwrap());
    assert!(written.fresh(&run()).status.is_none());
}

mod publishing;
mod scoring;
mod storage;
mod tls;
