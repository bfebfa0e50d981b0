//! The objects the hub writes, built as typed values (k8s-openapi for built-in kinds,
//! Starling's own types for custom ones), so the controllers only decide *which* to write
//! and the one apply helper writes them.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, Namespace, PodSpec, PodTemplateSpec,
    ResourceRequirements, Secret, Service, ServiceAccount, ServicePort, ServiceSpec, Volume,
    VolumeMount,
};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use starling_trainer::env as names;
use starling_trainer::exchange::tls::EXCHANGE_SERVER_NAME;

use crate::api::{
    MemberCluster, PeerId, RunReference, ServiceType, Tier, TrainerGroup, TrainerGroupSpec,
    TrainerPodTemplate, TrainingRun,
};

use super::run_tls::{CA_KEY, CERT_KEY, KEY_KEY};
use crate::contract::PEER_METRICS_PORT;
use crate::k8s::{
    COMPONENT_EXCHANGE, LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_MEMBER, LABEL_RUN,
    LABEL_RUN_NAMESPACE, LABEL_RUN_UID, MANAGER, env, member_namespace, pod_ip_env, secret_env,
};

mod jobs;

pub use jobs::{
    EVALUATOR_RESTARTS, EvaluatorSettings, PUBLISH_ATTEMPTS, evaluator_job, evaluator_job_name,
    publisher_job, publisher_job_name,
};

/// Port the exchange serves gRPC (and checkpoints, to the publisher) on; its plain-HTTP
/// `/metrics` is on [`PEER_METRICS_PORT`], as every Starling pod's is.
pub const EXCHANGE_PORT: u16 = 7070;

/// Where the run's pods and the operator reach its exchange, and whether over TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeEndpoint {
    pub url: String,
    pub tls: bool,
}

impl ExchangeEndpoint {
    /// The exchange at `address` (`host:port`, see [`advertised_address`]), over TLS
    /// when the run's credentials hold its certificate.
    pub fn new(address: &str, tls: bool) -> Self {
        let scheme = if tls { "https" } else { "http" };
        Self {
            url: format!("{scheme}://{address}"),
            tls,
        }
    }

    /// What a pod needs to verify the exchange besides its URL: the run's CA, from key
    /// [`CA_KEY`] of Secret `secret`, and the name the exchange's certificate carries.
    /// Nothing for a plain-text exchange.
    pub fn verify_env(&self, secret: &str) -> Vec<EnvVar> {
        if !self.tls {
            return vec![];
        }
        vec![
            secret_env(names::TLS_CA, secret, CA_KEY),
            env(names::TLS_SERVER_NAME, EXCHANGE_SERVER_NAME),
        ]
    }
}
/// Where the exchange keeps its state, data and checkpoints inside its pod.
pub const EXCHANGE_WORKDIR: &str = "/var/lib/starling";
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

/// What the run's own pods on the hub (the exchange, evaluators) ask for: half a core
/// and 512 MiB, enough for the models a CPU hub serves (the tiny model's exchange peaks
/// at about 230 MB in `bench convergence`, DDP's 240 rounds included).
fn hub_pod_requests() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), Quantity("500m".into())),
            ("memory".into(), Quantity("512Mi".into())),
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

/// What the exchange pod needs besides the run's shared configuration.
pub struct ExchangeSettings<'a> {
    pub image: &'a str,
    /// The run configuration every pod of the run shares.
    pub run_env: &'a [EnvVar],
    /// The exchange's own environment (where it keeps state, its run's name).
    pub exchange_env: Vec<EnvVar>,
    /// Serve TLS with the certificate in the run's credentials.
    pub tls: bool,
}

fn exchange_selector(run: &TrainingRun) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_RUN_UID.to_string(), run.uid().unwrap_or_default()),
        (LABEL_COMPONENT.to_string(), COMPONENT_EXCHANGE.to_string()),
    ])
}

fn exchange_container(run: &TrainingRun, settings: &ExchangeSettings) -> Container {
    let tokens = secret_env(names::TOKENS, &credentials_name(run), TOKENS_KEY);
    let mut vars = settings.run_env.to_vec();
    vars.extend([
        pod_ip_env(),
        env(names::LISTEN, format!("$(POD_IP):{EXCHANGE_PORT}")),
        env(
            names::METRICS_LISTEN,
            format!("$(POD_IP):{PEER_METRICS_PORT}"),
        ),
        tokens,
    ]);
    if settings.tls {
        let credentials = credentials_name(run);
        vars.push(secret_env(names::TLS_CERT, &credentials, CERT_KEY));
        vars.push(secret_env(names::TLS_KEY, &credentials, KEY_KEY));
    }
    vars.extend(settings.exchange_env.iter().cloned());
    Container {
        name: "exchange".into(),
        image: Some(settings.image.into()),
        args: Some(vec!["exchange".into()]),
        env: Some(vars),
        working_dir: Some(EXCHANGE_WORKDIR.into()),
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: EXCHANGE_PORT.into(),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: PEER_METRICS_PORT.into(),
                ..ContainerPort::default()
            },
        ]),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: EXCHANGE_WORKDIR.into(),
            ..VolumeMount::default()
        }]),
        resources: Some(hub_pod_requests()),
        ..Container::default()
    }
}

/// The exchange: one pod (a Deployment, so a lost node brings it back) and a
/// LoadBalancer Service, since members dial it from other clusters and homes.
pub fn exchange(run: &TrainingRun, settings: &ExchangeSettings) -> (Deployment, Service) {
    let mut labels = run_labels(run);
    labels.insert(LABEL_COMPONENT.into(), COMPONENT_EXCHANGE.into());
    let mut metadata = meta(exchange_name(run), run.namespace(), labels.clone());
    metadata.owner_references = owned_by(run);
    let deployment = Deployment {
        metadata: metadata.clone(),
        spec: DeploymentSpec {
            replicas: Some(1),
            // Two exchanges of one run must never serve at once.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                rolling_update: None,
            }),
            selector: LabelSelector {
                match_labels: Some(exchange_selector(run)),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![exchange_container(run, settings)],
                    // The exchange serves peers and the operator; it never calls the
                    // Kubernetes API, so it holds no token for it.
                    automount_service_account_token: Some(false),
                    volumes: Some(vec![Volume {
                        name: "data".into(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    };
    let service = Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(run.spec.exchange.service.type_.as_str().into()),
            selector: Some(exchange_selector(run)),
            ports: Some(vec![ServicePort {
                name: Some("grpc".into()),
                port: EXCHANGE_PORT.into(),
                target_port: Some(IntOrString::Int(EXCHANGE_PORT.into())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    (deployment, service)
}

/// Where peers dial the run's exchange, `host:port`, once its Service says: the
/// `advertisedEndpoint` if the spec gives one (with the node port of a `NodePort`
/// Service, or the exchange's port, when it names no port), else the load balancer's
/// ingress address. `None` while there is none yet.
pub fn advertised_address(run: &TrainingRun, service: &Service) -> Option<String> {
    let spec = &run.spec.exchange.service;
    let Some(advertised) = &spec.advertised_endpoint else {
        let ingress = service
            .status
            .as_ref()?
            .load_balancer
            .as_ref()?
            .ingress
            .as_ref()?;
        let first = ingress.first()?;
        let host = first.hostname.clone().or_else(|| first.ip.clone())?;
        return Some(format!("{host}:{EXCHANGE_PORT}"));
    };
    if advertised.contains(':') {
        return Some(advertised.clone());
    }
    let port = match spec.type_ {
        ServiceType::NodePort => {
            let ports = service.spec.as_ref()?.ports.as_ref()?;
            ports.first()?.node_port?
        }
        _ => EXCHANGE_PORT.into(),
    };
    Some(format!("{advertised}:{port}"))
}

/// The name a TLS exchange's certificate carries, for peers to verify it against (their
/// CA comes from the group's Secret, which their agent copies).
fn server_name_env(endpoint: &ExchangeEndpoint) -> Vec<EnvVar> {
    let tls = endpoint
        .tls
        .then(|| env(names::TLS_SERVER_NAME, EXCHANGE_SERVER_NAME));
    tls.into_iter().collect()
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
            env: [settings.run_env, &server_name_env(settings.endpoint)].concat(),
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

    fn sample() -> TrainingRun {
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
    fn a_members_group_secret_holds_only_its_own_peers_tokens() {
        let tokens = BTreeMap::from([
            ("p0".to_string(), "a".to_string()),
            ("p1".to_string(), "b".to_string()),
            ("operator".to_string(), "c".to_string()),
            (CA_KEY.to_string(), "the run's CA".to_string()),
            (KEY_KEY.to_string(), "the exchange's key".to_string()),
        ]);
        let plain = ExchangeEndpoint::new("x:7070", false);
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
        let tls = ExchangeEndpoint::new("x:7070", true);
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

    #[test]
    fn peers_dial_the_advertised_endpoint_or_else_the_load_balancer() {
        let service = |node_port: Option<i32>, ingress: serde_json::Value| -> Service {
            serde_json::from_value(serde_json::json!({
                "spec": {"ports": [{"port": 7070, "nodePort": node_port}]},
                "status": {"loadBalancer": {"ingress": ingress}}}))
            .unwrap()
        };
        let cases = [
            (
                "a load balancer's IP",
                None,
                "LoadBalancer",
                None,
                json_ip(),
                Some("203.0.113.7:7070"),
            ),
            (
                "its host name",
                None,
                "LoadBalancer",
                None,
                json_host(),
                Some("lb.example:7070"),
            ),
            (
                "no address yet",
                None,
                "LoadBalancer",
                None,
                serde_json::json!([]),
                None,
            ),
            (
                "an Ingress's host and port",
                Some("ex.example.org:443"),
                "ClusterIP",
                None,
                serde_json::json!([]),
                Some("ex.example.org:443"),
            ),
            (
                "a host alone",
                Some("ex.example.org"),
                "ClusterIP",
                None,
                serde_json::json!([]),
                Some("ex.example.org:7070"),
            ),
            (
                "a node and its port",
                Some("198.51.100.4"),
                "NodePort",
                Some(31234),
                serde_json::json!([]),
                Some("198.51.100.4:31234"),
            ),
            (
                "no node port yet",
                Some("198.51.100.4"),
                "NodePort",
                None,
                serde_json::json!([]),
                None,
            ),
            (
                "advertised over the balancer",
                Some("ex.example.org:443"),
                "LoadBalancer",
                None,
                json_ip(),
                Some("ex.example.org:443"),
            ),
        ];
        for (case, advertised, type_, node_port, ingress, want) in cases {
            let mut run = sample();
            run.spec.exchange.service = serde_json::from_value(serde_json::json!(
                {"type": type_, "advertisedEndpoint": advertised}))
            .unwrap();
            let got = advertised_address(&run, &service(node_port, ingress));
            assert_eq!(got.as_deref(), want, "{case}");
            let (_, svc) = exchange(&run, &exchange_settings());
            assert_eq!(svc.spec.unwrap().type_.as_deref(), Some(type_), "{case}");
        }
    }

    fn json_ip() -> serde_json::Value {
        serde_json::json!([{"ip": "203.0.113.7"}])
    }

    fn json_host() -> serde_json::Value {
        serde_json::json!([{"hostname": "lb.example"}])
    }

    fn exchange_settings() -> ExchangeSettings<'static> {
        ExchangeSettings {
            image: "img",
            run_env: &[],
            exchange_env: vec![],
            tls: true,
        }
    }

    #[test]
    fn the_exchange_is_owned_by_its_run_and_selected_by_uid() {
        let settings = ExchangeSettings {
            image: "img",
            run_env: &[env("STARLING_SEED", 1)],
            exchange_env: vec![env(names::RUN, "r")],
            tls: true,
        };
        let (deployment, service) = exchange(&sample(), &settings);
        let owner = &deployment.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.uid, "uid-1");
        let selector = service.spec.unwrap().selector.unwrap();
        assert_eq!(selector[LABEL_RUN_UID], "uid-1");
        let pod = deployment.spec.template.spec.unwrap();
        let names: Vec<_> = pod.containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| e.name.as_str())
            .collect();
        assert!(names.contains(&"STARLING_SEED") && names.contains(&"STARLING_TOKENS"));
        // It serves the certificate in the run's credentials, and metrics apart.
        let vars = pod.containers[0].env.clone().unwrap();
        for (name, key) in [(names::TLS_CERT, CERT_KEY), (names::TLS_KEY, KEY_KEY)] {
            let var = vars.iter().find(|e| e.name == name).unwrap();
            let from = var
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap();
            assert_eq!(
                (from.name.as_str(), from.key.as_str()),
                ("shakespeare-credentials", key)
            );
        }
        let ports = pod.containers[0].ports.clone().unwrap();
        let metrics = ports
            .iter()
            .find(|p| p.name.as_deref() == Some("metrics"))
            .unwrap();
        assert_eq!(metrics.container_port, i32::from(PEER_METRICS_PORT));
    }
}
