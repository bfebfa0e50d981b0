//! A closed round as the exchange sends it: to a peer its step (the aggregate, or the
//! updates it takes), to an evaluator every update with the roster and probes; each
//! payload streamed, or with a bucket, as a signed URL and the digest it must match.

use std::sync::Arc;

use tonic::{Response, Status};

use super::payloads::{accepted_key, aggregate_key};
use super::service::{ResponseStream, chunks};
use super::{Exchange, Follower, PeerId, Reason, Refusal, proto};
use crate::outer::{Download, Round};

/// Payloads a round's stream leaves to storage: their index in the stream and their key.
type StoredAt = Vec<(usize, String)>;

/// A piece of a round's stream: a message, or a payload that becomes data messages only
/// as the stream is read (see [`chunks`]).
pub(super) enum Part {
    Message(proto::RoundChunk),
    Payload(Arc<Vec<u8>>),
}

impl Part {
    /// The messages it stands for, made as they are read.
    fn messages(self) -> Box<dyn Iterator<Item = proto::RoundChunk> + Send> {
        use proto::round_chunk::Item;
        match self {
            Part::Message(m) => Box::new(std::iter::once(m)),
            Part::Payload(bytes) => Box::new(chunks(bytes, |d| proto::RoundChunk {
                item: Some(Item::Data(d)),
            })),
        }
    }
}

/// A round's stream as it is built: its parts, the payloads it leaves to storage, and
/// the bytes the exchange sends itself.
#[derive(Default)]
struct Building {
    out: Vec<Part>,
    keys: StoredAt,
    sent: u64,
}

impl Building {
    fn message(&mut self, item: proto::round_chunk::Item) {
        self.out
            .push(Part::Message(proto::RoundChunk { item: Some(item) }));
    }

    /// A payload's header, then its bytes; or, when it is in storage at `key`, nothing
    /// more: the fetcher gets a URL instead.
    fn payload(
        &mut self,
        header: proto::round_chunk::Item,
        bytes: &Arc<Vec<u8>>,
        key: Option<String>,
    ) {
        self.message(header);
        match key {
            Some(key) => self.keys.push((self.out.len() - 1, key)),
            None => {
                self.out.push(Part::Payload(bytes.clone()));
                self.sent += bytes.len() as u64;
            }
        }
    }
}

impl Exchange {
    /// The closed `round` as a stream: its header, then its step (the aggregate, or the
    /// updates it takes) with their bytes. An evaluator gets every accepted update, and
    /// also the roster and every peer's probe. A payload in storage goes as its header
    /// alone, with its digest; its storage key is returned with its index in the
    /// stream, for a signed URL (unless `inline`).
    fn round_chunks(
        &self,
        round: Round,
        evaluator: bool,
        inline: bool,
    ) -> Result<(Vec<Part>, StoredAt), Status> {
        use proto::round_chunk::Item;
        let download = self.shared.run.config.download;
        let mut state = self.state();
        let Some(closed) = state.closed.iter().find(|c| c.round == round) else {
            return Err(Refusal::new(
                Reason::Resync,
                format!("round {round} is no longer kept; fetch the state"),
            )
            .into());
        };
        let entries: Vec<_> = match (evaluator, download) {
            (true, _) | (false, Download::All) => closed.entries.iter().collect(),
            (false, Download::Gather) => closed.in_step().collect(),
            (false, Download::Aggregate) => vec![],
        };
        let header = proto::RoundHeader {
            round: round.0,
            updates: entries.len() as u32,
            rounds: closed.rounds.0,
            roster: match evaluator {
                true => (closed.scoring.roster.iter())
                    .map(PeerId::to_string)
                    .collect(),
                false => vec![],
            },
        };
        let mut b = Building::default();
        b.message(Item::Round(header));
        let stored = closed.stored.as_ref().filter(|_| !inline);
        if let Some(bytes) = &closed.aggregate {
            let sha256 = stored.and_then(|s| s.aggregate);
            let header = Item::Aggregate(proto::AggregateHeader {
                size: bytes.len() as u64,
                url: String::new(),
                sha256: sha256.map(|d| d.to_vec()).unwrap_or_default(),
            });
            b.payload(header, bytes, sha256.map(|_| aggregate_key(round)));
        }
        for (peer, weight, bytes) in entries {
            let sha256 = stored.and_then(|s| s.updates.get(peer).copied());
            let header = Item::Entry(proto::EntryHeader {
                peer: peer.to_string(),
                weight: *weight,
                size: bytes.len() as u64,
                probe: match evaluator {
                    true => closed.scoring.probes.get(peer).cloned().unwrap_or_default(),
                    false => vec![],
                },
                left_out: closed.left_out.contains(peer),
                url: String::new(),
                sha256: sha256.map(|d| d.to_vec()).unwrap_or_default(),
            });
            b.payload(header, bytes, sha256.map(|_| accepted_key(round, *peer)));
        }
        state.bytes_sent += b.sent;
        Ok((b.out, b.keys))
    }
}

impl Exchange {
    /// `round`'s updates for `follower`, once the round has closed; refused for a round
    /// the run does not have or has not opened yet.
    pub(super) async fn answer_fetch(
        &self,
        follower: Follower,
        round: Round,
        inline: bool,
    ) -> Result<Response<ResponseStream<proto::RoundChunk>>, Status> {
        if round.0 >= self.state().settings()?.rounds {
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
        let evaluator = matches!(follower, Follower::Evaluator(_));
        let (mut out, keys) = self.round_chunks(round, evaluator, inline)?;
        self.sign_downloads(&mut out, keys).await?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            out.into_iter().flat_map(Part::messages).map(Ok),
        ))))
    }
}
