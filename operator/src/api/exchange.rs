//! How a run's exchange is reached: through a Service of the type the spec says (a load
//! balancer by default), over TLS verified with the run's own CA; and where it keeps the
//! rounds' payloads and its state (its pod, or a bucket).

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The run's exchange, as peers on other networks reach it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeSpec {
    #[serde(default)]
    pub tls: ExchangeTlsSpec,
    #[serde(default)]
    pub service: ExchangeServiceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<ExchangeStorageSpec>,
}

/// Object storage for the rounds' update payloads and the exchange's state. Without it
/// the exchange pod carries every payload itself (each peer's upload and every peer's
/// download) and keeps its state on its node, so a pod moved to another node starts the
/// run over from the peers' state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeStorageSpec {
    /// `s3://bucket/prefix`, `gs://bucket/prefix` or `az://container/prefix`. Peers PUT
    /// their updates and GET the rounds' results there on URLs the exchange signs (valid
    /// 15 minutes; peers never hold the credentials), the exchange checks each update
    /// once and records its SHA-256, deletes a round's objects once no peer can need them,
    /// and keeps its state there: rescheduled to another node, it resumes where it was.
    /// Fixed once the run is Running.
    #[schemars(regex(pattern = r"^(s3|s3a|gs|az|abfs|abfss)://[^/]+(/.*)?$"))]
    pub url: String,
    /// An S3-compatible server to use instead of AWS: MinIO, Cloudflare R2, …
    /// (`https://host[:port]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^/\s]+/?$"))]
    pub endpoint: Option<String>,
    /// A Secret in the run's namespace with the credentials, one key per setting as the
    /// cloud's own tools name it: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and
    /// `AWS_REGION`, `AWS_SESSION_TOKEN` if needed), `GOOGLE_SERVICE_ACCOUNT_KEY`, or
    /// `AZURE_STORAGE_ACCOUNT_NAME` and `AZURE_STORAGE_ACCOUNT_KEY`. Mounted into the
    /// exchange pod alone; an edit is picked up while the exchange waits for its storage
    /// (the `ExchangeStorage` condition says why it waits). Without it: the exchange
    /// pod's own cloud identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// TLS on the exchange's port.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.secretName) || (self.enabled && has(self.serverName))").message("a certificate Secret needs enabled: true and serverName, the name on its certificate that peers verify"))]
pub struct ExchangeTlsSpec {
    /// On (the default), the operator mints a CA for the run and a certificate for its
    /// exchange, and every pod of the run (peers, evaluators, the publisher) and the
    /// operator verify the exchange with that CA alone. Off, peers' tokens and updates
    /// cross the network in plain text, and the run's `ExchangeTLS` condition says so.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Your own certificate instead of the run's: a Secret in the run's namespace with
    /// `tls.crt`, `tls.key` and `ca.crt` (what cert-manager writes for a Certificate).
    /// The operator copies it into the run's credentials when the run starts, so
    /// renewing it later does not reach a running run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The DNS name on that certificate: what peers, evaluators, the publisher and the
    /// operator verify, whatever address they dial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$"))]
    pub server_name: Option<String>,
}

fn enabled() -> bool {
    true
}

impl Default for ExchangeTlsSpec {
    fn default() -> Self {
        Self {
            enabled: enabled(),
            secret_name: None,
            server_name: None,
        }
    }
}

/// The Service in front of the exchange, and the address peers dial.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type == 'LoadBalancer' || has(self.advertisedEndpoint)").message("a NodePort or ClusterIP exchange needs advertisedEndpoint: the address peers on other networks dial"))]
pub struct ExchangeServiceSpec {
    /// `LoadBalancer` (the default: peers dial its ingress address), `NodePort` (peers
    /// dial a node's public address, given as `advertisedEndpoint`, at the allocated
    /// node port) or `ClusterIP` (behind an Ingress, Gateway or tunnel of yours, with TLS
    /// passed through to the exchange, named by `advertisedEndpoint`).
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// The address peers dial instead of the load balancer's: `host` or `host:port`.
    /// Without a port: the node port for `NodePort`, else 7070. TLS still verifies the
    /// run's certificate by its fixed name, so this host need not be on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$"))]
    pub advertised_endpoint: Option<String>,
}

/// The exchange Service's type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    #[default]
    LoadBalancer,
    NodePort,
    ClusterIP,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LoadBalancer => "LoadBalancer",
            Self::NodePort => "NodePort",
            Self::ClusterIP => "ClusterIP",
        }
    }
}
