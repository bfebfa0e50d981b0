//! The rounds' payloads on object storage.
//!
//! With a bucket, the exchange coordinates and the bucket carries the bytes: a peer PUTs
//! its update to a URL the exchange signed (`UploadUrl`), the exchange reads it back once
//! and checks it as any update before accepting it, and when the round closes it writes
//! the round's aggregate beside the updates. Fetchers then get signed GET URLs and the
//! SHA-256 of what the exchange accepted; a download that does not match (the object
//! changed in storage after acceptance) is refused by the fetcher, which asks for the
//! round through the exchange instead. A round's objects are deleted once the exchange no
//! longer keeps the round.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tonic::Status;

use super::fetch::Part;
use super::{Exchange, PeerId, Reason, Refusal, proto};
use crate::exchange::storage::Storage;
use crate::outer::Round;

/// A SHA-256 digest.
pub(super) type Sha256Digest = [u8; 32];

pub(super) fn digest(bytes: &[u8]) -> Sha256Digest {
    Sha256::digest(bytes).into()
}

/// How long a round's close waits for storage to take its aggregate.
const AGGREGATE_WRITE: std::time::Duration = std::time::Duration::from_secs(30);

/// Where a round's objects live.
fn round_prefix(round: Round) -> String {
    format!("rounds/{:06}", round.0)
}

/// Where `peer` puts its update for `round`.
pub(super) fn update_key(round: Round, peer: PeerId) -> String {
    format!("{}/{peer}", round_prefix(round))
}

/// Where the exchange keeps `peer`'s update for `round` as it accepted it: peers
/// cannot write there.
pub(super) fn accepted_key(round: Round, peer: PeerId) -> String {
    format!("{}/accepted/{peer}", round_prefix(round))
}

/// Where the exchange puts `round`'s aggregate.
pub(super) fn aggregate_key(round: Round) -> String {
    format!("{}/aggregate", round_prefix(round))
}

/// A closed round's payloads in storage: the digest of each object the exchange accepted
/// or wrote. A payload without one (its write failed) goes through the exchange.
#[derive(Default)]
pub(super) struct Stored {
    pub updates: BTreeMap<PeerId, Sha256Digest>,
    pub aggregate: Option<Sha256Digest>,
}

/// Why an update could not be taken: refused, or storage failed and the peer should
/// try again.
pub(super) enum UpdateError {
    Refused(Refusal),
    Storage(String),
}

impl From<Refusal> for UpdateError {
    fn from(r: Refusal) -> Self {
        Self::Refused(r)
    }
}

impl Exchange {
    /// The bucket peers move payloads through, if the run has one.
    pub(super) fn payloads(&self) -> Option<Storage> {
        self.store().filter(Storage::signs_urls)
    }

    /// A URL `peer` may PUT its update for `round` to; empty without a bucket.
    pub(super) async fn upload_url(&self, peer: PeerId, round: Round) -> Result<String, Status> {
        let Some(store) = self.payloads() else {
            return Ok(String::new());
        };
        self.check_round(peer, round)?;
        let url = store
            .signed_url(reqwest::Method::PUT, &update_key(round, peer))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(url.unwrap_or_default())
    }

    /// `peer`'s update for `round` as it put it in storage, `size` bytes long.
    pub(super) async fn read_stored(
        &self,
        peer: PeerId,
        round: Round,
        size: u64,
    ) -> Result<Vec<u8>, UpdateError> {
        let Some(store) = self.payloads() else {
            return Err(Refusal::new(
                Reason::BadRequest,
                "this exchange keeps payloads itself: send the update's data",
            )
            .into());
        };
        let key = update_key(round, peer);
        let limit = self.shared.max_update;
        // First copied, inside the storage, to where only the exchange writes: what
        // fetchers download is what is checked here, whatever the peer's URL does next.
        let accepted = accepted_key(round, peer);
        match store.copy(&key, &accepted).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {
                let message =
                    format!("no update at {key} in storage: PUT it to the URL UploadUrl gave");
                return Err(Refusal::new(Reason::BadRequest, message).into());
            }
            Err(e) => return Err(UpdateError::Storage(e.to_string())),
        }
        // Read no more than announced (the header's size is within the limit).
        let read = store.get_sized(&accepted, size).await;
        match read.map_err(|e| UpdateError::Storage(e.to_string()))? {
            Ok(Some(bytes)) => Ok(bytes.to_vec()),
            Ok(None) => Err(UpdateError::Storage(format!(
                "{accepted} vanished after its copy"
            ))),
            Err(actual) if actual > limit => {
                let message = format!("an update of {actual} bytes exceeds the limit of {limit}");
                Err(Refusal::new(Reason::TooLarge, message).into())
            }
            Err(actual) => {
                let message = format!("{key} holds {actual} bytes, not the {size} announced");
                Err(Refusal::new(Reason::BadRequest, message).into())
            }
        }
    }

    /// Writes a closed round's aggregate beside its updates and notes every payload's
    /// digest; `None` without a bucket. An aggregate that cannot be written goes
    /// through the exchange instead.
    pub(super) async fn store_round(
        &self,
        round: Round,
        entries: &[(PeerId, f32, Arc<Vec<u8>>)],
        aggregate: Option<&[u8]>,
    ) -> Option<Stored> {
        let store = self.payloads()?;
        let updates = (entries.iter()).map(|(p, _, b)| (*p, digest(b))).collect();
        let mut stored = Stored {
            updates,
            aggregate: None,
        };
        if let Some(bytes) = aggregate {
            let key = aggregate_key(round);
            // Peers wait for the round meanwhile: storage gets a while, not its retries'
            // whole patience.
            let put = store.put(&key, Bytes::copy_from_slice(bytes));
            match tokio::time::timeout(AGGREGATE_WRITE, put).await {
                Ok(Ok(())) => stored.aggregate = Some(digest(bytes)),
                Ok(Err(e)) => tracing::warn!(round = round.0, error = %e,
                    "could not write the round's aggregate to storage; peers get it from the exchange"),
                Err(_) => tracing::warn!(round = round.0, timeout = ?AGGREGATE_WRITE,
                    "storage did not take the round's aggregate in time; peers get it from the exchange"),
            }
        }
        Some(stored)
    }

    /// Fills in a signed GET URL for each stored payload of a round's stream (see
    /// [`super::service`]'s `round_chunks`).
    pub(super) async fn sign_downloads(
        &self,
        out: &mut [Part],
        keys: Vec<(usize, String)>,
    ) -> Result<(), Status> {
        use proto::round_chunk::Item;
        let Some(store) = self.payloads() else {
            return Ok(());
        };
        for (i, key) in keys {
            let url = (store.signed_url(reqwest::Method::GET, &key).await)
                .map_err(|e| Status::unavailable(e.to_string()))?
                .unwrap_or_default();
            match &mut out[i] {
                Part::Message(proto::RoundChunk {
                    item: Some(Item::Entry(e)),
                }) => e.url = url,
                Part::Message(proto::RoundChunk {
                    item: Some(Item::Aggregate(a)),
                }) => a.url = url,
                _ => {}
            }
        }
        Ok(())
    }

    /// Deletes, in the background, the objects of the rounds before `open` a previous
    /// exchange left: this one keeps none of them.
    pub(super) fn forget_rounds_before(&self, open: Round) {
        let Some(store) = self.payloads() else {
            return;
        };
        tokio::spawn(async move {
            let rounds = match store.list_dirs("rounds").await {
                Ok(rounds) => rounds,
                Err(e) => return tracing::warn!(error = %e, "could not list the rounds in storage"),
            };
            let old = (rounds.iter())
                .filter(|r| r.parse::<u32>().is_ok_and(|r| r < open.0))
                .map(|r| format!("rounds/{r}"));
            for prefix in old {
                if let Err(e) = store.delete_prefix(&prefix).await {
                    tracing::warn!(%prefix, error = %e, "could not delete a round's payloads");
                }
            }
        });
    }

    /// Deletes the objects of rounds the exchange no longer keeps, in the background.
    pub(super) fn forget_rounds(&self, rounds: Vec<Round>) {
        let Some(store) = self.payloads() else {
            return;
        };
        tokio::spawn(async move {
            for round in rounds {
                if let Err(e) = store.delete_prefix(&round_prefix(round)).await {
                    tracing::warn!(round = round.0, error = %e, "could not delete the round's payloads");
                }
            }
        });
    }
}
