//! How a run's exchange is reached: through a Service of the type the spec says (a load
//! balancer by default), over TLS verified with the run's own CA.

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
}

/// TLS on the exchange's port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeTlsSpec {
    /// On (the default), the operator mints a CA for the run and a certificate for its
    /// exchange, and every pod of the run (peers, evaluators, the publisher) and the
    /// operator verify the exchange with that CA alone. Off, peers' tokens and updates
    /// cross the network in plain text, and the run's `ExchangeTLS` condition says so.
    #[serde(default = "enabled")]
    pub enabled: bool,
}

fn enabled() -> bool {
    true
}

impl Default for ExchangeTlsSpec {
    fn default() -> Self {
        Self { enabled: enabled() }
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
