//! What the exchange keeps in its storage (a directory or a bucket): the global state
//! after every round (so a restarted exchange, on this node or another, resumes where the
//! peers are), the settings and the aggregation residual; and the run's checkpoints, on
//! local disk for the publisher.

use std::path::Path;

use bytes::Bytes;

use super::{ExchangeError, Global, PeerId, Settings, Shared};
use crate::exchange::storage::Storage;
use crate::model::{Llama, save_checkpoint};
use crate::outer::{Aggregator, Outer, Round};

/// The persisted global state.
const STATE_KEY: &str = "state.safetensors";
/// The exchange's aggregation residual (`--download aggregate`).
const RESIDUAL_KEY: &str = "aggregate-residual.safetensors";
/// The operator's latest settings.
const SETTINGS_KEY: &str = "settings.json";

/// The object at `key`, if there is one; an error names where it was looked for.
pub(super) fn read(store: &Storage, key: &str) -> Result<Option<Bytes>, ExchangeError> {
    store
        .get_blocking(key)
        .map_err(|e| resume_error(store, key, &e))
}

pub(super) fn resume_error(store: &Storage, key: &str, e: &dyn std::fmt::Display) -> ExchangeError {
    ExchangeError::Resume {
        from: format!("{store}/{key}"),
        message: e.to_string(),
    }
}

/// The settings saved in `store`, if any.
pub(super) fn load_settings(store: &Storage) -> Result<Option<Settings>, ExchangeError> {
    let Some(text) = read(store, SETTINGS_KEY)? else {
        return Ok(None);
    };
    let settings: Settings =
        serde_json::from_slice(&text).map_err(|e| resume_error(store, SETTINGS_KEY, &e))?;
    tracing::info!(?settings, %store, "resumed the run's settings");
    Ok(Some(settings))
}

/// Saves the settings, so that a restarted exchange keeps them.
pub(super) fn save_settings(store: &Storage, settings: &Settings) -> Result<(), String> {
    let text = serde_json::to_vec_pretty(settings).map_err(|e| e.to_string())?;
    write(store, SETTINGS_KEY, text)
}

/// Loads the state saved in `store` into `outer` and the model, returning the round it
/// belongs to; round 0 when nothing was saved yet.
pub(super) fn resume(
    store: &Storage,
    outer: &mut Outer,
    model: &Llama,
) -> Result<Round, ExchangeError> {
    let Some(bytes) = read(store, STATE_KEY)? else {
        return Ok(Round(0));
    };
    let open = (outer.import(model, &bytes)).map_err(|e| resume_error(store, STATE_KEY, &e))?;
    tracing::info!(round = open.0, %store, "resumed the run's state");
    Ok(open)
}

/// Saves the global state `bytes`, replacing the previous one only once the new one is
/// complete.
pub(super) fn save_state(store: &Storage, bytes: &[u8]) -> Result<(), String> {
    write_closing(store, STATE_KEY, bytes.to_vec())
}

/// Saves what the exchange's aggregates have left out so far (see
/// [`crate::outer::Aggregator`]). Written after the state: a crash between the two costs
/// at most one round's residual, never a replica's agreement.
pub(super) fn save_residual(store: &Storage, bytes: Vec<u8>) -> Result<(), String> {
    write_closing(store, RESIDUAL_KEY, bytes)
}

/// Loads the residual saved in `store` into `aggregator`, if there is one.
pub(super) fn resume_residual(
    store: &Storage,
    aggregator: &mut Aggregator,
    model: &Llama,
) -> Result<(), ExchangeError> {
    let Some(bytes) = read(store, RESIDUAL_KEY)? else {
        return Ok(());
    };
    (aggregator.import(model, &bytes)).map_err(|e| resume_error(store, RESIDUAL_KEY, &e))
}

/// [`write`] for a closing round. A directory that cannot be written is a full disk, and
/// the exchange stops; a bucket that cannot be written now (after its client's own
/// retries) is waited for: the round stays closing, peers wait for its result, and
/// nothing is lost.
fn write_closing(store: &Storage, key: &str, bytes: Vec<u8>) -> Result<(), String> {
    let bytes = Bytes::from(bytes);
    let mut wait = std::time::Duration::from_secs(1);
    loop {
        match store.put_blocking(key, bytes.clone()) {
            Ok(()) => return Ok(()),
            Err(e) if store.signs_urls() => {
                tracing::warn!(error = %e, ?wait, "could not save the round's state; retrying");
                std::thread::sleep(wait);
                wait = (wait * 2).min(std::time::Duration::from_secs(60));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Writes `bytes` at `key`; the object is replaced only once all of it is written.
pub(super) fn write(store: &Storage, key: &str, bytes: Vec<u8>) -> Result<(), String> {
    (store.put_blocking(key, Bytes::from(bytes))).map_err(|e| e.to_string())
}

pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("partial");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// What a round's checkpoint records beside the weights.
pub(super) struct Checkpoint<'a> {
    /// The round the checkpoint starts (the one after the round just closed).
    pub next: Round,
    /// The settings the round closed under.
    pub settings: Settings,
    pub validation_loss: f32,
    pub train_loss: f32,
    pub contributors: &'a [PeerId],
    pub so_far: SoFar,
}

/// The run's progress as a checkpoint reports it.
pub(super) struct SoFar {
    /// Tokens trained on, all peers together.
    pub tokens: u64,
    /// Validation loss at the start of each recent round, oldest first: the loss curve.
    pub validation: Vec<(u32, f32)>,
    /// The scoring ledger and its public key, once it has a record.
    pub ledger: Option<(String, String)>,
}

/// Writes `<checkpoint_dir>/round-<next>/` when it is due: every `checkpoint_every`
/// rounds, and after the last.
pub(super) fn write_checkpoint(
    shared: &Shared,
    global: &Global,
    checkpoint: Checkpoint<'_>,
) -> Result<(), String> {
    let Some(dir) = &shared.opts.checkpoint_dir else {
        return Ok(());
    };
    let config = &shared.run.config;
    let next = checkpoint.next;
    let every = checkpoint.settings.checkpoint_every.max(1);
    if !(next.0.is_multiple_of(every) || next.0 >= checkpoint.settings.rounds) {
        return Ok(());
    }
    let meta = serde_json::json!({
        "run": shared.opts.run_name,
        "round": next.0,
        "algorithm": config.algorithm,
        "seed": config.seed,
        "tokenizer": shared.run.tokenizer.name(),
        "validation_loss": checkpoint.validation_loss,
        "train_loss": checkpoint.train_loss,
        "codec": {"chunk": config.chunk, "k": config.k, "bits": config.bits,
                  "error_feedback": config.error_feedback},
        "contributors": checkpoint.contributors.iter().map(PeerId::to_string).collect::<Vec<_>>(),
        "tokens": checkpoint.so_far.tokens,
        "validation_curve": checkpoint.so_far.validation.iter()
            .map(|(round, loss)| serde_json::json!({"round": round, "loss": loss}))
            .collect::<Vec<_>>(),
    });
    let path = dir.join(format!("round-{:06}", next.0));
    save_checkpoint(&path, &global.model, &meta, &shared.run.tokenizer)
        .map_err(|e| e.to_string())?;
    if let Some((ledger, public_key)) = &checkpoint.so_far.ledger {
        write_atomically(&path.join(super::ledger::LEDGER_FILE), ledger.as_bytes())?;
        let key = format!("{public_key}\n");
        write_atomically(&path.join(super::ledger::PUBLIC_KEY_FILE), key.as_bytes())?;
    }
    tracing::info!(round = next.0, path = %path.display(), "checkpoint written");
    Ok(())
}
