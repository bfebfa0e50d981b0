//! A peer's update on its way to the exchange: streamed to it, or with a bucket, PUT on
//! the URL it signed and then announced.

use super::{ClientError, ExchangeClient, Grpc, Pacer, direct};
use crate::exchange::{CHUNK_BYTES, proto};
use crate::outer::Round;

impl ExchangeClient {
    /// Uploads this peer's update for `round`, paced to the bandwidth cap. Safe to
    /// repeat: the exchange accepts the same update twice as once.
    pub async fn put_update(
        &self,
        round: Round,
        bytes: &[u8],
        train_loss: f32,
    ) -> Result<u64, ClientError> {
        self.put_update_probed(round, bytes, train_loss, &[]).await
    }

    /// [`Self::put_update`] with the peer's θ at the run's probe positions.
    pub async fn put_update_probed(
        &self,
        round: Round,
        bytes: &[u8],
        train_loss: f32,
        probe: &[f32],
    ) -> Result<u64, ClientError> {
        let header = proto::UpdateHeader {
            round: round.0,
            size: bytes.len() as u64,
            train_loss,
            config_fingerprint: self.opts.fingerprint.clone(),
            probe: probe.to_vec(),
            stored: false,
        };
        let reply = self
            .retrying(|mut g| {
                let header = header.clone();
                async move {
                    let url = self.upload_url(&mut g, round).await?;
                    let stream = match url.is_empty() {
                        true => self.update_stream(header, bytes),
                        false => {
                            let mbps = self.opts.bandwidth_mbps;
                            direct::put(&self.http, &url, bytes, mbps).await?;
                            let header = proto::UpdateHeader {
                                stored: true,
                                ..header
                            };
                            self.update_stream(header, &[])
                        }
                    };
                    g.put_update(stream).await.map(|r| r.into_inner())
                }
            })
            .await?;
        Ok(reply.accepted_bytes)
    }

    /// Where to PUT this peer's update for `round`; empty when the exchange keeps
    /// payloads itself, which is asked once: a run's exchange keeps them one way.
    async fn upload_url(&self, g: &mut Grpc, round: Round) -> Result<String, tonic::Status> {
        use std::sync::atomic::Ordering;
        if self.streams_payloads.load(Ordering::Relaxed) {
            return Ok(String::new());
        }
        let req = proto::UploadUrlRequest { round: round.0 };
        let url = g.upload_url(req).await?.into_inner().url;
        self.streams_payloads
            .store(url.is_empty(), Ordering::Relaxed);
        Ok(url)
    }

    /// An update as PutUpdate streams it: `header`, then `bytes` in chunks, no faster
    /// than the bandwidth cap.
    fn update_stream(
        &self,
        header: proto::UpdateHeader,
        bytes: &[u8],
    ) -> tokio_stream::wrappers::ReceiverStream<proto::UpdateChunk> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let data: Vec<Vec<u8>> = bytes.chunks(CHUNK_BYTES).map(<[u8]>::to_vec).collect();
        let mut pacer = Pacer::new(self.opts.bandwidth_mbps);
        tokio::spawn(async move {
            use proto::update_chunk::Item;
            let first = proto::UpdateChunk {
                item: Some(Item::Header(header)),
            };
            if tx.send(first).await.is_err() {
                return;
            }
            for d in data {
                pacer.pace(d.len()).await;
                let chunk = proto::UpdateChunk {
                    item: Some(Item::Data(d)),
                };
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}
