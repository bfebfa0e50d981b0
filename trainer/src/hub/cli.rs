//! `starling-trainer publish`: its flags are the contract the operator's publisher Job
//! is written against (the Job's environment is parsed back through them in a test).

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::env;

#[derive(clap::Args, Debug)]
pub struct PublishArgs {
    /// The checkpoint: a directory (any the trainer writes, `init`'s included), or its
    /// URL on the run's exchange (`http://…/checkpoints/round-000012`), which is
    /// downloaded first and told what became of it.
    #[arg(long, env = env::CHECKPOINT)]
    pub checkpoint: String,
    /// The publisher's token for the exchange (with a checkpoint URL).
    #[arg(long, env = env::TOKEN, hide_env_values = true)]
    pub exchange_token: Option<String>,
    /// How an `https://` exchange is verified.
    #[command(flatten)]
    pub tls: crate::exchange::tls::TlsArgs,
    /// The model repo, `namespace/name`; created if missing.
    #[arg(long, env = env::PUBLISH_REPO)]
    pub repo: super::RepoId,
    #[arg(long, env = env::HUB_ENDPOINT, default_value = super::DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// The branch to commit to.
    #[arg(long, env = env::PUBLISH_REVISION, default_value = "main")]
    pub revision: String,
    /// Create the repo private (an existing repo keeps its visibility).
    #[arg(long, env = env::PUBLISH_PRIVATE, default_value_t = false, action = clap::ArgAction::Set)]
    pub private: bool,
    /// Tag the commit `round-N` (default true).
    #[arg(long, env = env::PUBLISH_TAG, default_value_t = true, action = clap::ArgAction::Set)]
    pub tag: bool,
    /// Split the weights into shards above this many bytes.
    #[arg(long, env = env::PUBLISH_MAX_SHARD_BYTES, default_value_t = super::DEFAULT_MAX_SHARD_BYTES)]
    pub max_shard_bytes: u64,
    /// The model card's license (a Hub license id such as `apache-2.0`).
    #[arg(long, env = env::PUBLISH_LICENSE)]
    pub license: Option<String>,
    /// Hub datasets the model was trained on, for the model card.
    #[arg(long = "dataset", env = env::PUBLISH_DATASETS, value_delimiter = ',')]
    pub datasets: Vec<String>,
    /// A file holding the token (else `HF_TOKEN`).
    #[arg(long, env = env::PUBLISH_TOKEN_FILE)]
    pub token_file: Option<PathBuf>,
    /// Write what was published here as JSON (in a pod: `/dev/termination-log`).
    #[arg(long, env = env::PUBLISH_RESULT_FILE)]
    pub result_file: Option<PathBuf>,
}

impl PublishArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let token = match &self.token_file {
            Some(file) => Some(
                String::from_utf8(
                    std::fs::read(file).with_context(|| format!("reading {}", file.display()))?,
                )?
                .trim()
                .to_owned(),
            ),
            None => std::env::var(env::HUB_TOKEN).ok(),
        };
        let hub = super::Hub::new(&self.endpoint, token)?;
        let mut opts = super::PublishOptions::new(self.repo.clone());
        opts.revision = self.revision.clone();
        opts.private = self.private;
        opts.tag = self.tag;
        opts.max_shard_bytes = self.max_shard_bytes;
        opts.card.license = self.license.clone();
        opts.card.datasets = self.datasets.clone();
        let runtime = tokio::runtime::Runtime::new()?;
        let published =
            if self.checkpoint.starts_with("http://") || self.checkpoint.starts_with("https://") {
                runtime.block_on(self.publish_from_exchange(&hub, &opts))?
            } else {
                let dir = Path::new(&self.checkpoint);
                runtime.block_on(super::publish(&hub, dir, &opts, progress()))?
            };
        let json = serde_json::to_string(&published)?;
        if let Some(file) = &self.result_file {
            std::fs::write(file, &json).with_context(|| format!("writing {}", file.display()))?;
        }
        let verb = if published.already {
            "already published"
        } else {
            "published"
        };
        println!(
            "{} {verb} as {} {} (commit {}): {}",
            self.checkpoint, published.repo, published.revision, published.commit, published.url
        );
        Ok(())
    }

    /// Downloads the checkpoint from the exchange, publishes it, and reports the outcome
    /// (a failure too: the operator shows the Hub's message).
    async fn publish_from_exchange(
        &self,
        hub: &super::Hub,
        opts: &super::PublishOptions,
    ) -> anyhow::Result<super::Published> {
        let token = self
            .exchange_token
            .clone()
            .context("a checkpoint URL needs the publisher's exchange token (--exchange-token)")?;
        let tls = self.tls.load().map_err(anyhow::Error::msg)?;
        let source = super::ExchangeCheckpoint::new(&self.checkpoint, token, tls.as_ref())?;
        let name = self
            .checkpoint
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("checkpoint");
        let dir = std::env::temp_dir().join(format!("starling-{name}-{}", std::process::id()));
        eprintln!("downloading {} from the exchange", self.checkpoint);
        let published = match source.download(&dir).await {
            Ok(()) => super::publish(hub, &dir, opts, progress()).await,
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_dir_all(&dir);
        let reported = source.report(published.as_ref()).await;
        let published = published?;
        // Unreported, the operator never learns of it: fail, and the retry (which finds
        // the commit made) reports it.
        reported.context("reporting the publication to the exchange")?;
        Ok(published)
    }
}

fn progress() -> std::sync::Arc<super::ProgressLine> {
    std::sync::Arc::new(super::ProgressLine::default())
}
