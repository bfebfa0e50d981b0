//! How a run's exchange is reached: over TLS by default, verified with the run's own CA.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The run's exchange, as peers on other networks reach it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeSpec {
    #[serde(default)]
    pub tls: ExchangeTlsSpec,
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
