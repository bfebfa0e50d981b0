//! Payloads moved straight to and from object storage, on URLs the exchange signed: the
//! peer's link carries them, not the exchange's, and the peer never holds credentials.
//!
//! A transfer that fails is UNAVAILABLE, which the caller's retry loop tries again (with
//! fresh URLs, since it asks the exchange again); a download whose bytes do not hash to
//! the digest the exchange accepted, or that storage refuses (4xx), is DATA_LOSS, and the
//! round is then fetched through the exchange.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::Status;

use super::{Pacer, StorageHttp};
use crate::exchange::CHUNK_BYTES;

/// The HTTP client for storage: no overall timeout (a payload may take minutes on a
/// home link) but a stalled read or connection fails.
pub(super) fn http() -> Result<StorageHttp, String> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| e.to_string())
}

/// The URL without its query (the signature), for messages and logs.
fn shown(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

fn unavailable(what: &str, url: &str, e: &dyn std::fmt::Display) -> Status {
    Status::unavailable(format!("{what} {}: {e}", shown(url)))
}

/// PUTs `bytes` to `url`, no faster than `mbps`.
pub(super) async fn put(
    http: &StorageHttp,
    url: &str,
    bytes: &[u8],
    mbps: Option<f64>,
) -> Result<(), Status> {
    let chunks: Vec<bytes::Bytes> = (bytes.chunks(CHUNK_BYTES))
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let mut pacer = Pacer::new(mbps);
    let body = futures::stream::iter(chunks).then(move |c| {
        let wait = pacer.pace_owned(c.len());
        async move {
            wait.await;
            Ok::<_, std::io::Error>(c)
        }
    });
    let sent = http
        .put(url)
        .header(reqwest::header::CONTENT_LENGTH, bytes.len())
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .map_err(|e| unavailable("uploading to", url, &e))?;
    if !sent.status().is_success() {
        let status = sent.status();
        let text = sent.text().await.unwrap_or_default();
        return Err(unavailable(
            "uploading to",
            url,
            &format!("{status}: {text}"),
        ));
    }
    Ok(())
}

/// GETs `url`, no faster than `mbps`: exactly `size` bytes that hash to `sha256`.
pub(super) async fn get(
    http: &StorageHttp,
    url: &str,
    size: u64,
    sha256: &[u8],
    mbps: Option<f64>,
) -> Result<Vec<u8>, Status> {
    let got = (http.get(url).send().await).map_err(|e| unavailable("downloading", url, &e))?;
    let status = got.status();
    if status.is_client_error() {
        // Gone, expired or refused: asking again brings the same answer.
        return Err(changed(url, &format!("storage answered {status}")));
    }
    if !status.is_success() {
        return Err(unavailable("downloading", url, &status));
    }
    let mut pacer = Pacer::new(mbps);
    let mut bytes = Vec::with_capacity(size as usize);
    let mut body = got.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| unavailable("downloading", url, &e))?;
        if (bytes.len() + chunk.len()) as u64 > size {
            return Err(changed(
                url,
                &format!("more than the {size} bytes accepted"),
            ));
        }
        pacer.pace(chunk.len()).await;
        bytes.extend_from_slice(&chunk);
    }
    if bytes.len() as u64 != size {
        return Err(changed(
            url,
            &format!("{} bytes, not the {size} accepted", bytes.len()),
        ));
    }
    if Sha256::digest(&bytes).as_slice() != sha256 {
        return Err(changed(url, &"bytes whose SHA-256 is not the one accepted"));
    }
    Ok(bytes)
}

/// A payload that is not (or no longer) in storage as the exchange accepted it.
fn changed(url: &str, what: &dyn std::fmt::Display) -> Status {
    Status::data_loss(format!(
        "{} is not in storage as the exchange accepted it: {what}",
        shown(url)
    ))
}
