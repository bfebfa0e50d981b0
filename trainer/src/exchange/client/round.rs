//! A closed round as the exchange streams it to a peer or an evaluator, and the step
//! every replica takes with it.

use tokio_stream::StreamExt;
use tonic::Status;

use std::time::Duration;

use super::{ExchangeClient, Pacer};
use crate::exchange::{PeerId, proto};
use crate::outer::{Round, Step};

/// A closed round as a peer sees it.
pub struct RoundResult {
    /// The accepted updates, in peer order: those the round's step takes (all of them,
    /// or at most the run's gather limit), or for an evaluator every one.
    pub entries: Vec<Entry>,
    /// The round's step as one object, when the run downloads aggregates.
    pub aggregate: Option<Vec<u8>>,
    /// The run's length when the round closed (it may change while the run goes on).
    pub rounds: Round,
    /// Bytes of this peer's update the exchange accepted; `None` if it was not counted.
    pub accepted_bytes: Option<u64>,
    /// Every peer the exchange knew when the round closed (evaluators only).
    pub roster: Vec<PeerId>,
    /// Where the exchange's part of the round went.
    pub times: ExchangeTimes,
}

/// Where a peer's time with the exchange went in one round: sending its update, waiting
/// for the round to close, and downloading the round's updates (retries included).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExchangeTimes {
    pub upload: Duration,
    pub wait: Duration,
    pub fetch: Duration,
}

/// One accepted update of a closed round.
pub struct Entry {
    pub peer: PeerId,
    pub weight: f32,
    pub bytes: Vec<u8>,
    /// The peer's θ at the probe positions (evaluators only).
    pub probe: Vec<f32>,
    /// Accepted but not in the round's step (evaluators only see such entries).
    pub left_out: bool,
}

impl RoundResult {
    /// The updates the round's step takes, with their weights, in peer order.
    pub fn updates(&self) -> Vec<(&[u8], f32)> {
        (self.entries.iter())
            .filter(|e| !e.left_out)
            .map(|e| (e.bytes.as_slice(), e.weight))
            .collect()
    }

    /// Bytes of updates and aggregate this round brought.
    pub fn downloaded_bytes(&self) -> u64 {
        let updates: usize = self.entries.iter().map(|e| e.bytes.len()).sum();
        (updates + self.aggregate.as_ref().map_or(0, Vec::len)) as u64
    }

    /// The round's step, given [`Self::updates`]: the aggregate when the round has one.
    pub fn step<'a>(&'a self, updates: &'a [(&'a [u8], f32)]) -> Step<'a> {
        Step::of(self.aggregate.as_deref(), updates)
    }
}

impl ExchangeClient {
    /// A payload's bytes: downloaded from storage when the exchange gave a URL, else
    /// empty, to be filled by the data that follows its header.
    async fn payload(&self, url: &str, size: u64, sha256: &[u8]) -> Result<Vec<u8>, Status> {
        if url.is_empty() {
            return Ok(Vec::with_capacity(size as usize));
        }
        super::direct::get(&self.http, url, size, sha256, self.opts.bandwidth_mbps).await
    }

    /// The rest of a round's stream, from its `first` message.
    pub(super) async fn read_round(
        &self,
        round: Round,
        first: Option<Result<proto::RoundChunk, Status>>,
        stream: &mut tonic::Streaming<proto::RoundChunk>,
    ) -> Result<RoundResult, Status> {
        use proto::round_chunk::Item;
        let mut pacer = Pacer::new(self.opts.bandwidth_mbps);
        let mut entries: Vec<Entry> = Vec::new();
        let mut aggregate = None;
        let mut expected = None;
        let mut roster = vec![];
        let mut next = first;
        while let Some(chunk) = next {
            match chunk?.item {
                Some(Item::Round(h)) if h.round == round.0 => {
                    expected = Some((h.updates, Round(h.rounds)));
                    roster = (h.roster.iter())
                        .map(|p| p.parse().map_err(|e: String| Status::internal(e)))
                        .collect::<Result<_, _>>()?;
                }
                Some(Item::Aggregate(a)) if entries.is_empty() && aggregate.is_none() => {
                    aggregate = Some(self.payload(&a.url, a.size, &a.sha256).await?);
                }
                Some(Item::Entry(e)) => entries.push(Entry {
                    peer: e.peer.parse().map_err(|e: String| Status::internal(e))?,
                    weight: e.weight,
                    bytes: self.payload(&e.url, e.size, &e.sha256).await?,
                    probe: e.probe,
                    left_out: e.left_out,
                }),
                Some(Item::Data(d)) => {
                    pacer.pace(d.len()).await;
                    let into = match (entries.last_mut(), aggregate.as_mut()) {
                        (Some(entry), _) => &mut entry.bytes,
                        (None, Some(aggregate)) => aggregate,
                        (None, None) => return Err(Status::internal("data before any entry")),
                    };
                    into.extend_from_slice(&d);
                }
                _ => return Err(Status::internal("malformed round stream")),
            }
            next = stream.next().await;
        }
        match expected {
            Some((n, rounds)) if n as usize == entries.len() => Ok(RoundResult {
                entries,
                aggregate,
                rounds,
                accepted_bytes: None,
                roster,
                times: ExchangeTimes::default(),
            }),
            _ => Err(Status::unavailable("the round stream ended early")),
        }
    }
}
