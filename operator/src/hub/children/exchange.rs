//! The run's exchange on the hub: its Deployment and Service, and where the run's pods
//! and the operator reach it.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, PodSpec, PodTemplateSpec, SecretVolumeSource, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use starling_trainer::env as names;
use starling_trainer::exchange::tls::ClientTls;

use super::{
    TOKENS_KEY, credentials_name, exchange_name, hub_pod_requests, meta, owned_by, run_labels,
};
use crate::api::{ServiceType, TrainingRun};
use crate::contract::{PEER_METRICS_PORT, STORAGE_CREDENTIALS_DIR};
use crate::hub::run_tls::{CA_KEY, CERT_KEY, KEY_KEY};
use crate::k8s::{
    COMPONENT_EXCHANGE, LABEL_COMPONENT, LABEL_RUN_UID, env, locked_down, pod_ip_env, secret_env,
};

/// Port the exchange serves gRPC (and checkpoints, to the publisher) on; its plain-HTTP
/// `/metrics` is on [`PEER_METRICS_PORT`], as every Starling pod's is.
pub const EXCHANGE_PORT: u16 = 7070;

/// Where the run's pods and the operator reach its exchange, and whether over TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeEndpoint {
    pub url: String,
    pub tls: bool,
    /// The name on the exchange's certificate (see [`crate::hub::run_tls::server_name`]).
    pub server_name: String,
}

impl ExchangeEndpoint {
    /// The exchange at `address` (`host:port`, see [`advertised_address`]), over TLS
    /// when the run's credentials hold its certificate, verified as `server_name`.
    pub fn new(address: &str, tls: bool, server_name: &str) -> Self {
        let scheme = if tls { "https" } else { "http" };
        Self {
            url: format!("{scheme}://{address}"),
            tls,
            server_name: server_name.to_owned(),
        }
    }

    /// What a pod needs to verify the exchange besides its URL: the run's CA, from key
    /// [`CA_KEY`] of Secret `secret`, and the name the exchange's certificate carries.
    /// Nothing for a plain-text exchange.
    pub fn verify_env(&self, secret: &str) -> Vec<EnvVar> {
        let ca = self.tls.then(|| secret_env(names::TLS_CA, secret, CA_KEY));
        ca.into_iter().chain(self.server_name_env()).collect()
    }

    /// The name the exchange's certificate carries, for a pod to verify it against;
    /// nothing for a plain-text exchange.
    pub fn server_name_env(&self) -> Option<EnvVar> {
        (self.tls).then(|| env(names::TLS_SERVER_NAME, &self.server_name))
    }

    /// How the operator itself verifies the exchange: the run's CA (`ca`, from its
    /// credentials) and the name the certificate carries, as every pod does.
    pub fn client_tls(&self, ca: Option<&String>) -> Option<ClientTls> {
        Some(ClientTls {
            ca: ca.filter(|_| self.tls)?.clone().into_bytes(),
            server_name: Some(self.server_name.clone()),
        })
    }
}

/// Where the exchange keeps its state, data and checkpoints inside its pod (its
/// working directory, an `emptyDir`).
pub const EXCHANGE_WORKDIR: &str = crate::k8s::WORKDIR;

fn exchange_pod(run: &TrainingRun, settings: &ExchangeSettings) -> PodSpec {
    let mut container = exchange_container(run, settings);
    let storage = run.spec.exchange.storage.as_ref();
    // The storage credentials as files, which the kubelet updates when the Secret is
    // edited; the exchange reads them again each time it retries its bucket.
    let volumes = storage
        .and_then(|s| s.credentials_secret.as_ref())
        .map(|secret| {
            container.volume_mounts = Some(vec![VolumeMount {
                name: STORAGE_CREDENTIALS_VOLUME.into(),
                mount_path: STORAGE_CREDENTIALS_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            }]);
            vec![Volume {
                name: STORAGE_CREDENTIALS_VOLUME.into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.clone()),
                    // A missing Secret starts the pod all the same, so that the exchange
                    // can say so (`ExchangeStorage`) instead of the pod waiting unseen.
                    optional: Some(true),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            }]
        });
    let mut pod = PodSpec {
        containers: vec![container],
        volumes,
        // The exchange serves peers and the operator; it never calls the Kubernetes
        // API, so it holds no token for it.
        automount_service_account_token: Some(false),
        ..PodSpec::default()
    };
    locked_down(&mut pod);
    pod
}

/// The exchange pod's volume of storage credentials.
const STORAGE_CREDENTIALS_VOLUME: &str = "storage-credentials";

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
        resources: Some(hub_pod_requests(
            run,
            starling_trainer::run::memory::Role::Exchange,
        )),
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
                spec: Some(exchange_pod(run, settings)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::children::tests::sample;

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
        assert_eq!(
            crate::k8s::restricted_violations(&pod),
            Vec::<String>::new()
        );
        assert_eq!(
            pod.containers[0].working_dir.as_deref(),
            Some(EXCHANGE_WORKDIR)
        );
        let ports = pod.containers[0].ports.clone().unwrap();
        let metrics = ports
            .iter()
            .find(|p| p.name.as_deref() == Some("metrics"))
            .unwrap();
        assert_eq!(metrics.container_port, i32::from(PEER_METRICS_PORT));
    }
}
