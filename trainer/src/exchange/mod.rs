//! The exchange: the run's gRPC rendezvous for compressed updates ([`server`]), and the
//! peer's side of it ([`client`]).
//!
//! Refusals carry a machine-readable [`Reason`] in the `x-starling-reason` response
//! metadata next to the gRPC code and message, so a peer reacts to *why* it was refused
//! (fetch the closed round, resync, give up) without parsing text.

pub mod client;
pub mod pacing;
pub mod server;
mod settings;
pub mod storage;
pub mod tls;

pub use settings::{DEFAULT_DEADLINE_FLOOR, DEFAULT_QUORUM, Settings};

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use tonic::{Code, Status};

/// The generated gRPC code for `proto/exchange.proto`.
pub mod proto {
    tonic::include_proto!("starling.exchange.v1");
}

/// Updates, rounds and states travel in chunks of at most this many bytes.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// The largest single gRPC message either side accepts: a chunk and its framing.
pub const MAX_MESSAGE_BYTES: usize = CHUNK_BYTES + 64 * 1024;
const REASON_KEY: &str = "x-starling-reason";
/// How often `WatchRunState` sends an unchanged state again, so that a watcher notices
/// a link that went silent without closing.
pub const WATCH_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

impl proto::RunState {
    /// Whether `other` says anything this state does not: everything but what changes on
    /// its own with time (how long ago each peer was heard from). Compared encoded, so a
    /// NaN loss equals itself and an unchanged run is never reported as changed.
    pub fn differs_from(&self, other: &proto::RunState) -> bool {
        fn key(state: &proto::RunState) -> Vec<u8> {
            let mut state = state.clone();
            for peer in &mut state.peers {
                peer.last_seen_ms_ago = 0;
            }
            prost::Message::encode_to_vec(&state)
        }
        key(self) != key(other)
    }
}

/// A peer within a run: `p` followed by its index, which also picks its data slice.
///
/// Peers are numbered once, when the run is placed, and keep their id when re-placed on
/// another member: the id (not the pod) owns the data slice, the credential and the
/// rating. The operator's API uses this type too, in its string form.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct PeerId(u32);

impl PeerId {
    pub fn new(index: u32) -> Self {
        Self(index)
    }

    pub fn index(self) -> u32 {
        self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0)
    }
}

impl FromStr for PeerId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix('p')
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .filter(|d| *d == "0" || !d.starts_with('0'))
            .and_then(|d| d.parse().ok())
            .map(PeerId)
            .ok_or_else(|| format!("invalid peer id {s:?}: expected `p` followed by a number"))
    }
}

impl TryFrom<String> for PeerId {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PeerId> for String {
    fn from(id: PeerId) -> Self {
        id.to_string()
    }
}

impl schemars::JsonSchema for PeerId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PeerId".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^p(0|[1-9][0-9]*)$",
            "description": "Peer id within a run: `p` followed by its index, e.g. `p0`."
        })
    }
}

/// Who a bearer token belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    Peer(PeerId),
    /// The operator: may set weights and read the run state, never submit updates.
    Operator,
    /// The run's publisher: may read checkpoints and report their publication, nothing
    /// else (it holds the Hub token, so it holds nothing more of the run's).
    Publisher,
    /// One of the run's evaluators (`e0`, `e1`, …): fetches rounds as a peer does and
    /// sends measurements, never updates.
    Evaluator(u32),
}

/// The name of evaluator `index` in tokens files and reports.
pub fn evaluator_name(index: u32) -> String {
    format!("e{index}")
}

fn parse_evaluator(name: &str) -> Option<u32> {
    let digits = name.strip_prefix('e')?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The run's bearer tokens, from a file of `<identity> <token>` lines (`p0 …`,
/// `operator …`), as the operator mounts it from a Secret.
#[derive(Clone, Debug, Default)]
pub struct Tokens(HashMap<String, Identity>);

impl Tokens {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut map = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (who, token) = line
                .split_once(char::is_whitespace)
                .map(|(w, t)| (w, t.trim()))
                .ok_or_else(|| format!("line {}: expected `<identity> <token>`", n + 1))?;
            let identity = match who {
                "operator" => Identity::Operator,
                "publisher" => Identity::Publisher,
                evaluator if parse_evaluator(evaluator).is_some() => {
                    Identity::Evaluator(parse_evaluator(evaluator).unwrap_or_default())
                }
                peer => Identity::Peer(peer.parse().map_err(|e| format!("line {}: {e}", n + 1))?),
            };
            if token.len() < 16 {
                return Err(format!(
                    "line {}: token for {who} is shorter than 16 characters",
                    n + 1
                ));
            }
            if map.insert(token.to_owned(), identity).is_some() {
                return Err(format!("line {}: token reused", n + 1));
            }
        }
        Ok(Self(map))
    }

    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn insert(&mut self, token: impl Into<String>, identity: Identity) {
        self.0.insert(token.into(), identity);
    }

    pub(crate) fn identify(&self, token: &str) -> Option<Identity> {
        self.0.get(token).copied()
    }
}

/// Why the exchange refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No or unknown bearer token.
    Unauthenticated,
    /// The token is valid but may not make this call.
    Forbidden,
    /// The caller's run configuration differs from the exchange's.
    ConfigMismatch,
    /// The update came after its round closed; the round's result can still be fetched.
    RoundClosed,
    /// The caller is on a round the exchange no longer keeps or has not reached: fetch
    /// the state and continue from its round.
    Resync,
    /// All rounds are done.
    RunDone,
    /// The update does not decode or does not fit the model.
    CorruptUpdate,
    /// The update is larger than the exchange accepts.
    TooLarge,
    /// A malformed request.
    BadRequest,
}

impl Reason {
    const ALL: [Reason; 9] = [
        Reason::Unauthenticated,
        Reason::Forbidden,
        Reason::ConfigMismatch,
        Reason::RoundClosed,
        Reason::Resync,
        Reason::RunDone,
        Reason::CorruptUpdate,
        Reason::TooLarge,
        Reason::BadRequest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unauthenticated => "unauthenticated",
            Reason::Forbidden => "forbidden",
            Reason::ConfigMismatch => "config-mismatch",
            Reason::RoundClosed => "round-closed",
            Reason::Resync => "resync",
            Reason::RunDone => "run-done",
            Reason::CorruptUpdate => "corrupt-update",
            Reason::TooLarge => "too-large",
            Reason::BadRequest => "bad-request",
        }
    }

    fn code(self) -> Code {
        match self {
            Reason::Unauthenticated => Code::Unauthenticated,
            Reason::Forbidden => Code::PermissionDenied,
            Reason::ConfigMismatch | Reason::RunDone => Code::FailedPrecondition,
            Reason::RoundClosed => Code::Aborted,
            Reason::Resync => Code::OutOfRange,
            Reason::CorruptUpdate | Reason::BadRequest => Code::InvalidArgument,
            Reason::TooLarge => Code::ResourceExhausted,
        }
    }
}

/// A refusal: the reason and a sentence a person can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({})", reason.as_str())]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// The refusal a status carries, if it is one (and not, say, a transport error). A
    /// reason under another code than its own is not one: a client that reads codes and
    /// one that reads reasons must never disagree about what a status means.
    pub fn from_status(status: &Status) -> Option<Self> {
        let reason = status.metadata().get(REASON_KEY)?.to_str().ok()?;
        let reason = Reason::ALL.into_iter().find(|r| r.as_str() == reason)?;
        (status.code() == reason.code()).then(|| Self::new(reason, status.message()))
    }
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Self {
        let mut status = Status::new(r.reason.code(), r.message);
        status.metadata_mut().insert(
            REASON_KEY,
            r.reason.as_str().parse().expect("reasons are ASCII"),
        );
        status
    }
}

#[cfg(test)]
mod download_tests;
#[cfg(test)]
mod scoring_tests;
#[cfg(test)]
mod storage_tests;
#[cfg(test)]
mod tests;
