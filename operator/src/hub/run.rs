//! TrainingRun controller: validate, start the exchange, mint credentials, place peers on
//! members as TrainerGroups, and report the run's progress in its status and Events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use starling_trainer::exchange::client::{ClientOptions, ExchangeClient};
use starling_trainer::exchange::proto;

use super::{Context, Error, apply_object};
use crate::api::{
    CheckpointRecord, MemberCluster, PeerId, PeerState, PeerStatus, Phase, TrainerGroup,
    TrainingRun, TrainingRunStatus, validation,
};
use crate::placement::{self, Member, Request};
use crate::resources::{
    self, EXCHANGE_PORT, EXCHANGE_WORKDIR, LABEL_RUN_UID, MANAGER, condition_true, group_name,
    member_namespace, set_condition,
};

const FINALIZER: &str = "starling.dev/cleanup";
/// How often a running run's exchange is polled for progress.
const POLL: Duration = Duration::from_secs(2);

/// A cached connection to a run's exchange.
pub struct ExchangeConnection {
    url: String,
    client: ExchangeClient,
}

pub async fn reconcile(run: Arc<TrainingRun>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = run.namespace().unwrap_or_default();
    let api: Api<TrainingRun> = Api::namespaced(ctx.client.clone(), &ns);
    let key = format!("tr/{ns}/{}", run.name_any());
    let action = finalizer(&api, FINALIZER, run, |event| async {
        match event {
            Finalizer::Apply(run) => apply(&run, &ctx).await,
            Finalizer::Cleanup(run) => cleanup(&run, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.succeeded(&key);
    Ok(action)
}

pub fn error_policy(run: Arc<TrainingRun>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(run = %run.name_any(), %error, "reconcile failed");
    let event = Event {
        type_: EventType::Warning,
        reason: "ReconcileError".into(),
        note: Some(truncate(&error.to_string(), 1000)),
        action: "Reconcile".into(),
        secondary: None,
    };
    let reference = run.object_ref(&());
    let recorder = ctx.recorder.clone();
    tokio::spawn(async move {
        let _ = recorder.publish(&event, &reference).await;
    });
    ctx.backoff(format!(
        "tr/{}/{}",
        run.namespace().unwrap_or_default(),
        run.name_any()
    ))
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

async fn apply(run: &TrainingRun, ctx: &Context) -> Result<Action, Error> {
    let ns = run.namespace().unwrap_or_default();
    let previous = run.status.clone().unwrap_or_default();
    let mut status = previous.clone();
    status.observed_generation = run.metadata.generation;
    let generation = run.metadata.generation;

    if previous.phase.is_some_and(Phase::is_terminal)
        && previous.observed_generation == run.metadata.generation
    {
        return Ok(Action::await_change());
    }

    // 1. The spec: every problem, with its field path, in one condition; no retries
    // until the spec changes.
    let env = validation::validate(&run.spec)
        .map_err(|e| e.to_string())
        .and_then(|()| resources::run_env(&run.spec).map_err(|e| e.to_string()));
    let env = match env {
        Ok(env) => env,
        Err(problems) => {
            status.phase = Some(Phase::Pending);
            set_condition(
                &mut status.conditions,
                "Ready",
                false,
                "InvalidSpec",
                problems.clone(),
                generation,
            );
            write_status(ctx, run, &previous, status).await?;
            if !previous
                .conditions
                .iter()
                .any(|c| c.reason == "InvalidSpec")
            {
                event(ctx, run, EventType::Warning, "InvalidSpec", &problems).await;
            }
            return Ok(Action::await_change());
        }
    };

    // 2. Credentials, minted once: peers and the exchange must agree on them.
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let credentials = match secrets.get_opt(&resources::credentials_name(run)).await? {
        Some(secret) => secret,
        None => {
            let secret: Secret =
                serde_json::from_value(resources::credentials_secret(run, run.spec.peers.max))?;
            let created = secrets.create(&PostParams::default(), &secret).await?;
            event(
                ctx,
                run,
                EventType::Normal,
                "CredentialsCreated",
                &format!("minted {} peer tokens", run.spec.peers.max),
            )
            .await;
            created
        }
    };
    let token = |key: &str| -> Option<String> {
        credentials
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
    };

    // 3. The exchange.
    let image = run
        .spec
        .peers
        .image
        .clone()
        .unwrap_or_else(|| ctx.config.trainer_image.clone());
    let (deployment, service) = resources::exchange_objects(run, &image, &env);
    apply_object(ctx, deployment).await?;
    apply_object(ctx, service).await?;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let endpoint = services
        .get_opt(&resources::exchange_name(run))
        .await?
        .and_then(|s| s.status?.load_balancer?.ingress?.into_iter().next())
        .and_then(|i| i.hostname.or(i.ip))
        .map(|host| format!("http://{host}:{EXCHANGE_PORT}"));
    let Some(endpoint) = endpoint else {
        status.phase = Some(Phase::Placing);
        set_condition(
            &mut status.conditions,
            "Ready",
            false,
            "ExchangeStarting",
            "waiting for the exchange Service's load-balancer address",
            generation,
        );
        write_status(ctx, run, &previous, status).await?;
        return Ok(Action::requeue(POLL));
    };

    // 4. Placement over the Ready members.
    let members: Vec<MemberCluster> = Api::<MemberCluster>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let groups: Vec<TrainerGroup> = Api::<TrainerGroup>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let uid = run.uid().unwrap_or_default();
    let ours = |g: &TrainerGroup| g.spec.run_ref.uid == uid;
    let ready: BTreeMap<String, &MemberCluster> = members
        .iter()
        .filter(|m| {
            m.status
                .as_ref()
                .is_some_and(|s| condition_true(&s.conditions, "Ready"))
        })
        .map(|m| (m.name_any(), m))
        .collect();
    let mut current: BTreeMap<PeerId, String> = BTreeMap::new();
    for g in groups.iter().filter(|g| ours(g)) {
        for p in &g.spec.peers {
            current.insert(*p, g.spec.member.clone());
        }
    }
    let lost: Vec<(PeerId, String)> = current
        .iter()
        .filter(|(_, m)| !ready.contains_key(*m))
        .map(|(p, m)| (*p, m.clone()))
        .collect();
    let gpus_per_peer = gpus_per_peer(run);
    let candidates: Vec<Member> = ready
        .values()
        .map(|m| {
            let others: Vec<&TrainerGroup> = groups
                .iter()
                .filter(|g| !ours(g) && g.spec.member == m.name_any())
                .collect();
            let other_peers: u32 = others.iter().map(|g| g.spec.peers.len() as u32).sum();
            let other_gpus: u32 = others
                .iter()
                .map(|g| g.spec.peers.len() as u32 * template_gpus(g))
                .sum();
            let ours_here = current.values().filter(|c| **c == m.name_any()).count() as u32;
            let by_trainers = m
                .spec
                .max_trainers
                .map(|max| max.saturating_sub(other_peers + ours_here));
            let by_gpus = (gpus_per_peer > 0).then(|| {
                let allocatable = m.status.as_ref().map_or(0, |s| s.gpus_allocatable);
                allocatable.saturating_sub(other_gpus + ours_here * gpus_per_peer) / gpus_per_peer
            });
            Member {
                name: m.name_any(),
                tier: m.spec.tier,
                region: m.spec.region.clone(),
                upload_mbps: m.spec.bandwidth.upload_mbps,
                labels: m.spec.labels.clone(),
                free_slots: match (by_trainers, by_gpus) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                },
            }
        })
        .collect();
    let request = Request {
        min_peers: run.spec.peers.min,
        max_peers: run.spec.peers.max,
        spec: &run.spec.placement,
        current: &current,
    };
    let plan = match placement::place(&request, &candidates) {
        Ok(plan) => plan,
        Err(unschedulable) if current.is_empty() => {
            let message = unschedulable.to_string();
            status.phase = Some(Phase::Pending);
            set_condition(
                &mut status.conditions,
                "Ready",
                false,
                "Unschedulable",
                message.clone(),
                generation,
            );
            write_status(ctx, run, &previous, status).await?;
            if !previous
                .conditions
                .iter()
                .any(|c| c.reason == "Unschedulable")
            {
                event(ctx, run, EventType::Warning, "Unschedulable", &message).await;
            }
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        Err(unschedulable) => {
            // Already running: keep what still runs and wait for capacity; the run is
            // degraded, not restarted.
            let keep: BTreeMap<PeerId, String> = current
                .iter()
                .filter(|(_, m)| ready.contains_key(*m))
                .map(|(p, m)| (*p, m.clone()))
                .collect();
            set_condition(
                &mut status.conditions,
                "Degraded",
                true,
                "Unschedulable",
                unschedulable.to_string(),
                generation,
            );
            placement::Plan {
                unplaced: (0..run.spec.peers.max)
                    .map(PeerId::new)
                    .filter(|p| !keep.contains_key(p))
                    .collect(),
                assignment: keep,
            }
        }
    };
    for (peer, from) in &lost {
        let to = plan.assignment.get(peer);
        let note = match to {
            Some(to) => format!("{peer}: member {from} is not Ready; re-placed on {to}"),
            None => format!("{peer}: member {from} is not Ready; no member has room for it"),
        };
        event(ctx, run, EventType::Warning, "PeerLost", &note).await;
    }

    // 5. One TrainerGroup (and its credentials) per member in the plan; others removed.
    let mut by_member: BTreeMap<String, Vec<PeerId>> = BTreeMap::new();
    for (peer, member) in &plan.assignment {
        by_member.entry(member.clone()).or_default().push(*peer);
    }
    let placed_before = !current.is_empty();
    for (member, peers) in &by_member {
        let m = ready[member];
        write_group(ctx, run, m, peers, &endpoint, &image, &env, &token).await?;
    }
    for g in groups.iter().filter(|g| ours(g)) {
        if !by_member.contains_key(&g.spec.member) {
            delete_group(ctx, g).await?;
        }
    }
    if !placed_before {
        let summary = by_member
            .iter()
            .map(|(m, p)| format!("{m}: {}", p.len()))
            .collect::<Vec<_>>()
            .join(", ");
        event(
            ctx,
            run,
            EventType::Normal,
            "Placed",
            &format!("{} peers placed ({summary})", plan.assignment.len()),
        )
        .await;
    }

    // 6. Progress from the exchange and the groups.
    let state = match token("operator") {
        Some(t) => poll_exchange(ctx, &uid, &endpoint, &t).await,
        None => None,
    };
    let groups_now: Vec<TrainerGroup> = groups.into_iter().filter(|g| ours(g)).collect();
    status.peers = (0..run.spec.peers.max)
        .map(PeerId::new)
        .map(|peer| peer_status(&peer, &plan, &groups_now, state.as_ref()))
        .collect();
    status.active_peers = status
        .peers
        .iter()
        .filter(|p| p.state == PeerState::Running)
        .count() as u32;
    let mut phase = Phase::Running;
    if let Some(state) = &state {
        let closed = state.open_round.min(state.rounds);
        status.round = closed;
        status.tokens_seen = state.tokens;
        status.bytes_received = state.bytes_received;
        status.bytes_sent = state.bytes_sent;
        if let Some(last) = state.recent.last() {
            status.last_loss = Some(f64::from(last.validation_loss));
        }
        let updates: u64 = state
            .peers
            .iter()
            .map(|p| u64::from(p.updates_accepted))
            .sum();
        if state.bytes_received > 0 {
            status.compression_ratio = Some(
                ((updates * state.dense_update_bytes) as f64 / state.bytes_received as f64 * 10.0)
                    .round()
                    / 10.0,
            );
        }
        status.checkpoints = checkpoints(run, closed, &previous.checkpoints);
        if state.done {
            phase = Phase::Succeeded;
        }
    } else if previous.phase != Some(Phase::Running) {
        phase = Phase::Placing;
    }
    let missing = run.spec.peers.max - status.active_peers;
    let degraded = phase == Phase::Running
        && (!plan.unplaced.is_empty() || !lost.is_empty() || (status.round > 0 && missing > 0));
    if phase == Phase::Succeeded {
        set_condition(
            &mut status.conditions,
            "Degraded",
            false,
            "RunFinished",
            "",
            generation,
        );
    } else if degraded {
        let (reason, message) = if !lost.is_empty() {
            (
                "MemberLost",
                format!("{} peer(s) lost with their member", lost.len()),
            )
        } else if !plan.unplaced.is_empty() {
            (
                "PeersUnplaced",
                format!("{} peer(s) wait for capacity", plan.unplaced.len()),
            )
        } else {
            (
                "PeersMissing",
                format!("{missing} of {} peers are not training", run.spec.peers.max),
            )
        };
        if !condition_true(&status.conditions, "Degraded") {
            event(ctx, run, EventType::Warning, reason, &message).await;
        }
        set_condition(
            &mut status.conditions,
            "Degraded",
            true,
            reason,
            message,
            generation,
        );
    } else if state.is_some() {
        set_condition(
            &mut status.conditions,
            "Degraded",
            false,
            "AllPeersTraining",
            "",
            generation,
        );
    }
    let (ready_reason, ready_message) = match phase {
        Phase::Succeeded => ("Succeeded", format!("trained {} rounds", status.round)),
        Phase::Running => (
            "Running",
            format!(
                "round {} of {}",
                status.round, run.spec.schedule.outer_rounds
            ),
        ),
        _ => (
            "ExchangeStarting",
            "waiting for the exchange to answer".to_string(),
        ),
    };
    set_condition(
        &mut status.conditions,
        "Ready",
        phase != Phase::Placing,
        ready_reason,
        ready_message,
        generation,
    );
    set_condition(
        &mut status.conditions,
        "Progressing",
        !phase.is_terminal(),
        if phase.is_terminal() {
            "RunFinished"
        } else {
            "Training"
        },
        "",
        generation,
    );
    if previous.phase != Some(phase) {
        event(
            ctx,
            run,
            EventType::Normal,
            &phase.to_string(),
            &format!("phase {} (round {})", phase, status.round),
        )
        .await;
    }
    status.phase = Some(phase);
    write_status(ctx, run, &previous, status).await?;
    Ok(if phase.is_terminal() {
        Action::await_change()
    } else {
        Action::requeue(POLL)
    })
}

/// GPUs each peer asks for (`nvidia.com/gpu` in limits, else requests).
fn gpus_per_peer(run: &TrainingRun) -> u32 {
    run.spec
        .peers
        .resources
        .as_ref()
        .and_then(|r| {
            r.limits
                .as_ref()
                .and_then(|l| l.get("nvidia.com/gpu"))
                .or_else(|| r.requests.as_ref().and_then(|l| l.get("nvidia.com/gpu")))
        })
        .and_then(|q| q.0.parse().ok())
        .unwrap_or(0)
}

fn template_gpus(group: &TrainerGroup) -> u32 {
    group
        .spec
        .template
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref().and_then(|l| l.get("nvidia.com/gpu")))
        .and_then(|q| q.0.parse().ok())
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
async fn write_group(
    ctx: &Context,
    run: &TrainingRun,
    member: &MemberCluster,
    peers: &[PeerId],
    endpoint: &str,
    image: &str,
    env: &[k8s_openapi::api::core::v1::EnvVar],
    token: &impl Fn(&str) -> Option<String>,
) -> Result<(), Error> {
    let name = group_name(run);
    let ns = member_namespace(&member.name_any());
    let mut labels = resources::run_labels(run);
    labels.insert(resources::LABEL_MEMBER.into(), member.name_any());
    let secret_name = format!("{name}-credentials");
    // Only this member's peers' tokens travel to it.
    let tokens: BTreeMap<String, String> = peers
        .iter()
        .filter_map(|p| Some((p.to_string(), token(&p.to_string())?)))
        .collect();
    apply_object(
        ctx,
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": secret_name, "namespace": ns, "labels": labels},
            "type": "Opaque",
            "stringData": tokens,
        }),
    )
    .await?;
    let home = member.spec.tier == crate::api::Tier::Home;
    apply_object(
        ctx,
        json!({
            "apiVersion": "starling.dev/v1alpha1", "kind": "TrainerGroup",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "runRef": {"namespace": run.namespace(), "name": run.name_any(), "uid": run.uid()},
                "member": member.name_any(),
                "peers": peers,
                "template": {
                    "image": image,
                    "args": ["train"],
                    "env": env,
                    "resources": run.spec.peers.resources,
                    // Home links are rate-limited to what they declared.
                    "uploadLimitMbps": home.then_some(member.spec.bandwidth.upload_mbps),
                },
                "exchangeEndpoint": endpoint,
                "credentialsSecret": secret_name,
            },
        }),
    )
    .await
}

async fn delete_group(ctx: &Context, group: &TrainerGroup) -> Result<(), Error> {
    let ns = group.namespace().unwrap_or_default();
    let groups: Api<TrainerGroup> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    ignore_not_found(
        groups
            .delete(&group.name_any(), &DeleteParams::default())
            .await,
    )?;
    ignore_not_found(
        secrets
            .delete(&group.spec.credentials_secret, &DeleteParams::default())
            .await,
    )?;
    Ok(())
}

fn ignore_not_found<T>(r: kube::Result<T>) -> kube::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The run is being deleted: its TrainerGroups and their credentials live in member
/// namespaces, beyond owner references, so they go here; the exchange, its Service and
/// the run's Secret are owned by the run and collected after it.
async fn cleanup(run: &TrainingRun, ctx: &Context) -> Result<Action, Error> {
    let uid = run.uid().unwrap_or_default();
    let selector = ListParams::default().labels(&format!("{LABEL_RUN_UID}={uid}"));
    let groups = Api::<TrainerGroup>::all(ctx.client.clone())
        .list(&selector)
        .await?;
    for g in &groups.items {
        delete_group(ctx, g).await?;
    }
    ctx.exchanges.lock().await.remove(&uid);
    event(
        ctx,
        run,
        EventType::Normal,
        "Deleted",
        &format!("removed {} trainer group(s)", groups.items.len()),
    )
    .await;
    Ok(Action::await_change())
}

/// The exchange's view of the run, or `None` while it does not answer.
async fn poll_exchange(
    ctx: &Context,
    uid: &str,
    endpoint: &str,
    token: &str,
) -> Option<proto::RunState> {
    let client = {
        let mut exchanges = ctx.exchanges.lock().await;
        let stale = exchanges.get(uid).is_none_or(|c| c.url != endpoint);
        if stale {
            let client = ExchangeClient::new(ClientOptions {
                url: endpoint.into(),
                token: token.into(),
                bandwidth_mbps: None,
                retry_for: Duration::from_secs(1),
                tls_ca: None,
                // Only peers' joins and updates are checked against the run's fingerprint.
                fingerprint: String::new(),
            })
            .ok()?;
            exchanges.insert(
                uid.into(),
                ExchangeConnection {
                    url: endpoint.into(),
                    client,
                },
            );
        }
        exchanges[uid].client.clone()
    };
    match tokio::time::timeout(Duration::from_secs(3), client.run_state()).await {
        Ok(Ok(state)) => Some(state),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "exchange not answering");
            None
        }
        Err(_) => None,
    }
}

fn peer_status(
    peer: &PeerId,
    plan: &placement::Plan,
    groups: &[TrainerGroup],
    state: Option<&proto::RunState>,
) -> PeerStatus {
    let member = plan.assignment.get(peer).cloned().unwrap_or_default();
    let pod = groups
        .iter()
        .filter(|g| g.spec.member == member)
        .filter_map(|g| g.status.as_ref())
        .flat_map(|s| s.pods.iter())
        .find(|p| p.peer == *peer);
    let exchange = state.and_then(|s| s.peers.iter().find(|p| p.peer == peer.to_string()));
    let state_ = match (pod.map(|p| p.phase.as_str()), exchange) {
        _ if member.is_empty() => PeerState::Lost,
        (Some("Succeeded"), _) => PeerState::Finished,
        (_, Some(e)) if e.weight == 0.0 && e.updates_rejected > 0 => PeerState::Excluded,
        (Some("Running"), Some(e)) if e.alive => PeerState::Running,
        (Some("Running"), None) => PeerState::Running,
        (Some("Failed"), _) => PeerState::Lost,
        _ => PeerState::Pending,
    };
    PeerStatus {
        id: *peer,
        member,
        state: state_,
        rating: None,
        last_score: exchange.map(|e| f64::from(e.last_train_loss)),
        weight: exchange.map(|e| f64::from(e.weight)),
    }
}

/// Checkpoint records: every `everyRounds` rounds and the last, as the exchange writes
/// them, keeping when each was first seen.
fn checkpoints(
    run: &TrainingRun,
    closed: u32,
    previous: &[CheckpointRecord],
) -> Vec<CheckpointRecord> {
    let every = run.spec.checkpoint.every_rounds.max(1);
    let last = run.spec.schedule.outer_rounds;
    let mut out: Vec<CheckpointRecord> = (1..=closed)
        .filter(|r| r % every == 0 || *r == last)
        .map(|round| {
            previous
                .iter()
                .find(|c| c.round == round)
                .cloned()
                .unwrap_or_else(|| CheckpointRecord {
                    round,
                    location: format!(
                        "{}/{}:{EXCHANGE_WORKDIR}/checkpoints/round-{round:06}",
                        run.namespace().unwrap_or_default(),
                        resources::exchange_name(run)
                    ),
                    hub_commit: None,
                    time: Time(k8s_openapi::jiff::Timestamp::now()),
                })
        })
        .collect();
    let keep = run.spec.checkpoint.keep_last.max(1) as usize;
    if out.len() > keep {
        out.drain(..out.len() - keep);
    }
    out
}

async fn write_status(
    ctx: &Context,
    run: &TrainingRun,
    previous: &TrainingRunStatus,
    status: TrainingRunStatus,
) -> Result<(), Error> {
    if *previous == status {
        return Ok(());
    }
    let api: Api<TrainingRun> =
        Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "starling.dev/v1alpha1", "kind": "TrainingRun",
        "status": status,
    });
    api.patch_status(
        &run.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

async fn event(ctx: &Context, run: &TrainingRun, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(note, 1000)),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &run.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing an event");
    }
}
