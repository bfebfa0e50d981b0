//! The gRPC calls: joining, heartbeats, submitting an update, fetching a closed round or
//! the global state, and the operator's weights, settings and run state.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::payloads::UpdateError;
use super::round::{RoundState, Submission};
use super::{
    Exchange, Follower, Identity, PeerId, PeerRecord, Reason, Refusal, Settings, persist, proto,
};
use crate::codec::CodecError;
use crate::exchange::CHUNK_BYTES;
use crate::outer::{Round, RoundError};

pub(super) type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn bad(message: &str) -> Refusal {
    Refusal::new(Reason::BadRequest, message)
}

/// `bytes` as data messages of at most [`CHUNK_BYTES`], each copied out only when the
/// stream is read. A reply stream is read as fast as the connection takes it, so every
/// fetcher of a dense round holds the chunks in flight, not a copy of the round.
pub(super) fn chunks<T>(
    bytes: Arc<Vec<u8>>,
    wrap: impl Fn(Vec<u8>) -> T,
) -> impl Iterator<Item = T> {
    (0..bytes.len().div_ceil(CHUNK_BYTES)).map(move |i| {
        let start = i * CHUNK_BYTES;
        wrap(bytes[start..(start + CHUNK_BYTES).min(bytes.len())].to_vec())
    })
}

/// The header every update starts with.
async fn read_header(
    stream: &mut Streaming<proto::UpdateChunk>,
) -> Result<proto::UpdateHeader, Refusal> {
    use proto::update_chunk::Item;
    match stream.next().await {
        Some(Ok(proto::UpdateChunk {
            item: Some(Item::Header(h)),
        })) => Ok(h),
        Some(Err(status)) => Err(bad(&format!("reading the update: {status}"))),
        _ => Err(bad("an update must start with its header")),
    }
}

/// A peer's update the exchange holds already for a round.
type Held = Arc<Vec<u8>>;

/// The update's bytes after its header: exactly the `size` announced.
async fn read_body(
    stream: &mut Streaming<proto::UpdateChunk>,
    size: u64,
) -> Result<Vec<u8>, Refusal> {
    use proto::update_chunk::Item;
    let mut bytes = Vec::with_capacity(size as usize);
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(proto::UpdateChunk {
                item: Some(Item::Data(d)),
            }) => {
                if (bytes.len() + d.len()) as u64 > size {
                    return Err(Refusal::new(
                        Reason::TooLarge,
                        format!("the update is longer than the {size} bytes announced"),
                    ));
                }
                bytes.extend_from_slice(&d);
            }
            Ok(_) => return Err(bad("only data may follow the header")),
            Err(status) => return Err(bad(&format!("reading the update: {status}"))),
        }
    }
    if bytes.len() as u64 != size {
        return Err(bad(&format!(
            "the update ended after {} of the {size} bytes announced",
            bytes.len(),
        )));
    }
    Ok(bytes)
}

impl Exchange {
    async fn receive_update(
        &self,
        peer: PeerId,
        mut stream: Streaming<proto::UpdateChunk>,
    ) -> Result<proto::PutUpdateReply, UpdateError> {
        let header = read_header(&mut stream).await?;
        self.check_fingerprint(&header.config_fingerprint)?;
        let round = Round(header.round);
        let held = self.check_round(peer, round)?;
        let limit = self.shared.max_update;
        if header.size > limit {
            return Err(Refusal::new(
                Reason::TooLarge,
                format!(
                    "an update of {} bytes exceeds the limit of {limit}",
                    header.size
                ),
            )
            .into());
        }
        self.check_probe(&header.probe)?;
        let bytes = match (header.stored, self.payloads().is_some()) {
            (true, _) => self.read_stored(peer, round, header.size).await?,
            (false, false) => read_body(&mut stream, header.size).await?,
            // Fetchers get every update of the round from the bucket.
            (false, true) => {
                let message = "this exchange takes updates through its storage: PUT the \
                               update to the URL UploadUrl gives, then send its header";
                return Err(bad(message).into());
            }
        };
        if let Some(held) = held {
            // A retry after a lost reply: the same bytes are fine, other bytes are not.
            if *held != bytes {
                return Err(bad(&format!(
                    "{peer} already submitted a different update for round {round}"
                ))
                .into());
            }
            return Ok(proto::PutUpdateReply {
                round: round.0,
                accepted_bytes: header.size,
            });
        }
        let bytes = self.check_decodes(bytes).await?;
        let accepted_bytes = bytes.len() as u64;
        let submission = Submission {
            bytes: Arc::new(bytes),
            train_loss: header.train_loss,
            probe: header.probe,
        };
        self.accept(peer, round, submission)?;
        self.shared.wake.notify_one();
        Ok(proto::PutUpdateReply {
            round: round.0,
            accepted_bytes,
        })
    }

    /// Decodes the update fully against the global model: a corrupt update must never
    /// reach a peer.
    async fn check_decodes(&self, bytes: Vec<u8>) -> Result<Vec<u8>, Refusal> {
        let this = self.clone();
        let (bytes, checked) = tokio::task::spawn_blocking(move || {
            let global = this.shared.global.lock().unwrap_or_else(|p| p.into_inner());
            let checked = global.outer.check(&global.model, &bytes);
            (bytes, checked)
        })
        .await
        .map_err(|e| bad(&e.to_string()))?;
        checked.map_err(|e| {
            let reason = match e {
                // A valid update for another run configuration, not a damaged one.
                RoundError::Codec(CodecError::ConfigMismatch { .. }) => Reason::ConfigMismatch,
                _ => Reason::CorruptUpdate,
            };
            Refusal::new(reason, e.to_string())
        })?;
        Ok(bytes)
    }

    /// Adds a checked update to the open round, which starts its deadline if it is the
    /// round's first.
    fn accept(&self, peer: PeerId, round: Round, submission: Submission) -> Result<(), Refusal> {
        let mut state = self.state();
        if state.open != round || !state.round_state.accepts_updates() {
            state.record_late(peer, round);
            return Err(Refusal::new(
                Reason::RoundClosed,
                format!("round {round} closed while the update was arriving"),
            ));
        }
        if let Some(previous) = state.submissions.get(&peer) {
            if previous.bytes != submission.bytes {
                return Err(bad(&format!(
                    "{peer} already submitted a different update for round {round}"
                )));
            }
            return Ok(());
        }
        let accepted_bytes = submission.bytes.len() as u64;
        let train_loss = submission.train_loss;
        state.submissions.insert(peer, submission);
        let now = Instant::now();
        if state.round_state == RoundState::Open {
            state.round_state = RoundState::Collecting { first_at: now };
        }
        if let RoundState::Collecting { first_at } = state.round_state {
            (state.pacing).record(round.0, peer, now.saturating_duration_since(first_at));
        }
        state.bytes_received += accepted_bytes;
        let record = state.peers.entry(peer).or_insert_with(PeerRecord::new);
        record.accepted += 1;
        record.bytes += accepted_bytes;
        record.last_train_loss = train_loss;
        Ok(())
    }

    /// Whether `peer` may submit for `round` now; `Ok(Some(bytes))` when the exchange
    /// already holds its update for that round (a retry after a lost reply).
    pub(super) fn check_round(&self, peer: PeerId, round: Round) -> Result<Option<Held>, Refusal> {
        let mut state = self.state();
        if state.done() {
            return Err(Refusal::new(
                Reason::RunDone,
                format!("the run is done after {} rounds", state.open),
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
        let closed = state
            .closed
            .iter()
            .filter(|c| c.round == round)
            .flat_map(|c| c.entries.iter())
            .find(|(p, _, _)| *p == peer)
            .map(|(_, _, bytes)| bytes.clone());
        if closed.is_some() {
            return Ok(closed);
        }
        if round == state.open
            && let Some(bytes) = state.round_state.closing_with(peer)
        {
            return Ok(Some(bytes));
        }
        if round < state.open || !state.round_state.accepts_updates() {
            state.record_late(peer, round);
            return Err(Refusal::new(
                Reason::RoundClosed,
                format!(
                    "round {round} is closed; this update came too late and is not counted. \
                     Fetch the round's result and go on"
                ),
            ));
        }
        Ok(None)
    }

    /// A probe is empty or two finite values per tensor.
    fn check_probe(&self, probe: &[f32]) -> Result<(), Refusal> {
        let tensors = self.shared.tensors;
        if !(probe.is_empty() || probe.len() == 2 * tensors) {
            return Err(bad(&format!(
                "a probe of {} values; the run's model has {tensors} tensors, two each",
                probe.len()
            )));
        }
        if probe.iter().any(|v| !v.is_finite()) {
            return Err(bad("a probe value is not finite"));
        }
        Ok(())
    }
}
#[tonic::async_trait]
impl proto::exchange_server::Exchange for Exchange {
    async fn join(
        &self,
        req: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::JoinReply>, Status> {
        let peer = self.follower(&req)?;
        self.check_fingerprint(&req.get_ref().config_fingerprint)?;
        let (open, settings) = {
            let state = self.state();
            (state.open, state.settings()?)
        };
        tracing::info!(%peer, "peer joined");
        Ok(self.name_round(Response::new(proto::JoinReply {
            peer: peer.to_string(),
            open_round: open.0,
            rounds: settings.rounds,
        })))
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
        let span = tracing::info_span!("PutUpdate", %peer);
        crate::trace::follow(&span, req.metadata());
        match self
            .receive_update(peer, req.into_inner())
            .instrument(span)
            .await
        {
            Ok(reply) => Ok(Response::new(reply)),
            Err(UpdateError::Refused(refusal)) => {
                if refusal.reason != Reason::RoundClosed {
                    self.record_rejection(peer, &refusal);
                }
                Err(refusal.into())
            }
            Err(UpdateError::Storage(message)) => {
                tracing::warn!(%peer, error = %message, "could not read an update from storage");
                Err(Status::unavailable(format!(
                    "reading the update from storage: {message}"
                )))
            }
        }
    }

    async fn upload_url(
        &self,
        req: Request<proto::UploadUrlRequest>,
    ) -> Result<Response<proto::UploadUrlReply>, Status> {
        let peer = self.peer(&req)?;
        let round = Round(req.get_ref().round);
        let url = self.upload_url(peer, round).await;
        let url = url.inspect_err(|s| tracing::debug!(%peer, status = %s, "no upload URL"))?;
        Ok(Response::new(proto::UploadUrlReply { url }))
    }

    type FetchRoundStream = ResponseStream<proto::RoundChunk>;

    async fn fetch_round(
        &self,
        req: Request<proto::FetchRoundRequest>,
    ) -> Result<Response<Self::FetchRoundStream>, Status> {
        let follower = self.follower(&req)?;
        let round = Round(req.get_ref().round);
        let inline = req.get_ref().inline;
        let span = tracing::info_span!("FetchRound", %follower, round = round.0, inline);
        crate::trace::follow(&span, req.metadata());
        let reply = self.answer_fetch(follower, round, inline);
        let reply = reply.instrument(span).await?;
        Ok(self.name_round(reply))
    }

    type FetchStateStream = ResponseStream<proto::StateChunk>;

    async fn fetch_state(
        &self,
        req: Request<proto::FetchStateRequest>,
    ) -> Result<Response<Self::FetchStateStream>, Status> {
        use proto::state_chunk::Item;
        let peer = self.follower(&req)?;
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
        let out = std::iter::once(header)
            .chain(chunks(bytes, |d| proto::StateChunk {
                item: Some(Item::Data(d)),
            }))
            .map(Ok);
        Ok(Response::new(Box::pin(tokio_stream::iter(out))))
    }

    async fn set_weights(
        &self,
        req: Request<proto::SetWeightsRequest>,
    ) -> Result<Response<proto::SetWeightsReply>, Status> {
        Self::operator(&req)?;
        self.usable()?;
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
        let req = req.get_ref();
        let mut state = self.state();
        if !req.ledger_record.is_empty() {
            let store = self.store();
            (state.ledger)
                .append(&req.ledger_record, &req.ledger_public_key, store.as_ref())
                .inspect_err(|r| tracing::warn!(refusal = %r, "refused a ledger record"))?;
        }
        state.weights.extend(parsed);
        Ok(Response::new(proto::SetWeightsReply {}))
    }

    async fn put_measurements(
        &self,
        req: Request<proto::Measurements>,
    ) -> Result<Response<proto::PutMeasurementsReply>, Status> {
        let Some(Identity::Evaluator(e)) = req.extensions().get::<Identity>().copied() else {
            return Err(Refusal::new(Reason::Forbidden, "only evaluators may call this").into());
        };
        self.usable()?;
        let evaluator = Follower::Evaluator(e).to_string();
        let mut state = self.state();
        let open = state.open;
        match state.ledger.measured(&evaluator, open, req.get_ref()) {
            Ok(()) => {
                let round = req.get_ref().round;
                let closed = state.closed.iter().find(|c| c.round.0 == round);
                let seconds = closed.map_or(f64::NAN, |c| c.closed_at.elapsed().as_secs_f64());
                tracing::info!(%evaluator, round, seconds, "measurements received");
                let took = proto::EvaluatorState {
                    evaluator: evaluator.clone(),
                    round,
                    seconds,
                };
                state.evaluators.insert(evaluator, took);
                Ok(Response::new(proto::PutMeasurementsReply {}))
            }
            Err(refusal) => {
                tracing::warn!(%evaluator, %refusal, "refused measurements");
                Err(refusal.into())
            }
        }
    }

    async fn get_run_state(
        &self,
        req: Request<proto::RunStateRequest>,
    ) -> Result<Response<proto::RunState>, Status> {
        Self::operator(&req)?;
        Ok(Response::new(self.run_state()))
    }

    type WatchRunStateStream = ResponseStream<proto::RunState>;

    async fn watch_run_state(
        &self,
        req: Request<proto::RunStateRequest>,
    ) -> Result<Response<Self::WatchRunStateStream>, Status> {
        Self::operator(&req)?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(self.clone().watch_run_state(tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn configure(
        &self,
        req: Request<proto::Settings>,
    ) -> Result<Response<proto::Settings>, Status> {
        Self::operator(&req)?;
        self.usable()?;
        let settings = Settings::try_from(req.into_inner()).map_err(|e| bad(&e))?;
        Ok(Response::new(self.configure_settings(settings)?.into()))
    }
}

impl Exchange {
    /// Puts `settings` in force (saved first, so a restart keeps them) and wakes the task
    /// that closes rounds: the quorum or the deadline may have changed.
    fn configure_settings(&self, settings: Settings) -> Result<Settings, Status> {
        let mut state = self.state();
        if state.settings == Some(settings) {
            return Ok(settings);
        }
        // The round in progress always finishes: its updates may be on their way.
        let least = state.open.0 + 1;
        if settings.rounds < least && !state.done() {
            return Err(bad(&format!(
                "the run is at round {}: it can end after {least} rounds at the earliest, not {}",
                state.open, settings.rounds
            ))
            .into());
        }
        if let Some(store) = &self.store() {
            persist::save_settings(store, &settings)
                .map_err(|e| Status::internal(format!("saving the settings: {e}")))?;
        }
        tracing::info!(?settings, previous = ?state.settings, "settings changed");
        state.settings = Some(settings);
        drop(state);
        self.shared.wake.notify_one();
        Ok(settings)
    }
}
