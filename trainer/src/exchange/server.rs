//! The exchange service.
//!
//! It holds the run's global state itself — the model and the outer loop, advanced by
//! every closed round with the same code the peers run — so it never has to trust a peer
//! for the state it hands to a late or returning one, and it can write the run's
//! checkpoints. A round closes when every live peer has submitted (and at least
//! `min_peers` have), or `deadline` after its first update; its state is applied and
//! persisted *before* any peer sees the result, so a restarted exchange resumes exactly
//! where the peers are.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::proto::{self, exchange_server::ExchangeServer};
use super::{CHUNK_BYTES, Identity, MAX_MESSAGE_BYTES, PeerId, Reason, Refusal, Tokens};
use crate::data::Batch;
use crate::model::{InnerOptimizer, Llama, save_checkpoint};
use crate::outer::{Outer, Round};
use crate::run::{Algorithm, Run};

/// How the exchange runs a run.
#[derive(Clone, Debug)]
pub struct ExchangeOptions {
    pub tokens: Tokens,
    /// Updates needed before a round may close at quorum (the deadline closes it anyway).
    pub min_peers: u32,
    /// How long a round stays open after its first update.
    pub deadline: Duration,
    /// A peer not heard from for this long is not waited for.
    pub liveness: Duration,
    /// Largest update accepted; by default the dense fp32 size of the model.
    pub max_update_bytes: Option<u64>,
    /// Closed rounds kept for fetching; older ones are served as a state instead.
    pub keep_rounds: usize,
    /// Where the global state is persisted after every round (and resumed from).
    pub state_dir: Option<PathBuf>,
    /// Where checkpoints go: `<dir>/round-<NNNNNN>/` in the Hugging Face layout.
    pub checkpoint_dir: Option<PathBuf>,
    pub checkpoint_every: u32,
    /// Held-out sequences the validation loss is measured on after every round.
    pub eval_rows: u32,
    pub run_name: String,
    /// Certificate chain and key (PEM) to serve TLS with; plain HTTP/2 when `None`.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
}

/// The gRPC service type, ready to be served.
pub type Service =
    tonic::service::interceptor::InterceptedService<ExchangeServer<Exchange>, Authenticate>;

/// Maps the bearer token of every call to its [`Identity`], or refuses the call.
#[derive(Clone)]
pub struct Authenticate(Tokens);

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let identity = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|t| self.0.identify(t))
            .ok_or_else(|| {
                Refusal::new(
                    Reason::Unauthenticated,
                    "missing or unknown bearer token for this run",
                )
            })?;
        req.extensions_mut().insert(identity);
        Ok(req)
    }
}

#[derive(Clone)]
pub struct Exchange {
    shared: Arc<Shared>,
}

struct Shared {
    run: Run,
    opts: ExchangeOptions,
    state: Mutex<State>,
    global: Mutex<Global>,
    /// The open round; bumped when a round closes, waking fetchers.
    open_tx: watch::Sender<Round>,
    max_update: u64,
    dense_bytes: u64,
}

struct Global {
    model: Llama,
    outer: Outer,
    /// Only DDP needs an optimiser here: its rounds are AdamW steps.
    inner: Option<InnerOptimizer>,
    validation: Batch,
}

struct State {
    open: Round,
    closing: bool,
    submissions: BTreeMap<PeerId, Submission>,
    first_submission: Option<Instant>,
    closed: VecDeque<Closed>,
    summaries: VecDeque<proto::RoundSummary>,
    peers: BTreeMap<PeerId, PeerRecord>,
    weights: HashMap<PeerId, f32>,
    /// The global state at the start of `open`.
    state_bytes: Arc<Vec<u8>>,
    bytes_received: u64,
    bytes_sent: u64,
    tokens: u64,
    initial_validation_loss: f32,
}

struct Submission {
    bytes: Arc<Vec<u8>>,
    train_loss: f32,
}

struct Closed {
    round: Round,
    entries: Vec<(PeerId, f32, Arc<Vec<u8>>)>,
}

struct PeerRecord {
    last_seen: Instant,
    accepted: u32,
    rejected: u32,
    bytes: u64,
    last_train_loss: f32,
    last_rejection: String,
}

impl PeerRecord {
    fn new() -> Self {
        Self {
            last_seen: Instant::now(),
            accepted: 0,
            rejected: 0,
            bytes: 0,
            last_train_loss: f32::NAN,
            last_rejection: String::new(),
        }
    }
}

/// Recent round summaries kept for `GetRunState`.
const SUMMARIES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("initialising the global state: {0}")]
    Init(String),
    #[error("resuming from {path}: {message}")]
    Resume { path: PathBuf, message: String },
}

impl Exchange {
    /// Sets up the run's global state, resuming from `state_dir` when it holds one.
    pub fn new(run: Run, opts: ExchangeOptions) -> Result<Self, ExchangeError> {
        let init = |e: &dyn std::fmt::Display| ExchangeError::Init(e.to_string());
        let model = run.initial_model().map_err(|e| init(&e))?;
        let mut outer = Outer::new(&run.config, &model).map_err(|e| init(&e))?;
        let inner = match run.config.algorithm {
            Algorithm::Ddp => Some(
                InnerOptimizer::new(&model, run.config.adamw(), run.config.schedule())
                    .map_err(|e| init(&e))?,
            ),
            _ => None,
        };
        let validation = run.validation_batch(opts.eval_rows).map_err(|e| init(&e))?;
        let initial_validation_loss = validation_loss(&model, &validation);
        let mut open = Round(0);
        let saved = opts.state_dir.as_ref().map(|d| d.join(STATE_FILE));
        if let Some(path) = saved
            && let Ok(bytes) = std::fs::read(&path)
        {
            open = outer
                .import(&model, &bytes)
                .map_err(|e| ExchangeError::Resume {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            tracing::info!(round = open.0, path = %path.display(), "resumed the run's state");
        }
        let state_bytes = Arc::new(outer.export(&model, open).map_err(|e| init(&e))?);
        let dense_bytes = 4 * model.parameter_count() as u64;
        let max_update = opts.max_update_bytes.unwrap_or(dense_bytes + 64 * 1024);
        let (open_tx, _) = watch::channel(open);
        let state = State {
            open,
            closing: false,
            submissions: BTreeMap::new(),
            first_submission: None,
            closed: VecDeque::new(),
            summaries: VecDeque::new(),
            peers: BTreeMap::new(),
            weights: HashMap::new(),
            state_bytes,
            bytes_received: 0,
            bytes_sent: 0,
            tokens: 0,
            initial_validation_loss,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                run,
                opts,
                state: Mutex::new(state),
                global: Mutex::new(Global {
                    model,
                    outer,
                    inner,
                    validation,
                }),
                open_tx,
                max_update,
                dense_bytes,
            }),
        })
    }

    /// The service with its bearer-token check in front, and a task that closes rounds
    /// at their deadline (it stops when the service is dropped).
    pub fn into_service(self) -> Service {
        let weak = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { break };
                Exchange { shared }.maybe_close();
            }
        });
        let check = Authenticate(self.shared.opts.tokens.clone());
        let server = ExchangeServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        tonic::service::interceptor::InterceptedService::new(server, check)
    }

    /// Serves the exchange on `listener` until `shutdown` completes: gRPC, and
    /// Prometheus metrics at `GET /metrics` (plain HTTP/1.1, no token, as scrapers expect).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let this = self.clone();
        let metrics = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let text = prometheus(&this.run_state());
                async move { text }
            }),
        );
        let mut server = tonic::transport::Server::builder();
        if let Some((cert, key)) = &self.shared.opts.tls {
            let identity = tonic::transport::Identity::from_pem(cert, key);
            server =
                server.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
        }
        let routes = tonic::service::Routes::from(metrics).add_service(self.into_service());
        server
            .accept_http1(true)
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                shutdown,
            )
            .await
    }

    /// Where the run stands, as the operator polls it and `/metrics` reports it.
    pub fn run_state(&self) -> proto::RunState {
        let state = self.state();
        let liveness = self.shared.opts.liveness;
        let peers = state
            .peers
            .iter()
            .map(|(p, r)| proto::PeerState {
                peer: p.to_string(),
                alive: r.last_seen.elapsed() < liveness,
                last_seen_ms_ago: r.last_seen.elapsed().as_millis() as u64,
                weight: state.weights.get(p).copied().unwrap_or(1.0),
                updates_accepted: r.accepted,
                updates_rejected: r.rejected,
                bytes_received: r.bytes,
                last_train_loss: r.last_train_loss,
                last_rejection: r.last_rejection.clone(),
            })
            .collect();
        proto::RunState {
            open_round: state.open.0,
            rounds: self.rounds().0,
            done: state.open >= self.rounds(),
            peers,
            recent: state.summaries.iter().cloned().collect(),
            bytes_received: state.bytes_received,
            bytes_sent: state.bytes_sent,
            dense_update_bytes: self.shared.dense_bytes,
            initial_validation_loss: state.initial_validation_loss,
            tokens: state.tokens,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The calling peer, seen now; refuses the operator's token.
    fn peer<T>(&self, req: &Request<T>) -> Result<PeerId, Status> {
        match req.extensions().get::<Identity>() {
            Some(Identity::Peer(p)) => {
                let p = *p;
                self.state()
                    .peers
                    .entry(p)
                    .or_insert_with(PeerRecord::new)
                    .last_seen = Instant::now();
                Ok(p)
            }
            _ => Err(Refusal::new(Reason::Forbidden, "only peers may call this").into()),
        }
    }

    fn operator<T>(req: &Request<T>) -> Result<(), Status> {
        match req.extensions().get::<Identity>() {
            Some(Identity::Operator) => Ok(()),
            _ => Err(Refusal::new(Reason::Forbidden, "only the operator may call this").into()),
        }
    }

    fn check_fingerprint(&self, theirs: &str) -> Result<(), Refusal> {
        let ours = &self.shared.run.fingerprint;
        if theirs != ours {
            return Err(Refusal::new(
                Reason::ConfigMismatch,
                format!(
                    "the peer's run configuration ({theirs}) differs from the exchange's ({ours}): \
                     model, data, schedule and algorithm must match"
                ),
            ));
        }
        Ok(())
    }

    fn rounds(&self) -> Round {
        Round(self.shared.run.config.rounds)
    }

    fn record_rejection(&self, peer: PeerId, refusal: &Refusal) {
        let mut state = self.state();
        let record = state.peers.entry(peer).or_insert_with(PeerRecord::new);
        record.rejected += 1;
        record.last_rejection = refusal.to_string();
        tracing::warn!(%peer, %refusal, "refused an update");
    }

    /// Starts closing the open round if it is due: every live peer submitted (at least
    /// `min_peers` of them), or its deadline passed.
    fn maybe_close(&self) {
        let due = {
            let state = self.state();
            let Some(first) = state.first_submission else {
                return;
            };
            if state.closing {
                return;
            }
            let liveness = self.shared.opts.liveness;
            let everyone = state
                .peers
                .iter()
                .filter(|(_, r)| r.last_seen.elapsed() < liveness)
                .all(|(p, _)| state.submissions.contains_key(p));
            let quorum = everyone && state.submissions.len() >= self.shared.opts.min_peers as usize;
            let late = first.elapsed() >= self.shared.opts.deadline;
            (quorum || late).then_some(late && !quorum)
        };
        if let Some(at_deadline) = due {
            let this = self.clone();
            tokio::spawn(async move { this.close(at_deadline).await });
        }
    }

    async fn close(&self, at_deadline: bool) {
        let (round, entries, losses) = {
            let mut state = self.state();
            if state.closing || state.submissions.is_empty() {
                return;
            }
            state.closing = true;
            let round = state.open;
            let submissions = std::mem::take(&mut state.submissions);
            let losses: Vec<f32> = submissions.values().map(|s| s.train_loss).collect();
            let entries: Vec<_> = submissions
                .into_iter()
                .map(|(p, s)| (p, state.weights.get(&p).copied().unwrap_or(1.0), s.bytes))
                .collect();
            (round, entries, losses)
        };
        let this = self.clone();
        let to_apply = entries.clone();
        let train_loss = mean(&losses);
        let applied =
            tokio::task::spawn_blocking(move || this.advance(round, &to_apply, train_loss)).await;
        let (state_bytes, validation) = match applied {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                // Every update was checked on arrival, so this is a bug or a full disk:
                // stop rather than serve a state the peers do not have.
                tracing::error!(round = round.0, error = %e, "could not advance the global state");
                std::process::exit(70);
            }
            Err(e) => {
                tracing::error!(round = round.0, error = %e, "advancing the global state panicked");
                std::process::exit(70);
            }
        };
        let config = &self.shared.run.config;
        let contributing = entries.iter().filter(|(_, w, _)| *w > 0.0).count() as u64;
        let bytes: u64 = entries.iter().map(|(_, _, b)| b.len() as u64).sum();
        let summary = proto::RoundSummary {
            round: round.0,
            contributors: entries.iter().map(|(p, _, _)| p.to_string()).collect(),
            train_loss,
            validation_loss: validation,
            bytes,
            closed_at_deadline: at_deadline,
        };
        tracing::info!(
            round = round.0,
            updates = entries.len(),
            contributors = ?summary.contributors,
            bytes,
            train_loss = summary.train_loss,
            validation_loss = validation,
            at_deadline,
            "round closed"
        );
        let next = round.next();
        {
            let mut state = self.state();
            state.tokens += contributing
                * u64::from(config.steps_per_round())
                * u64::from(config.batch)
                * u64::from(config.sequence_length);
            state.closed.push_back(Closed { round, entries });
            while state.closed.len() > self.shared.opts.keep_rounds.max(1) {
                state.closed.pop_front();
            }
            state.summaries.push_back(summary);
            while state.summaries.len() > SUMMARIES {
                state.summaries.pop_front();
            }
            state.state_bytes = Arc::new(state_bytes);
            state.open = next;
            state.first_submission = None;
            state.closing = false;
        }
        self.shared.open_tx.send_replace(next);
    }

    /// Applies a closed round to the global state, persists it, writes a checkpoint when
    /// due, and returns the new state's bytes and validation loss.
    fn advance(
        &self,
        round: Round,
        entries: &[(PeerId, f32, Arc<Vec<u8>>)],
        train_loss: f32,
    ) -> Result<(Vec<u8>, f32), String> {
        let shared = &self.shared;
        let mut global = shared.global.lock().unwrap_or_else(|p| p.into_inner());
        let g = &mut *global;
        let updates: Vec<(&[u8], f32)> =
            entries.iter().map(|(_, w, b)| (b.as_slice(), *w)).collect();
        g.outer
            .apply(
                &g.model,
                g.inner.as_mut(),
                &updates,
                shared.run.config.outer_lr,
            )
            .map_err(|e| e.to_string())?;
        let next = round.next();
        let bytes = g.outer.export(&g.model, next).map_err(|e| e.to_string())?;
        if let Some(dir) = &shared.opts.state_dir {
            write_atomically(&dir.join(STATE_FILE), &bytes)?;
        }
        let validation = validation_loss(&g.model, &g.validation);
        let every = shared.opts.checkpoint_every.max(1);
        let done = next.0 >= shared.run.config.rounds;
        if let Some(dir) = &shared.opts.checkpoint_dir
            && (next.0.is_multiple_of(every) || done)
        {
            let config = &shared.run.config;
            let meta = serde_json::json!({
                "run": shared.opts.run_name,
                "round": next.0,
                "algorithm": config.algorithm,
                "seed": config.seed,
                "tokenizer": shared.run.tokenizer.name(),
                "validation_loss": validation,
                "train_loss": train_loss,
                "codec": {"chunk": config.chunk, "k": config.k, "bits": config.bits,
                          "error_feedback": config.error_feedback},
                "contributors": entries.iter().map(|(p, _, _)| p.to_string()).collect::<Vec<_>>(),
            });
            let path = dir.join(format!("round-{:06}", next.0));
            save_checkpoint(&path, &g.model, &meta, &shared.run.tokenizer.files())
                .map_err(|e| e.to_string())?;
            tracing::info!(round = next.0, path = %path.display(), "checkpoint written");
        }
        Ok((bytes, validation))
    }

    async fn receive_update(
        &self,
        peer: PeerId,
        mut stream: Streaming<proto::UpdateChunk>,
    ) -> Result<proto::PutUpdateReply, Refusal> {
        use proto::update_chunk::Item;
        let bad = |m: &str| Refusal::new(Reason::BadRequest, m);
        let header = match stream.next().await {
            Some(Ok(proto::UpdateChunk {
                item: Some(Item::Header(h)),
            })) => h,
            Some(Err(status)) => return Err(bad(&format!("reading the update: {status}"))),
            _ => return Err(bad("an update must start with its header")),
        };
        self.check_fingerprint(&header.config_fingerprint)?;
        let round = Round(header.round);
        if self.check_round(peer, round)? {
            return Ok(proto::PutUpdateReply {
                round: round.0,
                accepted_bytes: header.size,
            });
        }
        let limit = self.shared.max_update;
        if header.size > limit {
            return Err(Refusal::new(
                Reason::TooLarge,
                format!(
                    "an update of {} bytes exceeds the limit of {limit}",
                    header.size
                ),
            ));
        }
        let mut bytes = Vec::with_capacity(header.size as usize);
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(proto::UpdateChunk {
                    item: Some(Item::Data(d)),
                }) => {
                    if (bytes.len() + d.len()) as u64 > header.size {
                        return Err(Refusal::new(
                            Reason::TooLarge,
                            format!(
                                "the update is longer than the {} bytes announced",
                                header.size
                            ),
                        ));
                    }
                    bytes.extend_from_slice(&d);
                }
                Ok(_) => return Err(bad("only data may follow the header")),
                Err(status) => return Err(bad(&format!("reading the update: {status}"))),
            }
        }
        if bytes.len() as u64 != header.size {
            return Err(bad(&format!(
                "the update ended after {} of the {} bytes announced",
                bytes.len(),
                header.size
            )));
        }
        // Decode it fully before accepting: a corrupt update must never reach a peer.
        let this = self.clone();
        let (bytes, checked) = tokio::task::spawn_blocking(move || {
            let global = this.shared.global.lock().unwrap_or_else(|p| p.into_inner());
            let checked = global.outer.check(&global.model, &bytes);
            (bytes, checked)
        })
        .await
        .map_err(|e| bad(&e.to_string()))?;
        checked.map_err(|e| Refusal::new(Reason::CorruptUpdate, e.to_string()))?;

        let accepted_bytes = bytes.len() as u64;
        {
            let mut state = self.state();
            if state.open != round || state.closing {
                return Err(Refusal::new(
                    Reason::RoundClosed,
                    format!("round {round} closed while the update was arriving"),
                ));
            }
            if let Some(previous) = state.submissions.get(&peer) {
                if *previous.bytes != bytes {
                    return Err(bad(&format!(
                        "{peer} already submitted a different update for round {round}"
                    )));
                }
            } else {
                state.submissions.insert(
                    peer,
                    Submission {
                        bytes: Arc::new(bytes),
                        train_loss: header.train_loss,
                    },
                );
                state.first_submission.get_or_insert_with(Instant::now);
                state.bytes_received += accepted_bytes;
                let record = state.peers.entry(peer).or_insert_with(PeerRecord::new);
                record.accepted += 1;
                record.bytes += accepted_bytes;
                record.last_train_loss = header.train_loss;
            }
        }
        self.maybe_close();
        Ok(proto::PutUpdateReply {
            round: round.0,
            accepted_bytes,
        })
    }

    /// Whether `peer` may submit for `round` now; `Ok(true)` when the exchange already
    /// holds its update for that round (a retry after a lost reply).
    fn check_round(&self, peer: PeerId, round: Round) -> Result<bool, Refusal> {
        let state = self.state();
        if state.open >= self.rounds() {
            return Err(Refusal::new(
                Reason::RunDone,
                format!("the run is done after {} rounds", self.rounds()),
            ));
        }
        if round > state.open {
            return Err(Refusal::new(
                Reason::Resync,
                format!(
                    "round {round} is not open yet (the exchange is at round {}); fetch the state",
                    state.open
                ),
            ));
        }
        let held = state
            .closed
            .iter()
            .any(|c| c.round == round && c.entries.iter().any(|(p, _, _)| *p == peer))
            || (round == state.open && state.closing && state.submissions.contains_key(&peer));
        if held {
            return Ok(true);
        }
        if round < state.open || state.closing {
            return Err(Refusal::new(
                Reason::RoundClosed,
                format!(
                    "round {round} is closed; this update came too late and is not counted. \
                     Fetch the round's result and go on"
                ),
            ));
        }
        Ok(false)
    }
}

/// The run state in the Prometheus text format.
pub fn prometheus(state: &proto::RunState) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP starling_exchange_{name} {help}");
        let _ = writeln!(out, "# TYPE starling_exchange_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "starling_exchange_{name}{labels} {value}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    let per_peer = |f: &dyn Fn(&proto::PeerState) -> f64| {
        state
            .peers
            .iter()
            .map(|p| (format!("{{peer=\"{}\"}}", p.peer), f(p)))
            .collect()
    };
    let last = state.recent.last();
    metric(
        "open_round",
        "gauge",
        "The round accepting updates.",
        one(f64::from(state.open_round)),
    );
    metric(
        "rounds",
        "gauge",
        "Rounds in the run.",
        one(f64::from(state.rounds)),
    );
    metric(
        "done",
        "gauge",
        "1 once every round has closed.",
        one(f64::from(u8::from(state.done))),
    );
    metric(
        "tokens_total",
        "counter",
        "Tokens trained on by accepted updates.",
        one(state.tokens as f64),
    );
    metric(
        "bytes_received_total",
        "counter",
        "Update bytes accepted.",
        one(state.bytes_received as f64),
    );
    metric(
        "bytes_sent_total",
        "counter",
        "Update and state bytes served to peers.",
        one(state.bytes_sent as f64),
    );
    metric(
        "dense_update_bytes",
        "gauge",
        "Bytes of one dense fp32 update of the model.",
        one(state.dense_update_bytes as f64),
    );
    metric(
        "validation_loss",
        "gauge",
        "Held-out loss of the global model after the last closed round.",
        one(last.map_or(f64::from(state.initial_validation_loss), |r| {
            f64::from(r.validation_loss)
        })),
    );
    metric(
        "train_loss",
        "gauge",
        "Mean training loss the last round's peers reported.",
        one(last.map_or(f64::NAN, |r| f64::from(r.train_loss))),
    );
    metric(
        "peer_alive",
        "gauge",
        "1 while the peer heartbeats.",
        per_peer(&|p| f64::from(u8::from(p.alive))),
    );
    metric(
        "peer_weight",
        "gauge",
        "The peer's aggregation weight.",
        per_peer(&|p| f64::from(p.weight)),
    );
    metric(
        "updates_accepted_total",
        "counter",
        "Updates accepted per peer.",
        per_peer(&|p| f64::from(p.updates_accepted)),
    );
    metric(
        "updates_rejected_total",
        "counter",
        "Updates refused per peer.",
        per_peer(&|p| f64::from(p.updates_rejected)),
    );
    out
}

/// The persisted global state, inside `state_dir`.
const STATE_FILE: &str = "state.safetensors";

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("partial");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn mean(values: &[f32]) -> f32 {
    values.iter().sum::<f32>() / values.len().max(1) as f32
}

/// NaN when the loss cannot be computed: a gauge, not a reason to stop the run.
fn validation_loss(model: &Llama, batch: &Batch) -> f32 {
    model.batch_loss(batch).unwrap_or(f32::NAN)
}

fn chunks<T>(bytes: &[u8], wrap: impl Fn(Vec<u8>) -> T) -> impl Iterator<Item = T> {
    bytes.chunks(CHUNK_BYTES).map(move |c| wrap(c.to_vec()))
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl proto::exchange_server::Exchange for Exchange {
    async fn join(
        &self,
        req: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::JoinReply>, Status> {
        let peer = self.peer(&req)?;
        self.check_fingerprint(&req.get_ref().config_fingerprint)?;
        tracing::info!(%peer, "peer joined");
        Ok(Response::new(proto::JoinReply {
            peer: peer.to_string(),
            open_round: self.state().open.0,
            rounds: self.rounds().0,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        self.peer(&req)?;
        Ok(Response::new(proto::HeartbeatReply {
            open_round: self.state().open.0,
        }))
    }

    async fn put_update(
        &self,
        req: Request<Streaming<proto::UpdateChunk>>,
    ) -> Result<Response<proto::PutUpdateReply>, Status> {
        let peer = self.peer(&req)?;
        match self.receive_update(peer, req.into_inner()).await {
            Ok(reply) => Ok(Response::new(reply)),
            Err(refusal) => {
                if refusal.reason != Reason::RoundClosed {
                    self.record_rejection(peer, &refusal);
                }
                Err(refusal.into())
            }
        }
    }

    type FetchRoundStream = ResponseStream<proto::RoundChunk>;

    async fn fetch_round(
        &self,
        req: Request<proto::FetchRoundRequest>,
    ) -> Result<Response<Self::FetchRoundStream>, Status> {
        use proto::round_chunk::Item;
        self.peer(&req)?;
        let round = Round(req.get_ref().round);
        if round >= self.rounds() {
            return Err(
                Refusal::new(Reason::RunDone, format!("the run has no round {round}")).into(),
            );
        }
        let mut open = self.shared.open_tx.subscribe();
        let current = *open.borrow();
        if round > current {
            return Err(Refusal::new(
                Reason::Resync,
                format!("round {round} is not open yet (the exchange is at round {current})"),
            )
            .into());
        }
        // Wait for the round to close; a dropped connection cancels the wait.
        open.wait_for(|open| *open > round)
            .await
            .map_err(|_| Status::unavailable("the exchange is shutting down"))?;
        let mut state = self.state();
        let Some(closed) = state.closed.iter().find(|c| c.round == round) else {
            return Err(Refusal::new(
                Reason::Resync,
                format!("round {round} is no longer kept; fetch the state"),
            )
            .into());
        };
        let mut out = vec![proto::RoundChunk {
            item: Some(Item::Round(proto::RoundHeader {
                round: round.0,
                updates: closed.entries.len() as u32,
            })),
        }];
        let mut sent = 0u64;
        for (peer, weight, bytes) in &closed.entries {
            out.push(proto::RoundChunk {
                item: Some(Item::Entry(proto::EntryHeader {
                    peer: peer.to_string(),
                    weight: *weight,
                    size: bytes.len() as u64,
                })),
            });
            out.extend(chunks(bytes, |d| proto::RoundChunk {
                item: Some(Item::Data(d)),
            }));
            sent += bytes.len() as u64;
        }
        state.bytes_sent += sent;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            out.into_iter().map(Ok),
        ))))
    }

    type FetchStateStream = ResponseStream<proto::StateChunk>;

    async fn fetch_state(
        &self,
        req: Request<proto::FetchStateRequest>,
    ) -> Result<Response<Self::FetchStateStream>, Status> {
        use proto::state_chunk::Item;
        let peer = self.peer(&req)?;
        let (round, bytes) = {
            let mut state = self.state();
            state.bytes_sent += state.state_bytes.len() as u64;
            (state.open, state.state_bytes.clone())
        };
        tracing::info!(%peer, round = round.0, bytes = bytes.len(), "peer fetched the state");
        let header = proto::StateChunk {
            item: Some(Item::Header(proto::StateHeader {
                round: round.0,
                size: bytes.len() as u64,
            })),
        };
        let out: Vec<_> = std::iter::once(header)
            .chain(chunks(&bytes, |d| proto::StateChunk {
                item: Some(Item::Data(d)),
            }))
            .map(Ok)
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(out))))
    }

    async fn set_weights(
        &self,
        req: Request<proto::SetWeightsRequest>,
    ) -> Result<Response<proto::SetWeightsReply>, Status> {
        Self::operator(&req)?;
        let mut parsed = HashMap::new();
        for (peer, weight) in &req.get_ref().weights {
            let peer: PeerId = peer
                .parse()
                .map_err(|e: String| Refusal::new(Reason::BadRequest, e))?;
            if !(weight.is_finite() && *weight >= 0.0) {
                return Err(Refusal::new(
                    Reason::BadRequest,
                    format!("weight of {peer} must be finite and non-negative, not {weight}"),
                )
                .into());
            }
            parsed.insert(peer, *weight);
        }
        self.state().weights.extend(parsed);
        Ok(Response::new(proto::SetWeightsReply {}))
    }

    async fn get_run_state(
        &self,
        req: Request<proto::RunStateRequest>,
    ) -> Result<Response<proto::RunState>, Status> {
        Self::operator(&req)?;
        Ok(Response::new(self.run_state()))
    }
}
