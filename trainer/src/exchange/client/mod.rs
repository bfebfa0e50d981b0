//! A peer's (or the operator's) connection to the exchange: bearer token on every call,
//! retries with backoff while the exchange is unreachable, and an optional bandwidth cap
//! for home links.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tracing::Instrument;

use super::proto::{self, exchange_client};
use super::tls::{ClientTls, untrusted};
use super::{MAX_MESSAGE_BYTES, PeerId, Reason, Refusal, Settings};
use crate::outer::Round;

mod direct;
mod round;
mod upload;

pub use round::{Entry, ExchangeTimes, RoundResult};

/// What moves payloads to and from object storage.
type StorageHttp = reqwest::Client;

type Grpc = exchange_client::ExchangeClient<InterceptedService<Channel, Bearer>>;

/// Adds the bearer token to every call.
#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        // The exchange's span for this call joins the caller's trace.
        crate::trace::inject(&tracing::Span::current(), req.metadata_mut());
        Ok(req)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the exchange refused: {0}")]
    Refused(#[from] Refusal),
    #[error("the exchange at {url} stayed unreachable for {waited:?}: {last}")]
    Unreachable {
        url: String,
        waited: Duration,
        last: Status,
    },
    #[error("unexpected answer from the exchange: {0}")]
    Protocol(String),
    #[error(
        "the exchange at {url} presented a certificate this client does not trust ({reason}): \
         check the run's CA (STARLING_TLS_CA) and the name it is verified against \
         (STARLING_TLS_SERVER_NAME)"
    )]
    Untrusted { url: String, reason: String },
}

impl ClientError {
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            ClientError::Refused(r) => Some(r),
            _ => None,
        }
    }
}

/// How the client reaches the exchange.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub url: String,
    pub token: String,
    /// Fingerprint of the caller's run configuration.
    pub fingerprint: String,
    /// Cap on upload and download speed, in megabits per second.
    pub bandwidth_mbps: Option<f64>,
    /// How long to keep retrying an unreachable exchange before giving up.
    pub retry_for: Duration,
    /// What verifies an `https://` exchange; `None` for a plaintext `http://` one.
    pub tls: Option<ClientTls>,
}

/// The exchange's span of a round, as its last reply named it.
type RoundTrace = Arc<Mutex<Option<(Round, opentelemetry::Context)>>>;

#[derive(Clone)]
pub struct ExchangeClient {
    grpc: Grpc,
    http: StorageHttp,
    opts: ClientOptions,
    round_trace: RoundTrace,
    /// The exchange said it keeps payloads itself (no bucket): updates are streamed to
    /// it without asking for an upload URL.
    streams_payloads: Arc<std::sync::atomic::AtomicBool>,
}

impl ExchangeClient {
    /// Connects lazily: the first call dials, and a restarted exchange is redialled.
    /// Must be called within a Tokio runtime, which the connection then runs on.
    pub fn new(opts: ClientOptions) -> Result<Self, ClientError> {
        let bad_url = |e: &dyn std::fmt::Display| {
            ClientError::Protocol(format!("exchange URL {}: {e}", opts.url))
        };
        let mut endpoint = Endpoint::from_shared(opts.url.clone()).map_err(|e| bad_url(&e))?;
        if let Some(tls) = &opts.tls {
            let mut config = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca));
            if let Some(name) = &tls.server_name {
                config = config.domain_name(name);
            }
            endpoint = endpoint.tls_config(config).map_err(|e| bad_url(&e))?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let header = format!("Bearer {}", opts.token)
            .parse()
            .map_err(|_| ClientError::Protocol("the token is not valid header text".into()))?;
        let grpc = exchange_client::ExchangeClient::with_interceptor(channel, Bearer(header))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let http = direct::http().map_err(ClientError::Protocol)?;
        Ok(Self {
            grpc,
            http,
            opts,
            round_trace: RoundTrace::default(),
            streams_payloads: Arc::default(),
        })
    }

    /// Runs `call` until it succeeds, is refused, or the exchange has been unreachable for
    /// `retry_for`; waits between attempts grow from 100 ms to 5 s.
    async fn retrying<T, F, Fut>(&self, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let start = Instant::now();
        let mut wait = Duration::from_millis(100);
        loop {
            match call(self.grpc.clone()).await {
                Ok(v) => return Ok(v),
                Err(status) => self.back_off(status, start, &mut wait).await?,
            }
        }
    }

    /// Turns a failed call into its error, or — when the exchange is merely unreachable
    /// and `retry_for` has not run out — waits before the next attempt.
    async fn back_off(
        &self,
        status: Status,
        start: Instant,
        wait: &mut Duration,
    ) -> Result<(), ClientError> {
        // A certificate refused now is refused on every try.
        let retry = Refusal::from_status(&status).is_none()
            && transient(&status)
            && untrusted(&status).is_none()
            && start.elapsed() < self.opts.retry_for;
        if !retry {
            return Err(self.error(status, start.elapsed()));
        }
        tracing::debug!(%status, ?wait, "exchange unreachable; retrying");
        tokio::time::sleep(*wait).await;
        *wait = (*wait * 2).min(Duration::from_secs(5));
        Ok(())
    }

    /// What a failed call means: a refusal, an exchange unreachable for `waited`, or an
    /// answer that makes no sense.
    fn error(&self, status: Status, waited: Duration) -> ClientError {
        if let Some(refusal) = Refusal::from_status(&status) {
            return refusal.into();
        }
        if let Some(reason) = untrusted(&status) {
            let url = self.opts.url.clone();
            return ClientError::Untrusted { url, reason };
        }
        if !transient(&status) {
            return ClientError::Protocol(status.to_string());
        }
        ClientError::Unreachable {
            url: self.opts.url.clone(),
            waited,
            last: status,
        }
    }

    /// One round from this peer's side: upload its update (if it has one), then wait for
    /// the round's accepted updates. If the exchange drops while this peer waits it may
    /// have restarted without the update, so the update is sent again before waiting
    /// again. An update that arrives after the round closed is reported and skipped.
    pub async fn exchange_round(
        &self,
        round: Round,
        update: Option<(&[u8], f32)>,
    ) -> Result<RoundResult, ClientError> {
        self.exchange_round_probed(round, update, &[]).await
    }

    /// [`Self::exchange_round`], the update sent with the peer's probe.
    pub async fn exchange_round_probed(
        &self,
        round: Round,
        update: Option<(&[u8], f32)>,
        probe: &[f32],
    ) -> Result<RoundResult, ClientError> {
        let start = Instant::now();
        let mut wait = Duration::from_millis(100);
        let mut times = ExchangeTimes::default();
        loop {
            let mut accepted_bytes = None;
            if let Some((bytes, loss)) = update {
                let sending = Instant::now();
                let put = self.put_update_probed(round, bytes, loss, probe);
                let upload = tracing::info_span!("upload", round = round.0, bytes = bytes.len());
                let put = put.instrument(upload).await;
                times.upload += sending.elapsed();
                match put {
                    Ok(n) => accepted_bytes = Some(n),
                    Err(ClientError::Refused(r)) if r.reason == Reason::RoundClosed => {
                        tracing::warn!(round = round.0, refusal = %r, "update not counted");
                    }
                    Err(e) => return Err(e),
                }
            }
            match self.fetch_round_once(round, &mut times).await {
                Ok(mut result) => {
                    result.accepted_bytes = accepted_bytes;
                    result.times = times;
                    return Ok(result);
                }
                Err(status) => self.back_off(status, start, &mut wait).await?,
            }
        }
    }

    /// Admits this peer; returns who the token says it is, the open round and the run's
    /// round count.
    pub async fn join(&self) -> Result<(PeerId, Round, Round), ClientError> {
        let (name, open, rounds) = self.join_as().await?;
        let peer = name.parse().map_err(|e: String| ClientError::Protocol(e))?;
        Ok((peer, open, rounds))
    }

    /// [`Self::join`] for a peer or an evaluator: who the token names, as a name.
    pub async fn join_as(&self) -> Result<(String, Round, Round), ClientError> {
        let fingerprint = self.opts.fingerprint.clone();
        let reply = self
            .retrying(|mut g| {
                let req = proto::JoinRequest {
                    config_fingerprint: fingerprint.clone(),
                };
                async move { g.join(req).await }
            })
            .await?;
        self.note_round_trace(reply.metadata());
        let reply = reply.into_inner();
        Ok((reply.peer, Round(reply.open_round), Round(reply.rounds)))
    }

    /// One heartbeat, without retries (the next one will come soon).
    pub async fn heartbeat(&self, round: Round) -> Result<Round, Status> {
        let reply = self
            .grpc
            .clone()
            .heartbeat(proto::HeartbeatRequest { round: round.0 })
            .await?;
        Ok(Round(reply.into_inner().open_round))
    }

    /// Evaluator: waits for `round` to close and downloads it, with its roster and the
    /// peers' probes.
    pub async fn fetch_round(&self, round: Round) -> Result<RoundResult, ClientError> {
        let start = Instant::now();
        let mut wait = Duration::from_millis(100);
        let mut times = ExchangeTimes::default();
        loop {
            match self.fetch_round_once(round, &mut times).await {
                Ok(result) => return Ok(RoundResult { times, ..result }),
                Err(status) => self.back_off(status, start, &mut wait).await?,
            }
        }
    }

    /// Evaluator: sends its signed report of `round`.
    pub async fn put_measurements(&self, round: Round, report: &str) -> Result<(), ClientError> {
        self.retrying(|mut g| {
            let req = proto::Measurements {
                round: round.0,
                report: report.to_owned(),
            };
            async move { g.put_measurements(req).await.map(|_| ()) }
        })
        .await
    }

    /// Waits for `round` to close and downloads its accepted updates, in peer order,
    /// with the run's length when it closed; one attempt. The time until the first
    /// message (the exchange answers when the round closes) is added to `times.wait`, the
    /// rest to `times.fetch`. The reply names the exchange's span of the round it opened
    /// next.
    async fn fetch_round_once(
        &self,
        round: Round,
        times: &mut ExchangeTimes,
    ) -> Result<RoundResult, Status> {
        match self.fetch_round_from(round, times, false).await {
            Err(status) if status.code() == Code::DataLoss => {
                tracing::warn!(round = round.0, %status,
                    "a payload in storage is not what the exchange accepted; fetching the round through the exchange");
                self.fetch_round_from(round, times, true).await
            }
            fetched => fetched,
        }
    }

    /// [`Self::fetch_round_once`], with the payloads from storage where the exchange
    /// keeps them there, or all through the exchange (`inline`).
    async fn fetch_round_from(
        &self,
        round: Round,
        times: &mut ExchangeTimes,
        inline: bool,
    ) -> Result<RoundResult, Status> {
        let asked = Instant::now();
        let wait = tracing::info_span!("wait", round = round.0);
        let req = proto::FetchRoundRequest {
            round: round.0,
            inline,
        };
        let reply = (self.grpc.clone())
            .fetch_round(req)
            .instrument(wait.clone())
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(status) => {
                times.wait += asked.elapsed();
                return Err(status);
            }
        };
        self.note_round_trace(reply.metadata());
        let mut stream = reply.into_inner();
        let first = stream.next().instrument(wait).await;
        times.wait += asked.elapsed();
        let fetching = Instant::now();
        let fetch = tracing::info_span!("fetch", round = round.0);
        let result = self
            .read_round(round, first, &mut stream)
            .instrument(fetch)
            .await;
        times.fetch += fetching.elapsed();
        result
    }

    /// Keeps the exchange's span of the round a reply names, for [`Self::round_trace`].
    fn note_round_trace(&self, metadata: &tonic::metadata::MetadataMap) {
        let round = (metadata.get(crate::trace::ROUND_METADATA))
            .and_then(|v| v.to_str().ok()?.parse().ok());
        if let (Some(round), Some(cx)) = (round, crate::trace::remote(metadata))
            && let Ok(mut trace) = self.round_trace.lock()
        {
            *trace = Some((Round(round), cx));
        }
    }

    /// The exchange's span of `round`, when a reply has named it: a peer's round is its
    /// child, so every peer's round and the exchange's are one trace.
    pub fn round_trace(&self, round: Round) -> Option<opentelemetry::Context> {
        let trace = self.round_trace.lock().ok()?;
        trace
            .as_ref()
            .filter(|(r, _)| *r == round)
            .map(|(_, cx)| cx.clone())
    }

    /// Downloads the global state and the round it starts.
    pub async fn fetch_state(&self) -> Result<(Round, Vec<u8>), ClientError> {
        let bandwidth = self.opts.bandwidth_mbps;
        self.retrying(|mut g| async move {
            use proto::state_chunk::Item;
            let mut stream = g
                .fetch_state(proto::FetchStateRequest {})
                .await?
                .into_inner();
            let mut pacer = Pacer::new(bandwidth);
            let mut header = None;
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.next().await {
                match chunk?.item {
                    Some(Item::Header(h)) => {
                        bytes.reserve(h.size as usize);
                        header = Some(h);
                    }
                    Some(Item::Data(d)) => {
                        pacer.pace(d.len()).await;
                        bytes.extend_from_slice(&d);
                    }
                    None => return Err(Status::internal("empty state chunk")),
                }
            }
            match header {
                Some(h) if h.size == bytes.len() as u64 => Ok((Round(h.round), bytes)),
                _ => Err(Status::unavailable("the state stream ended early")),
            }
        })
        .await
    }

    /// Operator: sets per-peer weights.
    pub async fn set_weights(
        &self,
        weights: impl IntoIterator<Item = (PeerId, f32)>,
    ) -> Result<(), ClientError> {
        self.set_scored_weights(weights, None).await
    }

    /// Operator: sets per-peer weights with the signed ledger `record` (its line and
    /// the ledger's public key) they follow from.
    pub async fn set_scored_weights(
        &self,
        weights: impl IntoIterator<Item = (PeerId, f32)>,
        record: Option<(&str, &str)>,
    ) -> Result<(), ClientError> {
        let (line, key) = record.unwrap_or_default();
        let weights: std::collections::HashMap<String, f32> = weights
            .into_iter()
            .map(|(p, w)| (p.to_string(), w))
            .collect();
        self.retrying(|mut g| {
            let req = proto::SetWeightsRequest {
                weights: weights.clone(),
                ledger_record: line.to_owned(),
                ledger_public_key: key.to_owned(),
            };
            async move { g.set_weights(req).await.map(|_| ()) }
        })
        .await
    }

    /// Operator: where the run stands.
    pub async fn run_state(&self) -> Result<proto::RunState, ClientError> {
        self.retrying(|mut g| async move {
            g.get_run_state(proto::RunStateRequest {})
                .await
                .map(|r| r.into_inner())
        })
        .await
    }

    /// Operator: where the run stands now, then each time that changes (and unchanged
    /// every [`super::WATCH_KEEPALIVE`]); one attempt, as the caller decides when to
    /// watch again. The stream ends with the first error.
    pub async fn watch_run_state(
        &self,
    ) -> Result<impl tokio_stream::Stream<Item = Result<proto::RunState, ClientError>>, ClientError>
    {
        let stream = self
            .grpc
            .clone()
            .watch_run_state(proto::RunStateRequest {})
            .await
            .map_err(|status| self.error(status, Duration::ZERO))?
            .into_inner();
        let this = self.clone();
        Ok(stream.map(move |item| item.map_err(|status| this.error(status, Duration::ZERO))))
    }

    /// Operator only: puts `settings` in force in the running exchange; returns them.
    pub async fn configure(&self, settings: Settings) -> Result<Settings, ClientError> {
        let reply = self
            .retrying(|mut g| async move {
                g.configure(proto::Settings::from(settings))
                    .await
                    .map(|r| r.into_inner())
            })
            .await?;
        Settings::try_from(reply).map_err(ClientError::Protocol)
    }
}

/// Errors worth retrying: the exchange is down, restarting, or the link dropped.
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Keeps a transfer at or under a bit rate by sleeping between chunks.
struct Pacer {
    bits_per_second: Option<f64>,
    start: Instant,
    bytes: u64,
}

impl Pacer {
    fn new(mbps: Option<f64>) -> Self {
        Self {
            bits_per_second: mbps.filter(|m| *m > 0.0).map(|m| m * 1e6),
            start: Instant::now(),
            bytes: 0,
        }
    }

    async fn pace(&mut self, bytes: usize) {
        self.pace_owned(bytes).await;
    }

    /// The wait before `bytes` more may go, as a future that holds nothing of the pacer.
    fn pace_owned(&mut self, bytes: usize) -> impl Future<Output = ()> + Send + use<> {
        let wait = self.bits_per_second.and_then(|bps| {
            self.bytes += bytes as u64;
            let due = Duration::from_secs_f64(self.bytes as f64 * 8.0 / bps);
            due.checked_sub(self.start.elapsed())
        });
        async move {
            if let Some(wait) = wait {
                tokio::time::sleep(wait).await;
            }
        }
    }
}
