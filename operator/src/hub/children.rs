//! The objects the hub writes, built as typed values (k8s-openapi for built-in kinds,
//! Starling's own types for custom ones), so the controllers only decide *which* to write
//! and the one apply helper writes them.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{EnvVar, Namespace, ResourceRequirements, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use starling_trainer::run::memory;

use crate::api::validation::resolved_model;

use crate::api::{
    MemberCluster, PeerId, RunReference, Tier, TrainerGroup, TrainerGroupSpec, TrainerPodTemplate,
    TrainingRun,
};

use super::run_tls::CA_KEY;
use crate::k8s::{
    LABEL_MANAGED_BY, LABEL_MEMBER, LABEL_RUN, LABEL_RUN_NAMESPACE, LABEL_RUN_UID, MANAGER,
    member_namespace,
};

mod exchange;
mod jobs;

pub use exchange::{
    EXCHANGE_PORT, EXCHANGE_WORKDIR, ExchangeEndpoint, ExchangeSettings, advertised_address,
    exchange,
};

pub use jobs::{
    EVALUATOR_RESTARTS, EvaluatorSettings, PUBLISH_ATTEMPTS, evaluator_job, evaluator_job_name,
    publisher_job, publisher_job_name,
};

/// Key of the exchange's tokens file in the run's credentials Secret.
pub const TOKENS_KEY: &str = "tokens";
/// Key of the operator's own token (it reads the exchange's `RunState`).
pub const OPERATOR_TOKEN_KEY: &str = "operator";
/// Key of the publisher's exchange token in the run's credentials Secret.
pub const PUBLISHER_TOKEN_KEY: &str = "publisher";
/// Key of the run's ledger signing key (Ed25519 PKCS#8, hex): only the operator reads it.
pub const LEDGER_KEY: &str = "ledger-key";
/// Key of the run's scoring secret (hex): only evaluators read it.
pub const SCORING_KEY: &str = "scoring-key";

/// What the exchange and the evaluators ask for: half a core, and the memory they peak
/// at with this run's model, algorithm and peers ([`memory::peak_bytes`], measured by
/// `bench convergence`) and a quarter more. Never under 512 MiB, which the tiny model's
/// roles fit several times over. A preset whose vocabulary comes from a tokenizer read
/// at run time is counted at its usual vocabulary (LLaMA's 32000); a model the spec
/// does not fix at all gets the floor.
fn hub_pod_requests(run: &TrainingRun, role: memory::Role) -> ResourceRequirements {
    const FLOOR: u64 = 512 << 20;
    let spec = &run.spec;
    let model = resolved_model(spec)
        .or_else(|| (spec.model.preset).map(|preset| preset.config(preset.default_vocab())));
    let peak = model
        .map(|model| memory::peak_bytes(role, &model, spec.compression.algorithm, spec.peers.max));
    let request = peak.map_or(FLOOR, |bytes| (bytes + bytes / 4).max(FLOOR));
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), Quantity("500m".into())),
            (
                "memory".into(),
                Quantity(format!("{}Mi", request.div_ceil(1 << 20))),
            ),
        ])),
        ..ResourceRequirements::default()
    }
}

/// Name of a run's objects in a member namespace: unique across run namespaces.
pub fn group_name(run: &TrainingRun) -> String {
    format!("{}-{}", run.namespace().unwrap_or_default(), run.name_any())
}

/// The Secret next to a TrainerGroup holding its peers' tokens.
pub fn group_secret_name(run: &TrainingRun) -> String {
    format!("{}-credentials", group_name(run))
}

pub fn exchange_name(run: &TrainingRun) -> String {
    format!("{}-exchange", run.name_any())
}

pub fn credentials_name(run: &TrainingRun) -> String {
    format!("{}-credentials", run.name_any())
}

/// Labels every object of a run carries; `starling.dev/run-uid` is what cleanup selects on.
pub fn run_labels(run: &TrainingRun) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_RUN.into(), run.name_any()),
        (
            LABEL_RUN_NAMESPACE.into(),
            run.namespace().unwrap_or_default(),
        ),
        (LABEL_RUN_UID.into(), run.uid().unwrap_or_default()),
        (LABEL_MANAGED_BY.into(), MANAGER.into()),
    ])
}

fn owned_by(run: &TrainingRun) -> Option<Vec<OwnerReference>> {
    run.controller_owner_ref(&()).map(|o| vec![o])
}

fn meta(name: String, namespace: Option<String>, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace,
        labels: Some(labels),
        ..ObjectMeta::default()
    }
}

fn secret_data(entries: &BTreeMap<String, String>) -> BTreeMap<String, ByteString> {
    entries
        .iter()
        .map(|(k, v)| (k.clone(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

/// The run's credentials Secret from its tokens (see `crate::contract::Credentials`).
pub fn credentials_secret(run: &TrainingRun, entries: &BTreeMap<String, String>) -> Secret {
    let mut metadata = meta(credentials_name(run), run.namespace(), run_labels(run));
    metadata.owner_references = owned_by(run);
    Secret {
        metadata,
        type_: Some("Opaque".into()),
        data: Some(secret_data(entries)),
        ..Secret::default()
    }
}

/// What one member runs for one run: the TrainerGroup and the Secret with exactly its
/// peers' tokens (no member sees another member's tokens).
pub struct GroupChildren {
    pub group: TrainerGroup,
    pub secret: Secret,
}

/// Everything a member's TrainerGroup carries besides its peers.
pub struct GroupSettings<'a> {
    pub image: &'a str,
    pub run_env: &'a [EnvVar],
    pub resources: Option<ResourceRequirements>,
    pub endpoint: &'a ExchangeEndpoint,
}

pub fn trainer_group(
    run: &TrainingRun,
    member: &MemberCluster,
    peers: &[PeerId],
    tokens: &BTreeMap<String, String>,
    settings: &GroupSettings,
) -> GroupChildren {
    let ns = member_namespace(&member.name_any());
    let mut labels = run_labels(run);
    labels.insert(LABEL_MEMBER.into(), member.name_any());
    // The run's CA travels with the tokens: the agent hands it to its trainers.
    let only_ours: BTreeMap<String, String> = peers
        .iter()
        .map(PeerId::to_string)
        .chain(settings.endpoint.tls.then(|| CA_KEY.to_owned()))
        .filter_map(|key| Some((key.clone(), tokens.get(&key)?.clone())))
        .collect();
    let secret = Secret {
        metadata: meta(group_secret_name(run), Some(ns.clone()), labels.clone()),
        type_: Some("Opaque".into()),
        data: Some(secret_data(&only_ours)),
        ..Secret::default()
    };
    let home = member.spec.tier == Tier::Home;
    let spec = TrainerGroupSpec {
        run_ref: RunReference {
            namespace: run.namespace().unwrap_or_default(),
            name: run.name_any(),
            uid: run.uid().unwrap_or_default(),
        },
        member: member.name_any(),
        peers: peers.to_vec(),
        template: TrainerPodTemplate {
            image: settings.image.into(),
            args: vec!["train".into()],
            // Peers' CA comes from the group's Secret, which their agent copies.
            env: (settings.run_env.iter().cloned())
                .chain(settings.endpoint.server_name_env())
                .collect(),
            resources: settings.resources.clone(),
            node_selector: BTreeMap::new(),
            tolerations: vec![],
            // Home links are rate-limited to what they declared.
            upload_limit_mbps: home.then_some(member.spec.bandwidth.upload_mbps),
        },
        exchange_endpoint: settings.endpoint.url.clone(),
        credentials_secret: group_secret_name(run),
    };
    let mut group = TrainerGroup::new(&group_name(run), spec);
    group.metadata.namespace = Some(ns);
    group.metadata.labels = Some(labels);
    GroupChildren { group, secret }
}

/// What a member's agent may do on the hub: read its TrainerGroups and their
/// credentials and write their status in its own namespace, and report its own
/// MemberCluster's status. Nothing else.
pub struct MemberAccess {
    pub namespace: Namespace,
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub cluster_role: ClusterRole,
    pub cluster_role_binding: ClusterRoleBinding,
}

fn rule(group: &str, resource: &str, names: Option<&str>, verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(vec![resource.into()]),
        resource_names: names.map(|n| vec![n.into()]),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        non_resource_urls: None,
    }
}

/// The hub objects that let `member`'s agent in, and no further (see [`MemberAccess`]).
pub fn member_access(member: &MemberCluster) -> MemberAccess {
    let name = member.name_any();
    let ns = member_namespace(&name);
    let labels = BTreeMap::from([
        (LABEL_MEMBER.to_string(), name.clone()),
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
    ]);
    // Cluster-scoped objects go with their MemberCluster (and the namespace takes what
    // is in it along).
    let owned = |n: String| ObjectMeta {
        owner_references: member.controller_owner_ref(&()).map(|o| vec![o]),
        ..meta(n, None, labels.clone())
    };
    let in_ns = |n: &str| meta(n.into(), Some(ns.clone()), labels.clone());
    let cluster_wide = format!("starling-member-{name}");
    let subjects = Some(vec![agent(&ns)]);
    MemberAccess {
        namespace: Namespace {
            metadata: owned(ns.clone()),
            ..Namespace::default()
        },
        service_account: ServiceAccount {
            metadata: in_ns("agent"),
            ..ServiceAccount::default()
        },
        role: Role {
            metadata: in_ns("agent"),
            rules: Some(agent_group_rules()),
        },
        role_binding: RoleBinding {
            metadata: in_ns("agent"),
            role_ref: role_ref("Role", "agent"),
            subjects: subjects.clone(),
        },
        cluster_role: ClusterRole {
            metadata: owned(cluster_wide.clone()),
            rules: Some(agent_member_rules(&name)),
            aggregation_rule: None,
        },
        cluster_role_binding: ClusterRoleBinding {
            metadata: owned(cluster_wide.clone()),
            role_ref: role_ref("ClusterRole", &cluster_wide),
            subjects,
        },
    }
}

/// The identity a member's agent acts as on the hub: the `agent` ServiceAccount in its
/// namespace.
fn agent(namespace: &str) -> Subject {
    Subject {
        kind: "ServiceAccount".into(),
        name: "agent".into(),
        namespace: Some(namespace.into()),
        api_group: None,
    }
}

/// A binding's reference to the Role or ClusterRole it grants.
fn role_ref(kind: &str, name: &str) -> RoleRef {
    RoleRef {
        api_group: Some("rbac.authorization.k8s.io".into()),
        kind: kind.into(),
        name: name.into(),
    }
}

/// In its own namespace the agent reads its TrainerGroups and their credentials and
/// writes the groups' status.
fn agent_group_rules() -> Vec<PolicyRule> {
    vec![
        rule("starling.dev", "trainergroups", None, &["list", "watch"]),
        rule("starling.dev", "trainergroups/status", None, &["patch"]),
        rule("", "secrets", None, &["list", "watch"]),
    ]
}

/// Cluster-wide the agent reports its own MemberCluster's status (the heartbeat), no
/// other's.
fn agent_member_rules(member: &str) -> Vec<PolicyRule> {
    vec![rule(
        "starling.dev",
        "memberclusters/status",
        Some(member),
        &["patch"],
    )]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::run_tls::KEY_KEY;
    use starling_trainer::env as names;
    use starling_trainer::exchange::tls::EXCHANGE_SERVER_NAME;

    /// The Shakespeare sample with a uid.
    pub(in crate::hub::children) fn sample() -> TrainingRun {
        let yaml = include_str!("../../../crds/samples/trainingrun-shakespeare.yaml");
        let mut run: TrainingRun = serde_yaml::from_str(yaml).unwrap();
        run.metadata.uid = Some("uid-1".into());
        run
    }

    fn home() -> MemberCluster {
        let yaml = include_str!("../../../crds/samples/membercluster-home.yaml");
        let mut m: MemberCluster = serde_yaml::from_str(yaml).unwrap();
        m.metadata.uid = Some("uid-m".into());
        m
    }

    #[test]
    fn the_exchange_and_evaluators_ask_for_the_memory_their_model_needs() {
        use crate::api::{Algorithm, ModelPreset};
        use memory::Role::{Evaluator, Exchange};
        let mib = |run: &TrainingRun, role| {
            let requests = hub_pod_requests(run, role).requests.unwrap();
            let text = requests["memory"].0.clone();
            text.strip_suffix("Mi").unwrap().parse::<u64>().unwrap()
        };
        // The tiny sample fits the floor.
        let tiny = sample();
        assert_eq!((mib(&tiny, Exchange), mib(&tiny, Evaluator)), (512, 512));
        // A 1B model: gigabytes, each above the estimate by a quarter.
        let mut big = sample();
        big.spec.model.preset = Some(ModelPreset::Llama1B);
        let model = resolved_model(&big.spec).unwrap();
        let theta_mib = (model.parameter_count() * 4) >> 20;
        let sparse = mib(&big, Exchange);
        let estimate = memory::peak_bytes(Exchange, &model, Algorithm::SparseLoCo, 3) >> 20;
        assert!(
            sparse >= estimate + estimate / 4,
            "{sparse} MiB for {estimate}"
        );
        assert!(
            sparse > 7 * theta_mib,
            "{sparse} MiB for θ of {theta_mib} MiB"
        );
        // Dense updates: every peer's in memory, so more peers ask for more.
        big.spec.compression.algorithm = Algorithm::DiLoCo;
        let dense = mib(&big, Exchange);
        big.spec.peers.max = 8;
        assert!(mib(&big, Exchange) > dense && dense > sparse);
        assert!(mib(&big, Evaluator) > 512);
        // A tokenizer read at run time: the preset is counted at LLaMA's vocabulary.
        big.spec.data.tokenizer = "hf:meta-llama/Llama-2-7b-hf".into();
        assert!(resolved_model(&big.spec).is_none());
        assert!(mib(&big, Exchange) > mib(&tiny, Exchange) * 10);
    }

    #[test]
    fn a_members_group_secret_holds_only_its_own_peers_tokens() {
        let tokens = BTreeMap::from([
            ("p0".to_string(), "a".to_string()),
            ("p1".to_string(), "b".to_string()),
            ("operator".to_string(), "c".to_string()),
            (CA_KEY.to_string(), "the run's CA".to_string()),
            (KEY_KEY.to_string(), "the exchange's key".to_string()),
        ]);
        let plain = ExchangeEndpoint::new("x:7070", false, EXCHANGE_SERVER_NAME);
        let mut settings = GroupSettings {
            image: "img",
            run_env: &[],
            resources: None,
            endpoint: &plain,
        };
        let children = trainer_group(&sample(), &home(), &[PeerId::new(1)], &tokens, &settings);
        let data = children.secret.data.clone().unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), vec!["p1"]);
        assert_eq!(children.group.spec.exchange_endpoint, "http://x:7070");
        // Over TLS the run's CA goes with the tokens, and peers learn the name to verify;
        // the exchange's key never leaves the hub.
        let tls = ExchangeEndpoint::new("x:7070", true, EXCHANGE_SERVER_NAME);
        settings.endpoint = &tls;
        let secured = trainer_group(&sample(), &home(), &[PeerId::new(1)], &tokens, &settings);
        let data = secured.secret.data.unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), vec![CA_KEY, "p1"]);
        assert_eq!(secured.group.spec.exchange_endpoint, "https://x:7070");
        let name = secured
            .group
            .spec
            .template
            .env
            .iter()
            .find(|e| e.name == names::TLS_SERVER_NAME);
        assert_eq!(
            name.and_then(|e| e.value.as_deref()),
            Some(EXCHANGE_SERVER_NAME)
        );
        assert_eq!(
            children.group.spec.credentials_secret,
            children.secret.metadata.name.unwrap()
        );
        // A home member's trainers are held to the bandwidth it declared.
        assert_eq!(
            children.group.spec.template.upload_limit_mbps,
            Some(home().spec.bandwidth.upload_mbps)
        );
    }
}
