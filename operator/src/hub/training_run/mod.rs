//! TrainingRun controller: observe (stores and the exchange's state) → [`decide`] (pure)
//! → act (write only what differs). A finalizer deletes the run's TrainerGroups, which
//! live in member namespaces beyond the reach of owner references.

pub mod decide;
mod placing;
mod progress;
mod publishing;
mod scoring;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use starling_trainer::exchange::Settings;
use starling_trainer::exchange::client::ClientError;

use super::children::{
    ExchangeEndpoint, OPERATOR_TOKEN_KEY, advertised_address, credentials_name, credentials_secret,
    exchange_name,
};
use super::run_tls::RunTls;
use super::{Context, Error, publish};
use crate::api::{MemberCluster, TrainerGroup, TrainingRun, TrainingRunStatus};
use crate::contract;
use crate::k8s::{
    LABEL_RUN, LABEL_RUN_NAMESPACE, LABEL_RUN_UID, MANAGER, condition, condition_true,
    ignore_not_found, reason,
};
use decide::{Decision, ExchangeObserved, GroupRef, Observed, PodHealth};

const FINALIZER: &str = "starling.dev/cleanup";
/// Runs reconciled at once.
const RECONCILES: u16 = 16;

/// The controller, woken by its runs and by `wakes`: the stores' reflectors (a run's
/// TrainerGroups, exchange pod and Service, a member it uses turning Ready or not; see
/// [`concerned_by_labels`], [`concerned_by_group`], [`runs_on_flipped_member`]) and the
/// exchange watches. The stores are updated before their wake-ups are sent, so a
/// reconcile always sees what woke it.
pub fn controller(
    client: &Client,
    wakes: impl futures::Stream<Item = ObjectRef<TrainingRun>> + Send + 'static,
) -> Controller<TrainingRun> {
    Controller::new(
        Api::<TrainingRun>::all(client.clone()),
        watcher::Config::default(),
    )
    // Bounded, so a thousand runs waking at once queue here instead of opening a
    // thousand connections to the API server.
    .with_config(kube::runtime::controller::Config::default().concurrency(RECONCILES))
    .reconcile_on(wakes)
}

/// The run an object labelled as one of a run's children belongs to (its exchange pod
/// and Service).
pub fn concerned_by_labels<K: kube::Resource>(object: &K) -> Vec<ObjectRef<TrainingRun>> {
    let labels = object.labels();
    match (labels.get(LABEL_RUN), labels.get(LABEL_RUN_NAMESPACE)) {
        (Some(name), Some(ns)) => vec![ObjectRef::new(name).within(ns)],
        _ => vec![],
    }
}

/// The run a TrainerGroup places peers for.
pub fn concerned_by_group(group: &TrainerGroup) -> Vec<ObjectRef<TrainingRun>> {
    let run = &group.spec.run_ref;
    vec![ObjectRef::new(&run.name).within(&run.namespace)]
}

/// Maps a MemberCluster event to the runs with peers on it, only when its readiness
/// changed: heartbeats rewrite a member's status every few seconds and must not wake
/// every run on it each time.
pub fn runs_on_flipped_member(
    groups: Store<TrainerGroup>,
) -> impl Fn(&MemberCluster) -> Vec<ObjectRef<TrainingRun>> + Send + Sync + 'static {
    let readiness: std::sync::Mutex<HashMap<String, bool>> = Default::default();
    move |member: &MemberCluster| {
        let ready = member
            .status
            .as_ref()
            .is_some_and(|s| condition_true(&s.conditions, condition::READY));
        let name = member.name_any();
        let mut known = readiness.lock().unwrap_or_else(|e| e.into_inner());
        if known.insert(name.clone(), ready) == Some(ready) {
            return vec![];
        }
        groups
            .state()
            .iter()
            .filter(|g| g.spec.member == name)
            .flat_map(|g| concerned_by_group(g))
            .collect()
    }
}

#[tracing::instrument(skip_all, fields(run = %run.name_any(), namespace = run.namespace().unwrap_or_default(), decision = tracing::field::Empty))]
pub async fn reconcile(run: Arc<TrainingRun>, ctx: Arc<Context>) -> Result<Action, Error> {
    let mut timer = ctx.metrics.reconcile("trainingrun");
    let ns = run.namespace().unwrap_or_default();
    let api: Api<TrainingRun> = Api::namespaced(ctx.client.clone(), &ns);
    let action = finalizer(&api, FINALIZER, run.clone(), |event| async {
        match event {
            Finalizer::Apply(run) => apply(&run, &ctx).await,
            Finalizer::Cleanup(run) => cleanup(&run, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    match action {
        Ok(action) => {
            ctx.backoff.succeeded(run.as_ref());
            Ok(action)
        }
        Err(e) => {
            timer.failed();
            Err(e)
        }
    }
}

pub fn error_policy(run: Arc<TrainingRun>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(run = %run.name_any(), %error, "reconcile failed");
    let note = error.to_string();
    let delay = ctx.backoff.failed(run.as_ref());
    tokio::spawn(async move {
        publish(
            &ctx,
            run.as_ref(),
            true,
            reason::RECONCILE_ERROR,
            &note,
            "Reconcile",
        )
        .await;
    });
    Action::requeue(delay)
}

/// The status each run was last given by this replica, by uid.
///
/// A reconcile gets the run from the controller's store, which may not hold the status
/// the previous reconcile wrote yet. Deciding on that older status would write the same
/// status again and announce the same phase twice; only this operator writes a run's
/// status, so the one it wrote last is the run's status.
#[derive(Default)]
pub struct WrittenStatuses(std::sync::Mutex<HashMap<String, TrainingRunStatus>>);

impl WrittenStatuses {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TrainingRunStatus>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `run` with the status last written to it.
    fn fresh<'a>(&self, run: &'a TrainingRun) -> std::borrow::Cow<'a, TrainingRun> {
        let written = self.lock().get(&run.uid().unwrap_or_default()).cloned();
        match written {
            Some(status) if run.status.as_ref() != Some(&status) => {
                let mut run = run.clone();
                run.status = Some(status);
                std::borrow::Cow::Owned(run)
            }
            _ => std::borrow::Cow::Borrowed(run),
        }
    }

    fn record(&self, run: &TrainingRun, status: TrainingRunStatus) {
        self.lock().insert(run.uid().unwrap_or_default(), status);
    }

    fn forget(&self, uid: &str) {
        self.lock().remove(uid);
    }
}

async fn apply(run: &TrainingRun, ctx: &Context) -> Result<Action, Error> {
    let run = &*ctx.statuses.fresh(run);
    let members = ctx.stores.members.state();
    let groups = ctx.stores.groups.state();
    let credentials = credentials(ctx, run);
    let exchange = observe_exchange(ctx, run, credentials.as_ref());
    let mut observed = Observed {
        run,
        now: Timestamp::now(),
        default_image: &ctx.config.trainer_image,
        trace_env: &ctx.trace_env,
        credentials,
        exchange,
        members: &members,
        groups: &groups,
    };
    let mut decision = decide::decide(&observed);
    if decision.children.mint_credentials {
        // Minted here rather than on the next look: the store sees the Secret only later.
        observed.credentials = Some(mint_credentials(ctx, run).await?);
        publish_notes(ctx, run, &decision.events).await;
        decision = decide::decide(&observed);
    }
    tracing::Span::current().record("decision", decision.summary());
    act(ctx, run, decision).await
}

/// Creates the run's credentials Secret. One of its name that the cache does not show
/// yet is an error to retry rather than a Secret to read: reading it would take another
/// Secret's contents as the run's tokens, and the operator's role has no `get` on
/// Secrets for it.
async fn mint_credentials(
    ctx: &Context,
    run: &TrainingRun,
) -> Result<BTreeMap<String, String>, Error> {
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let mut tokens = contract::mint_credentials(run.spec.peers.max, run.spec.scoring.evaluators);
    let provided = match &run.spec.exchange.tls.secret_name {
        Some(name) => Some(provided_certificate(&secrets, name).await?),
        None => None,
    };
    super::run_tls::add_to(&mut tokens, run, provided)?;
    let secret = credentials_secret(run, &tokens);
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(tokens),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            Err(Error::CredentialsTaken(credentials_name(run)))
        }
        Err(e) => Err(e.into()),
    }
}

/// The user's certificate Secret `name` (`spec.exchange.tls.secretName`), read once
/// when the run's credentials are minted.
async fn provided_certificate(secrets: &Api<Secret>, name: &str) -> Result<RunTls, Error> {
    let invalid = |message: String| Error::CertificateSecret {
        name: name.to_owned(),
        message,
    };
    let secret = secrets.get_opt(name).await?;
    let secret = secret.ok_or_else(|| invalid("there is no such Secret".into()))?;
    super::run_tls::from_secret(&secret).map_err(invalid)
}

fn tokens_of(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect()
}

/// The run's tokens from its credentials Secret, once minted.
fn credentials(ctx: &Context, run: &TrainingRun) -> Option<BTreeMap<String, String>> {
    let ns = run.namespace().unwrap_or_default();
    let secret = ctx
        .stores
        .secrets
        .get(&ObjectRef::new(&credentials_name(run)).within(&ns))?;
    Some(tokens_of(&secret))
}

/// The exchange's address, pod health and, if it answers (to the operator's token from
/// the run's `credentials`, verified with the run's CA), its state.
fn observe_exchange(
    ctx: &Context,
    run: &TrainingRun,
    credentials: Option<&BTreeMap<String, String>>,
) -> ExchangeObserved {
    let ns = run.namespace().unwrap_or_default();
    let uid = run.uid().unwrap_or_default();
    let address = ctx
        .stores
        .services
        .get(&ObjectRef::new(&exchange_name(run)).within(&ns))
        .and_then(|s| advertised_address(run, &s));
    let pod = ctx
        .stores
        .exchange_pods
        .state()
        .into_iter()
        .filter(|p| p.labels().get(LABEL_RUN_UID) == Some(&uid))
        .max_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0))
        .map(|p| pod_health(&p));
    let finished = run
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_terminal());
    if finished {
        ctx.exchanges.forget(&uid);
    }
    let token = credentials.and_then(|c| c.get(OPERATOR_TOKEN_KEY));
    let ca = credentials.and_then(|c| c.get(super::run_tls::CA_KEY));
    let state = match (&address, token) {
        (Some(host), Some(token)) if !finished => {
            let name = super::run_tls::server_name(run);
            let endpoint = ExchangeEndpoint::new(host, ca.is_some(), name);
            let tls = endpoint.client_tls(ca);
            ctx.exchanges.state(run, &endpoint.url, token, tls)
        }
        _ => None,
    };
    ExchangeObserved {
        address,
        pod,
        state,
    }
}

fn pod_health(pod: &Pod) -> PodHealth {
    let status = pod.status.as_ref();
    let container = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first());
    let terminated = container.and_then(|c| c.last_state.as_ref()?.terminated.as_ref());
    PodHealth {
        restarts: container.map_or(0, |c| c.restart_count.max(0) as u32),
        failed: status.and_then(|s| s.phase.as_deref()) == Some("Failed"),
        message: terminated
            .map(|t| {
                let why = t.reason.clone().unwrap_or_else(|| "Error".into());
                format!("{why}, exit code {}", t.exit_code)
            })
            .or_else(|| status.and_then(|s| s.message.clone())),
    }
}

/// Writes what the decision asks for, then the status if it changed.
async fn act(ctx: &Context, run: &TrainingRun, decision: Decision) -> Result<Action, Error> {
    let ns = run.namespace().unwrap_or_default();
    let children = decision.children;
    if let Some((deployment, service)) = &children.exchange {
        let stores = &ctx.stores;
        let api = Api::namespaced(ctx.client.clone(), &ns);
        ctx.apply_changed(&api, Some(&stores.deployments), deployment)
            .await?;
        let api = Api::namespaced(ctx.client.clone(), &ns);
        ctx.apply_changed(&api, Some(&stores.services), service)
            .await?;
    }
    for child in &children.groups {
        let group_ns = child.group.namespace().unwrap_or_default();
        let secrets = Api::namespaced(ctx.client.clone(), &group_ns);
        ctx.apply_changed(&secrets, Some(&ctx.stores.secrets), &child.secret)
            .await?;
        let groups = Api::namespaced(ctx.client.clone(), &group_ns);
        ctx.apply_changed(&groups, Some(&ctx.stores.groups), &child.group)
            .await?;
    }
    for group in &children.remove {
        delete_group(ctx, group).await?;
    }
    if let Some(job) = &children.publisher {
        let api = Api::namespaced(ctx.client.clone(), &ns);
        ctx.apply_changed(&api, None, job).await?;
    }
    for job in &children.evaluators {
        let api = Api::namespaced(ctx.client.clone(), &ns);
        ctx.apply_changed(&api, None, job).await?;
    }
    if let Some(scored) = &children.score {
        record_scores(ctx, &run.uid().unwrap_or_default(), scored).await?;
    }
    if let Some(settings) = children.configure {
        configure_exchange(ctx, &run.uid().unwrap_or_default(), settings).await?;
    }
    publish_notes(ctx, run, &decision.events).await;
    write_status(ctx, run, decision.status).await?;
    Ok(match decision.requeue {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    })
}

async fn publish_notes(ctx: &Context, run: &TrainingRun, notes: &[decide::Note]) {
    for note in notes {
        publish(
            ctx,
            run,
            note.warning,
            note.reason,
            &note.message,
            "Reconcile",
        )
        .await;
    }
}

async fn delete_group(ctx: &Context, group: &GroupRef) -> Result<(), Error> {
    let groups: Api<TrainerGroup> = Api::namespaced(ctx.client.clone(), &group.namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &group.namespace);
    ignore_not_found(groups.delete(&group.name, &DeleteParams::default()).await)?;
    ignore_not_found(
        secrets
            .delete(&group.secret, &DeleteParams::default())
            .await,
    )?;
    ctx.forget(&ObjectRef::<TrainerGroup>::new(&group.name).within(&group.namespace));
    ctx.forget(&ObjectRef::<Secret>::new(&group.secret).within(&group.namespace));
    Ok(())
}

/// The run is being deleted: its TrainerGroups and their credentials live in member
/// namespaces, beyond owner references, so they go here; the exchange, its Service and
/// the run's Secret are owned by the run and collected after it.
async fn cleanup(run: &TrainingRun, ctx: &Context) -> Result<Action, Error> {
    let uid = run.uid().unwrap_or_default();
    let ours = decide::groups_of(&uid, &ctx.stores.groups.state());
    for g in &ours {
        delete_group(ctx, g).await?;
    }
    ctx.exchanges.forget(&uid);
    ctx.statuses.forget(&uid);
    let note = format!("removed {} trainer group(s)", ours.len());
    publish(ctx, run, false, reason::DELETED, &note, "Delete").await;
    Ok(Action::await_change())
}

/// Puts `settings` in force in the run's exchange, through the connection the
/// observation used (the decision asks only after the exchange answered).
async fn configure_exchange(ctx: &Context, uid: &str, settings: Settings) -> Result<(), Error> {
    let Some(client) = ctx.exchanges.client(uid) else {
        return Ok(()); // Forgotten meanwhile (the run is going away).
    };
    let answer = tokio::time::timeout(Duration::from_secs(3), client.configure(settings));
    match answer.await {
        // Looked at again soon: the decision asks until the exchange reports them. An
        // exchange that is up but cannot take them yet (it waits for its storage) says
        // why in its state, not as a failed reconcile.
        Err(_) | Ok(Err(ClientError::Unreachable { .. })) => Ok(()),
        Ok(result) => result.map(drop).map_err(Error::from),
    }
}

/// Hands the exchange a scored round's ledger record and the weights it gives.
async fn record_scores(ctx: &Context, uid: &str, scored: &scoring::Scored) -> Result<(), Error> {
    let Some(client) = ctx.exchanges.client(uid) else {
        return Ok(()); // Forgotten meanwhile (the run is going away).
    };
    let weights = scored.weights.iter().map(|(p, w)| (*p, *w));
    let record = Some((scored.line.as_str(), scored.public_key.as_str()));
    let call = client.set_scored_weights(weights, record);
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(result) => Ok(result?),
        // Made again on the next look, from the exchange's ledger as it then stands.
        Err(_) => Ok(()),
    }
}

/// Server-side applies the status when it differs from what the run carries.
async fn write_status(
    ctx: &Context,
    run: &TrainingRun,
    status: TrainingRunStatus,
) -> Result<(), Error> {
    if run.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<TrainingRun> =
        Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "starling.dev/v1alpha1", "kind": "TrainingRun",
        "status": &status,
    });
    api.patch_status(
        &run.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    ctx.statuses.record(run, status);
    Ok(())
}
