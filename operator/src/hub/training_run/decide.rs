//! What a TrainingRun should look like, as a pure function of what was observed and
//! `now`: its children (credentials, exchange, one TrainerGroup per member), its status,
//! the Events that tell a person what changed, and when to look again. No I/O here, so
//! every case is a table row in the tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use starling_trainer::exchange::{Settings, proto};

use super::placing::{self, Placed};
use super::{progress, publishing, scoring};
use crate::api::{
    MemberCluster, Phase, ServiceType, TrainerGroup, TrainingRun, TrainingRunStatus, validation,
};
use crate::contract;
use crate::hub::children::{
    self, EvaluatorSettings, ExchangeEndpoint, ExchangeSettings, GroupChildren, GroupSettings,
};
use crate::hub::run_tls;
use crate::k8s::{condition, condition_true, reason, set_condition};
use crate::placement::Plan;

/// How often a live run is looked at again without a change. Its exchange's progress,
/// Service, pod, TrainerGroups and members wake it as they change; this only repairs what
/// a lost wake-up (or an edit nothing watches) would leave behind.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How often a run that waits for capacity looks again: a member's room grows without
/// any event that names the run.
pub const CAPACITY_POLL: Duration = Duration::from_secs(5);
/// Restarts after which an exchange that keeps crashing fails its run.
pub const EXCHANGE_MAX_RESTARTS: u32 = 5;

/// Everything one decision reads.
pub struct Observed<'a> {
    pub run: &'a TrainingRun,
    pub now: Timestamp,
    /// The trainer image runs use when they name none.
    pub default_image: &'a str,
    /// What the operator adds to the environment of the exchange it makes (its own
    /// OpenTelemetry settings).
    pub trace_env: &'a [EnvVar],
    /// The run's tokens, once minted.
    pub credentials: Option<BTreeMap<String, String>>,
    pub exchange: ExchangeObserved,
    /// Every MemberCluster.
    pub members: &'a [Arc<MemberCluster>],
    /// Every TrainerGroup, this run's and other runs' (they hold capacity).
    pub groups: &'a [Arc<TrainerGroup>],
}

/// What is known of the run's exchange.
#[derive(Clone, Debug, Default)]
pub struct ExchangeObserved {
    /// Where peers dial it (`host:port`, see `children::advertised_address`), once its
    /// Service says.
    pub address: Option<String>,
    /// Its pod, once there is one.
    pub pod: Option<PodHealth>,
    /// What it answered when asked for the run's state; `None` while it does not answer.
    pub state: Option<proto::RunState>,
}

/// The exchange pod as far as its run's fate goes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodHealth {
    pub restarts: u32,
    /// The pod ended in phase `Failed` (it will not be restarted in place).
    pub failed: bool,
    /// Why it last stopped, when the kubelet said.
    pub message: Option<String>,
}

/// An Event to publish on the run.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

/// A TrainerGroup (and its Secret) to delete.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupRef {
    pub namespace: String,
    pub name: String,
    pub secret: String,
}

/// The objects to write; anything not named here is left as it is.
#[derive(Default)]
pub struct Children {
    pub mint_credentials: bool,
    pub exchange: Option<(
        k8s_openapi::api::apps::v1::Deployment,
        k8s_openapi::api::core::v1::Service,
    )>,
    pub groups: Vec<GroupChildren>,
    pub remove: Vec<GroupRef>,
    /// Settings to put in force in the running exchange (it differs from the spec).
    pub configure: Option<Settings>,
    /// The publisher Job for the checkpoint due for the Hub.
    pub publisher: Option<k8s_openapi::api::batch::v1::Job>,
    /// The run's evaluator Jobs.
    pub evaluators: Vec<k8s_openapi::api::batch::v1::Job>,
    /// A scored round's ledger record and weights, for the exchange.
    pub score: Option<super::scoring::Scored>,
}

pub struct Decision {
    pub status: TrainingRunStatus,
    pub events: Vec<Note>,
    pub children: Children,
    /// When to look again without a change; `None` waits for one.
    pub requeue: Option<Duration>,
}

impl Decision {
    /// What the decision does, in a line: the phase it leaves the run in, the Events it
    /// emits and the objects it writes (a reconcile's trace attribute).
    pub fn summary(&self) -> String {
        let c = &self.children;
        let mut parts = vec![format!(
            "phase={}",
            self.status.phase.map_or("-".to_string(), |p| p.to_string())
        )];
        let reasons: Vec<&str> = self.events.iter().map(|n| n.reason).collect();
        if !reasons.is_empty() {
            parts.push(format!("events={}", reasons.join(",")));
        }
        for (what, n) in [
            ("credentials", usize::from(c.mint_credentials)),
            ("exchange", usize::from(c.exchange.is_some())),
            ("groups", c.groups.len()),
            ("remove", c.remove.len()),
            ("configure", usize::from(c.configure.is_some())),
            ("publisher", usize::from(c.publisher.is_some())),
            ("evaluators", c.evaluators.len()),
            ("score", usize::from(c.score.is_some())),
        ] {
            if n > 0 {
                parts.push(format!("{what}={n}"));
            }
        }
        parts.join(" ")
    }
}

/// A decision being made: the status so far and the notes to emit.
pub(super) struct Draft<'a> {
    pub(super) o: &'a Observed<'a>,
    pub(super) previous: TrainingRunStatus,
    pub(super) status: TrainingRunStatus,
    pub(super) events: Vec<Note>,
    pub(super) children: Children,
}

impl<'a> Draft<'a> {
    fn new(o: &'a Observed<'a>) -> Self {
        let previous = o.run.status.clone().unwrap_or_default();
        let mut status = previous.clone();
        status.observed_generation = o.run.metadata.generation;
        Self {
            o,
            previous,
            status,
            events: vec![],
            children: Children::default(),
        }
    }

    pub(super) fn condition(
        &mut self,
        type_: &str,
        ok: bool,
        reason: &str,
        message: impl Into<String>,
    ) {
        set_condition(
            &mut self.status.conditions,
            type_,
            ok,
            reason,
            message,
            self.o.run.metadata.generation,
            self.o.now,
        );
    }

    pub(super) fn note(&mut self, warning: bool, reason: &'static str, message: impl Into<String>) {
        self.events.push(Note {
            warning,
            reason,
            message: message.into(),
        });
    }

    /// Notes `reason` only when the previous status did not already carry it on `type_`:
    /// a state is announced once, not on every look.
    pub(super) fn note_once(
        &mut self,
        type_: &str,
        warning: bool,
        reason: &'static str,
        message: &str,
    ) {
        let known = crate::k8s::condition_reason(&self.previous.conditions, type_) == Some(reason);
        if !known {
            self.note(warning, reason, message);
        }
    }

    pub(super) fn phase(&mut self, phase: Phase) {
        if self.previous.phase != Some(phase) {
            let message = format!("phase {phase} (round {})", self.status.round);
            let reason = match phase {
                Phase::Pending => "Pending",
                Phase::Placing => "Placing",
                Phase::Running => reason::RUNNING,
                Phase::Publishing => reason::PUBLISHING,
                Phase::Succeeded => reason::SUCCEEDED,
                Phase::Failed => reason::FAILED,
            };
            self.note(phase == Phase::Failed, reason, message);
        }
        self.status.phase = Some(phase);
        let terminal = phase.is_terminal();
        self.condition(
            condition::PROGRESSING,
            !terminal,
            if terminal {
                reason::RUN_FINISHED
            } else {
                reason::TRAINING
            },
            "",
        );
    }

    pub(super) fn finish(self, requeue: Option<Duration>) -> Decision {
        Decision {
            status: self.status,
            events: self.events,
            children: self.children,
            requeue,
        }
    }

    /// The run cannot go on: say why, stop its trainers, keep the exchange (and its
    /// checkpoints) for inspection, and never re-create anything.
    pub(super) fn fail(mut self, reason: &'static str, message: String) -> Decision {
        self.condition(condition::READY, false, reason, message.clone());
        self.condition(condition::DEGRADED, true, reason, message.clone());
        self.note(true, reason, message);
        self.phase(Phase::Failed);
        self.children.remove = our_groups(self.o);
        self.finish(None)
    }
}

pub fn decide(o: &Observed) -> Decision {
    let mut d = Draft::new(o);
    if d.previous.phase.is_some_and(Phase::is_terminal) {
        // Finished runs are never re-placed; only a changed spec is acknowledged.
        return d.finish(None);
    }
    let run_env = match validated_env(o.run) {
        Ok(env) => env,
        Err(problems) => {
            d.note_once(condition::READY, true, reason::INVALID_SPEC, &problems);
            d.condition(condition::READY, false, reason::INVALID_SPEC, problems);
            d.phase(Phase::Pending);
            return d.finish(None);
        }
    };
    let Some(tokens) = o.credentials.clone() else {
        // Minting is not pure (random tokens): the caller mints and decides again.
        d.children.mint_credentials = true;
        d.note(
            false,
            reason::CREDENTIALS_CREATED,
            format!("minted {} peer tokens", o.run.spec.peers.max),
        );
        return d.finish(Some(Duration::ZERO));
    };
    let image = o.run.spec.peers.image.as_deref().unwrap_or(o.default_image);
    let tls = exchange_tls(&mut d, &tokens);
    d.children.exchange = Some(children::exchange(
        o.run,
        &ExchangeSettings {
            image,
            run_env: &run_env,
            exchange_env: [
                contract::exchange_env(&o.run.name_any(), o.run.spec.exchange.storage.as_ref()),
                o.trace_env.to_vec(),
            ]
            .concat(),
            tls,
        },
    ));
    if let Some(why) = exchange_failure(o.exchange.pod.as_ref()) {
        return d.fail(reason::EXCHANGE_FAILED, why);
    }
    exchange_storage(&mut d);
    let Some(address) = &o.exchange.address else {
        let waiting = match o.run.spec.exchange.service.type_ {
            ServiceType::NodePort => "waiting for the exchange Service's node port",
            _ => "waiting for the exchange Service's load-balancer address",
        };
        starting(&mut d, waiting);
        return d.finish(Some(RESYNC));
    };
    let endpoint = ExchangeEndpoint::new(address, tls, run_tls::server_name(o.run));
    let precision = o.run.spec.peers.precision;
    let peer_env = contract::peer_env(o.run.annotations(), precision, &run_env);
    let settings = GroupSettings {
        image,
        run_env: &peer_env,
        resources: o.run.spec.peers.resources.clone(),
        endpoint: &endpoint,
    };
    match placing::place(&mut d, &tokens, &settings) {
        Placed::Yes { plan, lost } => {
            progress::report(&mut d.status, o, &plan);
            let evaluators = EvaluatorSettings {
                image,
                run_env: &run_env,
                endpoint: &endpoint,
            };
            scoring::score(&mut d, &tokens, &evaluators);
            let final_pending = publish(&mut d, image, &endpoint);
            progress_phase(d, &plan, lost, final_pending)
        }
        Placed::No(decision) => *decision,
    }
}

/// Whether the exchange speaks TLS (the run's credentials hold its certificate), said
/// in the `ExchangeTLS` condition.
fn exchange_tls(d: &mut Draft, tokens: &BTreeMap<String, String>) -> bool {
    let tls = tokens.contains_key(run_tls::CA_KEY);
    let spec = &d.o.run.spec.exchange.tls;
    let (reason, message) = match (tls, spec.enabled, &spec.secret_name) {
        (true, _, Some(secret)) => (
            reason::CERTIFICATE_SECRET,
            format!(
                "peers, evaluators, the publisher and the operator verify the exchange as \
                 {} with the CA of Secret {secret}",
                run_tls::server_name(d.o.run)
            ),
        ),
        (true, _, None) => (
            reason::RUN_CA,
            "peers, evaluators, the publisher and the operator verify the exchange with \
             the run's own CA"
                .to_owned(),
        ),
        (false, true, _) => (
            reason::NO_CERTIFICATE,
            "the run's credentials were minted without a certificate: its exchange speaks \
             plain text"
                .to_owned(),
        ),
        (false, false, _) => (
            reason::TLS_DISABLED,
            "spec.exchange.tls.enabled is false: peers' tokens and updates cross the \
             network in plain text"
                .to_owned(),
        ),
    };
    d.condition(condition::EXCHANGE_TLS, tls, reason, message);
    tls
}

/// Whether the exchange can use the run's bucket, once it answers, said in the
/// `ExchangeStorage` condition (with an Event when it cannot).
fn exchange_storage(d: &mut Draft) {
    let o = d.o;
    let (Some(storage), Some(state)) = (&o.run.spec.exchange.storage, &o.exchange.state) else {
        return;
    };
    if state.storage_error.is_empty() {
        let message = format!("payloads and the exchange's state are in {}", storage.url);
        d.condition(
            condition::EXCHANGE_STORAGE,
            true,
            reason::STORAGE_READY,
            message,
        );
        return;
    }
    let secret = match &storage.credentials_secret {
        Some(secret) => format!("Secret {secret}"),
        None => "the exchange pod's cloud identity".to_owned(),
    };
    let message = format!(
        "the exchange cannot use {}: {}. It admits no peer and tries again every few \
         seconds; check spec.exchange.storage and {secret}",
        storage.url, state.storage_error
    );
    let unavailable = reason::STORAGE_UNAVAILABLE;
    d.note_once(condition::EXCHANGE_STORAGE, true, unavailable, &message);
    d.condition(condition::EXCHANGE_STORAGE, false, unavailable, message);
}

/// Ready=False while the exchange comes up.
fn starting(d: &mut Draft, message: &str) {
    d.condition(condition::READY, false, reason::EXCHANGE_STARTING, message);
    d.phase(Phase::Placing);
}

/// The spec's problems, every one with its field path, or the run configuration.
fn validated_env(run: &TrainingRun) -> Result<Vec<EnvVar>, String> {
    validation::validate(&run.spec)
        .map_err(|e| e.to_string())
        .and_then(|()| contract::run_env(&run.spec).map_err(|e| e.to_string()))
}

/// Why the exchange is beyond saving, if it is.
fn exchange_failure(pod: Option<&PodHealth>) -> Option<String> {
    let pod = pod?;
    let why = pod.message.as_deref().unwrap_or("no reason given");
    if pod.failed {
        Some(format!("the exchange pod failed: {why}"))
    } else if pod.restarts >= EXCHANGE_MAX_RESTARTS {
        Some(format!(
            "the exchange crashed {} times (last: {why})",
            pod.restarts
        ))
    } else {
        None
    }
}

pub(super) fn our_groups(o: &Observed) -> Vec<GroupRef> {
    groups_of(&o.run.uid().unwrap_or_default(), o.groups)
}

/// The TrainerGroups of the run with `uid`, to delete.
pub fn groups_of(uid: &str, groups: &[Arc<TrainerGroup>]) -> Vec<GroupRef> {
    groups
        .iter()
        .filter(|g| g.spec.run_ref.uid == uid)
        .map(|g| GroupRef {
            namespace: g.namespace().unwrap_or_default(),
            name: g.name_any(),
            secret: g.spec.credentials_secret.clone(),
        })
        .collect()
}

/// Publishes what is due (the publisher Job, the `Published` condition, its Events);
/// says whether the final checkpoint is still being published.
fn publish(d: &mut Draft, image: &str, exchange: &ExchangeEndpoint) -> bool {
    let o = d.o;
    let (Some(state), Some(spec)) = (&o.exchange.state, &o.run.spec.publish) else {
        return false;
    };
    let outcome = publishing::publishing(o.run, state, &d.previous, &mut d.status);
    d.children.publisher = outcome
        .job
        .map(|round| children::publisher_job(o.run, spec, image, exchange, round));
    for (warning, reason, message) in outcome.notes {
        d.note(warning, reason, message);
    }
    if let Some((ok, reason, message)) = outcome.condition {
        d.condition(condition::PUBLISHED, ok, reason, message);
    }
    outcome.final_pending
}

/// Phase and conditions from the exchange's progress, once placed.
fn progress_phase(mut d: Draft, plan: &Plan, lost: usize, final_pending: bool) -> Decision {
    let o = d.o;
    let Some(state) = &o.exchange.state else {
        if d.previous.phase == Some(Phase::Running) {
            let message = "the exchange does not answer; peers keep their state and retry";
            d.note_once(
                condition::DEGRADED,
                true,
                reason::EXCHANGE_UNREACHABLE,
                message,
            );
            d.condition(
                condition::DEGRADED,
                true,
                reason::EXCHANGE_UNREACHABLE,
                message,
            );
            d.phase(Phase::Running);
        } else {
            starting(&mut d, "waiting for the exchange to answer");
        }
        return d.finish(Some(RESYNC));
    };
    if state.done && final_pending {
        let message = format!(
            "trained {} rounds; publishing the final checkpoint",
            d.status.round
        );
        d.condition(condition::READY, true, reason::PUBLISHING, message);
        d.phase(Phase::Publishing);
        return d.finish(Some(RESYNC));
    }
    if state.done {
        let message = format!("trained {} rounds", d.status.round);
        d.condition(condition::READY, true, reason::SUCCEEDED, message);
        d.condition(condition::DEGRADED, false, reason::RUN_FINISHED, "");
        d.phase(Phase::Succeeded);
        return d.finish(None);
    }
    keep_settings(&mut d, state);
    let missing = o.run.spec.peers.max.saturating_sub(d.status.active_peers);
    let degraded = if lost > 0 {
        Some((
            reason::MEMBER_LOST,
            format!("{lost} peer(s) lost with their member"),
        ))
    } else if !plan.unplaced.is_empty() {
        Some((
            reason::PEERS_UNPLACED,
            format!("{} peer(s) wait for capacity", plan.unplaced.len()),
        ))
    } else if d.status.round > 0 && missing > 0 {
        Some((
            reason::PEERS_MISSING,
            format!(
                "{missing} of {} peers are not training",
                o.run.spec.peers.max
            ),
        ))
    } else {
        None
    };
    match degraded {
        Some((why, message)) => {
            if !condition_true(&d.previous.conditions, condition::DEGRADED) {
                d.note(true, why, message.clone());
            }
            d.condition(condition::DEGRADED, true, why, message);
        }
        None => d.condition(condition::DEGRADED, false, reason::ALL_PEERS_TRAINING, ""),
    }
    let message = format!(
        "round {} of {}",
        d.status.round, o.run.spec.schedule.outer_rounds
    );
    d.condition(condition::READY, true, reason::RUNNING, message);
    d.phase(Phase::Running);
    d.finish(Some(RESYNC))
}

/// Keeps the running exchange's settings equal to the spec's, so that edits to the run's
/// length, quorum, round deadline or checkpoint interval take effect in place. The round
/// in progress always finishes: a run shortened below it ends after it.
fn keep_settings(d: &mut Draft, state: &proto::RunState) {
    let mut desired = contract::settings(&d.o.run.spec);
    desired.rounds = desired.rounds.max(state.open_round + 1);
    let current = state.settings.and_then(|s| Settings::try_from(s).ok());
    if current == Some(desired) {
        return;
    }
    if let Some(current) = current {
        d.note(
            false,
            reason::SETTINGS_CHANGED,
            settings_change(&current, &desired),
        );
    }
    d.children.configure = Some(desired);
}

/// `outerRounds 12 → 14, ...`: what changed, in the spec's terms.
fn settings_change(from: &Settings, to: &Settings) -> String {
    let fields = [
        (
            "schedule.outerRounds",
            f64::from(from.rounds),
            f64::from(to.rounds),
        ),
        (
            "peers.min",
            f64::from(from.min_peers),
            f64::from(to.min_peers),
        ),
        (
            "placement.roundDeadlineSeconds",
            from.round_deadline,
            to.round_deadline,
        ),
        (
            "checkpoint.everyRounds",
            f64::from(from.checkpoint_every),
            f64::from(to.checkpoint_every),
        ),
        (
            "placement.roundDeadlineFloorSeconds",
            from.round_deadline_floor,
            to.round_deadline_floor,
        ),
        ("placement.roundQuorum", from.round_quorum, to.round_quorum),
    ];
    let changed: Vec<String> = fields
        .iter()
        .filter(|(_, a, b)| a != b)
        .map(|(name, a, b)| format!("{name} {a} → {b}"))
        .collect();
    format!("changed in the running exchange: {}", changed.join(", "))
}
