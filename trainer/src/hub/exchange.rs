//! A checkpoint fetched from the run's exchange (`http://…/checkpoints/round-NNNNNN`),
//! and the publication reported back there, where the operator reads it from the run
//! state. The publisher reaches the exchange with its own token, which may do nothing
//! but this.

use std::path::Path;

use tokio::io::AsyncWriteExt;

use super::http::Auth;
use super::{Hub, HubError, Published};
use crate::exchange::tls::ClientTls;

/// One checkpoint on an exchange.
#[derive(Debug)]
pub struct ExchangeCheckpoint {
    exchange: Hub,
    /// `/checkpoints/round-NNNNNN`
    path: String,
}

#[derive(serde::Deserialize)]
struct Listing {
    files: Vec<Listed>,
}

#[derive(serde::Deserialize)]
struct Listed {
    name: String,
}

impl ExchangeCheckpoint {
    /// The checkpoint at `url`, read with the publisher's `token` (over TLS verified as
    /// `tls` says, for an `https://` exchange).
    pub fn new(url: &str, token: String, tls: Option<&ClientTls>) -> Result<Self, HubError> {
        let (base, name) = url
            .trim_end_matches('/')
            .rsplit_once("/checkpoints/")
            .ok_or_else(|| HubError::BadEndpoint(url.to_owned()))?;
        let exchange = match tls {
            Some(tls) => Hub::for_exchange(base, token, tls)?,
            None => Hub::new(base, Some(token))?,
        };
        Ok(ExchangeCheckpoint {
            exchange,
            path: format!("/checkpoints/{name}"),
        })
    }

    /// Downloads every file of the checkpoint into `dir`.
    pub async fn download(&self, dir: &Path) -> Result<(), HubError> {
        std::fs::create_dir_all(dir).map_err(HubError::io(dir))?;
        let url = self.exchange.url(&self.path);
        let listing: Listing = self
            .exchange
            .json("listing the checkpoint", Auth::Hub, |c| c.get(&url))
            .await?;
        for file in listing.files {
            if file.name.contains('/') || file.name.starts_with('.') {
                continue;
            }
            let what = format!("downloading {}", file.name);
            let url = self.exchange.url(&format!("{}/{}", self.path, file.name));
            let mut response = self
                .exchange
                .send(&what, Auth::Hub, |c| c.get(&url))
                .await?;
            let path = dir.join(&file.name);
            let mut out = tokio::fs::File::create(&path)
                .await
                .map_err(HubError::io(&path))?;
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| HubError::transport(&what, &e))?
            {
                out.write_all(&chunk).await.map_err(HubError::io(&path))?;
            }
            out.flush().await.map_err(HubError::io(&path))?;
        }
        Ok(())
    }

    /// Tells the exchange what became of the checkpoint.
    pub async fn report(&self, outcome: Result<&Published, &HubError>) -> Result<(), HubError> {
        let body = match outcome {
            Ok(p) => serde_json::json!({"repo": p.repo, "revision": p.revision,
                "commit": p.commit, "url": p.url}),
            Err(e) => serde_json::json!({"error": e.to_string()}),
        };
        let url = self.exchange.url(&format!("{}/publication", self.path));
        self.exchange
            .send("reporting to the exchange", Auth::Hub, |c| {
                c.post(&url)
                    .header("content-type", "application/json")
                    .body(body.to_string())
            })
            .await?;
        Ok(())
    }
}
