//! The exchange service.
//!
//! It holds the run's global state itself — the model and the outer loop, advanced by
//! every closed round with the same code the peers run — so it never has to trust a peer
//! for the state it hands to a late or returning one, and it can write the run's
//! checkpoints. A round closes when every live peer has submitted (and at least
//! `min_peers` have), or `deadline` after its first update; its state is applied and
//! persisted *before* any peer sees the result, so a restarted exchange resumes exactly
//! where the peers are.
//!
//! By role: [`auth`] checks bearer tokens, [`round`] decides when a round closes and
//! closes it, [`persist`] keeps the state and checkpoints on disk, [`metrics`] reports
//! the run, [`checkpoints`] serves checkpoints to the run's publisher, and [`service`]
//! answers the gRPC calls.

mod auth;
mod checkpoints;
mod fetch;
mod ledger;
mod metrics;
mod payloads;
mod persist;
mod resume;
mod round;
mod service;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tonic::{Request, Response, Status};

use super::proto::{self, exchange_server::ExchangeServer};
use super::storage::{Storage, StorageSource};
use super::{Identity, MAX_MESSAGE_BYTES, PeerId, Reason, Refusal, Settings, Tokens, pacing};
use crate::data::Batch;
use crate::model::{InnerOptimizer, Llama};
use crate::outer::{Aggregator, Download, Outer, Round};
use crate::run::{Algorithm, Run};

pub use auth::Authenticate;
pub use metrics::prometheus;
use round::{Closed, RoundState, Submission};

/// How the exchange runs a run.
#[derive(Clone, Debug)]
pub struct ExchangeOptions {
    pub tokens: Tokens,
    /// The run's length, quorum, deadline and checkpoint interval; `None` admits no peer
    /// until the operator sends them (`Configure`). Settings saved in `state_dir` win
    /// over these: they are the operator's latest.
    pub settings: Option<Settings>,
    /// A peer not heard from for this long is not waited for.
    pub liveness: Duration,
    /// Largest update accepted; by default the dense fp32 size of the model plus 64 KiB
    /// for the container's names and shapes (dense DiLoCo and DDP updates fit).
    pub max_update_bytes: Option<u64>,
    /// Closed rounds kept for fetching, at most (see `round::keep`); older ones are
    /// served as a state instead.
    pub keep_rounds: usize,
    /// Where the global state is persisted after every round (and resumed from), when
    /// `storage` is not set.
    pub state_dir: Option<PathBuf>,
    /// Object storage for the global state and the rounds' payloads: peers put and get
    /// payloads there with URLs the exchange signs.
    pub storage: Option<StorageSource>,
    /// Where checkpoints go: `<dir>/round-<NNNNNN>/` in the Hugging Face layout.
    pub checkpoint_dir: Option<PathBuf>,
    /// Held-out sequences the validation loss is measured on after every round.
    pub eval_rows: u32,
    pub run_name: String,
    /// Certificate chain and key (PEM) to serve TLS with; plain HTTP/2 when `None`.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
}

/// The gRPC service type, ready to be served.
pub type Service =
    tonic::service::interceptor::InterceptedService<ExchangeServer<Exchange>, Authenticate>;

#[derive(Clone)]
pub struct Exchange {
    shared: Arc<Shared>,
}

struct Shared {
    run: Run,
    opts: ExchangeOptions,
    /// Where the state is kept (`storage`, or a directory: `state_dir`); `None` also
    /// while a bucket cannot be used yet.
    store: RwLock<Option<Storage>>,
    state: Mutex<State>,
    global: Mutex<Global>,
    /// The open round; bumped when a round closes, waking fetchers.
    open_tx: watch::Sender<Round>,
    /// Wakes the task that closes rounds: an update arrived, a peer appeared, or the
    /// exchange is going away.
    wake: Arc<Notify>,
    /// Set when a closed round could not be applied; `serve` stops with it.
    failed: watch::Sender<Option<Failure>>,
    max_update: u64,
    dense_bytes: u64,
    /// Tensors of the run's model: a probe has two values for each.
    tensors: usize,
}

/// A round's span, a root: a round is a trace of its own.
fn round_span(run: &str, round: Round) -> tracing::Span {
    tracing::info_span!(parent: None, "round", run, round = round.0)
}

impl Exchange {
    /// Names the open round's span on a reply, so the caller's work on it joins its trace.
    fn name_round<T>(&self, mut reply: Response<T>) -> Response<T> {
        let (round, span) = {
            let state = self.state();
            (state.open, state.round_span.clone())
        };
        crate::trace::inject(&span, reply.metadata_mut());
        let round = tonic::metadata::MetadataValue::from(round.0);
        (reply.metadata_mut()).insert(crate::trace::ROUND_METADATA, round);
        reply
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets the closing task see that the exchange is gone and end.
        self.wake.notify_one();
    }
}

impl Global {
    /// The run's initial model and outer loop.
    fn new(run: &Run, opts: &ExchangeOptions) -> Result<Self, ExchangeError> {
        let init = |e: &dyn std::fmt::Display| ExchangeError::Init(e.to_string());
        let model = run.initial_model().map_err(|e| init(&e))?;
        let outer = Outer::new(&run.config, &model).map_err(|e| init(&e))?;
        // DDP's schedule is set from the settings before every step.
        let inner = match run.config.algorithm {
            Algorithm::Ddp => Some(
                InnerOptimizer::new(&model, run.config.adamw(), run.config.schedule(Round(1)))
                    .map_err(|e| init(&e))?,
            ),
            _ => None,
        };
        let validation = run.validation_batch(opts.eval_rows).map_err(|e| init(&e))?;
        let aggregator = match run.config.download {
            Download::Aggregate => {
                Some(Aggregator::new(&run.config, &model).map_err(|e| init(&e))?)
            }
            Download::Gather | Download::All => None,
        };
        Ok(Self {
            model,
            outer,
            inner,
            aggregator,
            validation,
        })
    }
}

struct Global {
    model: Llama,
    outer: Outer,
    /// Only DDP needs an optimiser here: its rounds are AdamW steps.
    inner: Option<InnerOptimizer>,
    /// Makes each round's aggregate under `--download aggregate`.
    aggregator: Option<Aggregator>,
    validation: Batch,
}

struct State {
    open: Round,
    /// `open`'s span: the root of the round's trace, which every peer's work on the round
    /// joins (replies name it). Replaced, and so ended, when the round closes.
    round_span: tracing::Span,
    /// `None` until the operator has configured an exchange that awaits it.
    settings: Option<Settings>,
    round_state: RoundState,
    submissions: BTreeMap<PeerId, Submission>,
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
    /// What the publisher reported, by round.
    publications: BTreeMap<u32, proto::Publication>,
    /// The scoring ledger and the measurements awaiting it.
    ledger: ledger::Ledger,
    /// Each evaluator's latest measurements: their round and how long after its close
    /// they came.
    evaluators: BTreeMap<String, proto::EvaluatorState>,
    /// When recent rounds' updates arrived: what paces the open round.
    pacing: pacing::History<PeerId>,
    /// Why the exchange's bucket cannot be used yet; `None` once it can.
    storage_error: Option<String>,
}

impl State {
    fn new(
        (open, round_span): (Round, tracing::Span),
        settings: Option<Settings>,
        state_bytes: Vec<u8>,
        initial_validation_loss: f32,
    ) -> Self {
        Self {
            open,
            round_span,
            settings,
            round_state: RoundState::Open,
            submissions: BTreeMap::new(),
            closed: VecDeque::new(),
            summaries: VecDeque::new(),
            peers: BTreeMap::new(),
            weights: HashMap::new(),
            state_bytes: Arc::new(state_bytes),
            bytes_received: 0,
            bytes_sent: 0,
            tokens: 0,
            initial_validation_loss,
            publications: BTreeMap::new(),
            ledger: ledger::Ledger::default(),
            evaluators: BTreeMap::new(),
            pacing: pacing::History::default(),
            storage_error: None,
        }
    }

    /// The settings in force, or the refusal a peer gets while there are none yet (not a
    /// [`Refusal`]: peers retry it as they retry an exchange that is not up).
    fn settings(&self) -> Result<Settings, Status> {
        self.settings.ok_or_else(|| {
            Status::unavailable("the exchange is waiting for the run's settings from the operator")
        })
    }

    /// Whether every round of the run has closed; never while unconfigured.
    fn done(&self) -> bool {
        self.settings.is_some_and(|s| self.open.0 >= s.rounds)
    }
}

/// Who may follow the rounds.
#[derive(Clone, Copy, Debug)]
enum Follower {
    Peer(PeerId),
    Evaluator(u32),
}

impl std::fmt::Display for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Peer(p) => p.fmt(f),
            Self::Evaluator(e) => f.write_str(&super::evaluator_name(*e)),
        }
    }
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

/// A closed round whose result could not be applied to the global state.
#[derive(Clone, Debug)]
struct Failure {
    round: Round,
    message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("initialising the global state: {0}")]
    Init(String),
    #[error("resuming from {from}: {message}")]
    Resume { from: String, message: String },
}

/// Why [`Exchange::serve`] stopped before its shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// Every update was checked on arrival, so this is a bug or a full disk; the exchange
    /// stops rather than serve a state the peers do not have.
    #[error("could not advance the global state past round {round}: {message}")]
    Advance { round: u32, message: String },
}

impl Exchange {
    /// Sets up the run's global state, resuming from `state_dir` when it holds one.
    pub fn new(run: Run, opts: ExchangeOptions) -> Result<Self, ExchangeError> {
        let init = |e: &dyn std::fmt::Display| ExchangeError::Init(e.to_string());
        let mut global = Global::new(&run, &opts)?;
        let initial_validation_loss = validation_loss(&global.model, &global.validation);
        let (mut store, mut waiting) = match resume::open(&opts)? {
            resume::Opened::Nothing => (None, None),
            resume::Opened::Ready(store) => (Some(store), None),
            resume::Opened::Waiting(why) => (None, Some(why)),
        };
        let fresh = || resume::Resumed {
            open: Round(0),
            settings: None,
            ledger: ledger::Ledger::default(),
        };
        let resumed = match store.as_ref().map(|s| resume::resume(s, &mut global)) {
            Some(Ok(resumed)) => resumed,
            // A bucket that failed while read is tried again, as one that failed its check.
            Some(Err(e)) if opts.storage.is_some() => {
                tracing::warn!(error = %e, "could not resume from storage yet; retrying");
                (store, waiting) = (None, Some(e.to_string()));
                fresh()
            }
            Some(Err(e)) => return Err(e),
            None => fresh(),
        };
        let open = resumed.open;
        let settings = resumed.settings.or(opts.settings);
        let state_bytes = (global.outer.export(&global.model, open)).map_err(|e| init(&e))?;
        let dense_bytes = 4 * global.model.parameter_count() as u64;
        let tensors = global.model.params().len();
        let max_update = opts.max_update_bytes.unwrap_or(dense_bytes + 64 * 1024);
        let opened = (open, round_span(&opts.run_name, open));
        let mut state = State::new(opened, settings, state_bytes, initial_validation_loss);
        state.ledger = resumed.ledger;
        state.storage_error = waiting;
        Ok(Self {
            shared: Arc::new(Shared {
                run,
                opts,
                store: RwLock::new(store),
                state: Mutex::new(state),
                global: Mutex::new(global),
                open_tx: watch::channel(open).0,
                wake: Arc::new(Notify::new()),
                failed: watch::channel(None).0,
                max_update,
                dense_bytes,
                tensors,
            }),
        })
    }

    /// The service with its bearer-token check in front, and a task that closes rounds
    /// when they are due (it stops when the service is dropped).
    pub fn into_service(self) -> Service {
        tokio::spawn(round::close_rounds(
            Arc::downgrade(&self.shared),
            self.shared.wake.clone(),
        ));
        let (waiting, open) = {
            let state = self.state();
            (state.storage_error.is_some(), state.open)
        };
        match waiting {
            true => drop(tokio::spawn(resume::await_storage(Arc::downgrade(
                &self.shared,
            )))),
            false => self.forget_rounds_before(open),
        }
        let check = Authenticate(self.shared.opts.tokens.clone());
        let server = ExchangeServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        tonic::service::interceptor::InterceptedService::new(server, check)
    }

    /// The exchange's Prometheus metrics, in the text format
    /// ([`crate::roles::metrics::PROMETHEUS_TEXT`]).
    pub fn metrics_text(&self) -> String {
        prometheus(&self.run_state())
    }

    /// Serves the exchange on `listener` until `shutdown` completes: gRPC, and
    /// checkpoints for the publisher under `/checkpoints/`.
    /// Returns early with [`ServeError::Advance`] when a closed round cannot be applied.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let mut server = tonic::transport::Server::builder();
        if let Some((cert, key)) = &self.shared.opts.tls {
            let identity = tonic::transport::Identity::from_pem(cert, key);
            server =
                server.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
        }
        let mut failed = self.shared.failed.subscribe();
        let http = checkpoints::routes(self.clone());
        let routes = tonic::service::Routes::from(http).add_service(self.into_service());
        let serving = server.accept_http1(true).add_routes(routes);
        let serving = serving.serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        );
        tokio::select! {
            served = serving => Ok(served?),
            // Not a graceful shutdown: peers waiting for the round must not be held up
            // by an exchange that cannot close it.
            Ok(failure) = failed.wait_for(Option::is_some) => {
                let Failure { round, message } = failure.clone().expect("waited for it");
                Err(ServeError::Advance { round: round.0, message })
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The calling peer, seen now; refuses the operator's token, and every peer while
    /// the exchange waits for its storage.
    fn peer<T>(&self, req: &Request<T>) -> Result<PeerId, Status> {
        self.usable()?;
        match req.extensions().get::<Identity>() {
            Some(Identity::Peer(p)) => {
                let p = *p;
                let mut state = self.state();
                let new = !state.peers.contains_key(&p);
                state
                    .peers
                    .entry(p)
                    .or_insert_with(PeerRecord::new)
                    .last_seen = Instant::now();
                drop(state);
                if new {
                    // One more live peer to wait for: the round's wake-up time may change.
                    self.shared.wake.notify_one();
                }
                Ok(p)
            }
            _ => Err(Refusal::new(Reason::Forbidden, "only peers may call this").into()),
        }
    }

    /// The calling peer or evaluator: those who follow the rounds.
    fn follower<T>(&self, req: &Request<T>) -> Result<Follower, Status> {
        match req.extensions().get::<Identity>() {
            Some(Identity::Evaluator(e)) => self.usable().map(|()| Follower::Evaluator(*e)),
            Some(Identity::Peer(_)) => self.peer(req).map(Follower::Peer),
            _ => Err(
                Refusal::new(Reason::Forbidden, "only peers and evaluators may call this").into(),
            ),
        }
    }

    /// Where the state is kept now.
    fn store(&self) -> Option<Storage> {
        (self.shared.store.read().unwrap_or_else(|p| p.into_inner())).clone()
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

    fn record_rejection(&self, peer: PeerId, refusal: &Refusal) {
        let mut state = self.state();
        let record = state.peers.entry(peer).or_insert_with(PeerRecord::new);
        record.rejected += 1;
        record.last_rejection = refusal.to_string();
        tracing::warn!(%peer, %refusal, "refused an update");
    }
}

fn mean(values: &[f32]) -> f32 {
    values.iter().sum::<f32>() / values.len().max(1) as f32
}

/// NaN when the loss cannot be computed: a gauge, not a reason to stop the run.
fn validation_loss(model: &Llama, batch: &Batch) -> f32 {
    model.batch_loss(batch).unwrap_or(f32::NAN)
}
