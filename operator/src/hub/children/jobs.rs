//! The run's Jobs on the hub: the publisher of a checkpoint and the evaluators.

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use starling_trainer::env as names;
use starling_trainer::exchange::evaluator_name;

use super::{
    ExchangeEndpoint, PUBLISHER_TOKEN_KEY, SCORING_KEY, credentials_name, hub_pod_requests, meta,
    owned_by, run_labels,
};
use crate::api::{PublishSpec, TrainingRun};
use crate::k8s::{
    COMPONENT_EVALUATOR, COMPONENT_PUBLISHER, LABEL_COMPONENT, env, locked_down, secret_env,
};

/// Tries a publisher Job makes (pods, each retrying the Hub itself) before it fails.
pub const PUBLISH_ATTEMPTS: u32 = 4;

/// The Job publishing the checkpoint of `round`: it downloads the checkpoint from the
/// `exchange` with the publisher's token and commits it to the Hub with
/// the Hub token. It is the only pod that sees the Hub token, and it has no Kubernetes
/// API access.
pub fn publisher_job(
    run: &TrainingRun,
    publish: &PublishSpec,
    image: &str,
    exchange: &ExchangeEndpoint,
    round: u32,
) -> Job {
    let url = format!("{}/checkpoints/round-{round:06}", exchange.url);
    let mut vars = crate::contract::publish_env(publish, &url);
    vars.extend(exchange.verify_env(&credentials_name(run)));
    let hub_token = &publish.token_secret_ref;
    vars.push(secret_env(
        names::HUB_TOKEN,
        &hub_token.name,
        &hub_token.key,
    ));
    vars.push(secret_env(
        names::TOKEN,
        &credentials_name(run),
        PUBLISHER_TOKEN_KEY,
    ));
    let container = Container {
        name: "publisher".into(),
        image: Some(image.into()),
        args: Some(vec!["publish".into()]),
        env: Some(vars),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    };
    let name = publisher_job_name(run, round);
    run_job(
        run,
        name,
        COMPONENT_PUBLISHER,
        container,
        PUBLISH_ATTEMPTS as i32 - 1,
    )
}

/// A Job of the run's, in its namespace and owned by it: one container, never
/// restarted in place (the Job makes a new pod, up to `backoff_limit` times), without
/// Kubernetes API access.
fn run_job(
    run: &TrainingRun,
    name: String,
    component: &str,
    container: Container,
    backoff_limit: i32,
) -> Job {
    let mut labels = run_labels(run);
    labels.insert(LABEL_COMPONENT.into(), component.into());
    let mut metadata = meta(name, run.namespace(), labels.clone());
    metadata.owner_references = owned_by(run);
    Job {
        metadata,
        spec: Some(JobSpec {
            backoff_limit: Some(backoff_limit),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some({
                    let mut pod = PodSpec {
                        containers: vec![container],
                        restart_policy: Some("Never".into()),
                        automount_service_account_token: Some(false),
                        ..PodSpec::default()
                    };
                    locked_down(&mut pod);
                    pod
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// What an evaluator pod needs besides the run's shared configuration.
pub struct EvaluatorSettings<'a> {
    pub image: &'a str,
    pub run_env: &'a [EnvVar],
    /// Where the run's exchange is.
    pub endpoint: &'a ExchangeEndpoint,
}

/// Evaluator `index` of the run: a Job on the hub (beside the exchange, on the cloud)
/// that follows the run to its end, scoring every round. It reads its own token and
/// the run's scoring secret; never the ledger's signing key.
pub fn evaluator_job(run: &TrainingRun, settings: &EvaluatorSettings, index: u32) -> Job {
    let name = evaluator_name(index);
    let scoring = &run.spec.scoring;
    let mut vars = settings.run_env.to_vec();
    vars.extend([
        env(names::EXCHANGE, &settings.endpoint.url),
        secret_env(names::TOKEN, &credentials_name(run), &name),
        secret_env(names::SCORING_KEY, &credentials_name(run), SCORING_KEY),
        env(names::RUN_UID, run.uid().unwrap_or_default()),
        env(names::EVAL_BATCHES, scoring.eval_batches),
        env(names::MAX_EVALUATED, scoring.max_evaluated_per_round),
        env(names::DATA_DIR, "data"),
    ]);
    vars.extend(settings.endpoint.verify_env(&credentials_name(run)));
    let container = Container {
        name: "evaluator".into(),
        image: Some(settings.image.into()),
        args: Some(vec!["evaluate".into()]),
        env: Some(vars),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        resources: Some(hub_pod_requests(
            run,
            starling_trainer::run::memory::Role::Evaluator,
        )),
        ..Container::default()
    };
    let job = evaluator_job_name(run, index);
    run_job(run, job, COMPONENT_EVALUATOR, container, EVALUATOR_RESTARTS)
}

/// Pods an evaluator Job replaces before it gives up: its rounds then go unscored, the
/// run goes on.
pub const EVALUATOR_RESTARTS: i32 = 10;

pub fn evaluator_job_name(run: &TrainingRun, index: u32) -> String {
    format!("{}-evaluator-{index}", run.name_any())
}

pub fn publisher_job_name(run: &TrainingRun, round: u32) -> String {
    format!("{}-publish-{round}", run.name_any())
}
