//! Where the exchange's state comes from when it starts: its storage (a bucket or a
//! directory), or nowhere.
//!
//! A bucket it cannot use yet (credentials refused, no such bucket, storage down) does
//! not stop the exchange, since a crash loop would say nothing the operator could show:
//! it serves the operator and says why (`RunState.storage_error`), turns peers away as
//! unavailable (they retry), and tries again every [`STORAGE_RETRY`] with the
//! credentials as they are then (a mounted Secret follows its edits), resuming from the
//! bucket once it can.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tonic::Status;

use super::ledger::Ledger;
use super::{Exchange, ExchangeError, ExchangeOptions, Global, Settings, Shared, persist};
use crate::exchange::storage::{Storage, StorageError, StorageSource};
use crate::outer::Round;

/// How often an exchange waiting for its bucket tries it again.
pub(super) const STORAGE_RETRY: Duration = Duration::from_secs(5);

/// The exchange's store, as far as it could be opened.
pub(super) enum Opened {
    /// No storage: the state lives in memory only.
    Nothing,
    Ready(Storage),
    /// A bucket that cannot be used yet, and why.
    Waiting(String),
}

/// What a store held of a run.
pub(super) struct Resumed {
    /// The round the saved state starts (0 when nothing was saved).
    pub open: Round,
    pub settings: Option<Settings>,
    pub ledger: Ledger,
}

/// A bucket, once it has shown it can be written, read and deleted from.
fn usable(source: &StorageSource) -> Result<Storage, StorageError> {
    let store = source.open()?;
    futures::executor::block_on(store.check())?;
    Ok(store)
}

/// The store `opts` name: the bucket, else the state directory.
pub(super) fn open(opts: &ExchangeOptions) -> Result<Opened, ExchangeError> {
    match (&opts.storage, &opts.state_dir) {
        (Some(source), _) => Ok(match usable(source) {
            Ok(store) => Opened::Ready(store),
            Err(e) => {
                tracing::warn!(error = %e, "storage cannot be used yet; retrying");
                Opened::Waiting(e.to_string())
            }
        }),
        (None, Some(dir)) => (Storage::local(dir))
            .map(Opened::Ready)
            .map_err(|e| ExchangeError::Init(e.to_string())),
        (None, None) => Ok(Opened::Nothing),
    }
}

/// Loads what `store` holds of the run into `global`.
pub(super) fn resume(store: &Storage, global: &mut Global) -> Result<Resumed, ExchangeError> {
    if let Some(a) = global.aggregator.as_mut() {
        persist::resume_residual(store, a, &global.model)?;
    }
    Ok(Resumed {
        open: persist::resume(store, &mut global.outer, &global.model)?,
        settings: persist::load_settings(store)?,
        ledger: Ledger::load(Some(store))?,
    })
}

impl Exchange {
    /// Refuses calls that need the state while the exchange waits for its bucket.
    pub(super) fn usable(&self) -> Result<(), Status> {
        match &self.state().storage_error {
            Some(e) => Err(Status::unavailable(format!(
                "the exchange is waiting for its storage: {e}"
            ))),
            None => Ok(()),
        }
    }

    /// Opens the bucket again and resumes from it; why not, if it cannot.
    fn try_resume(&self, source: &StorageSource) -> Result<(), String> {
        let store = usable(source).map_err(|e| e.to_string())?;
        let shared = &self.shared;
        let mut global = shared.global.lock().unwrap_or_else(|p| p.into_inner());
        let resumed = resume(&store, &mut global).map_err(|e| e.to_string())?;
        let open = resumed.open;
        let state_bytes = (global.outer.export(&global.model, open)).map_err(|e| e.to_string())?;
        drop(global);
        *shared.store.write().unwrap_or_else(|p| p.into_inner()) = Some(store);
        let mut state = self.state();
        state.open = open;
        state.round_span = super::round_span(&shared.opts.run_name, open);
        state.settings = resumed.settings.or(state.settings);
        state.ledger = resumed.ledger;
        state.state_bytes = Arc::new(state_bytes);
        state.storage_error = None;
        drop(state);
        tracing::info!(round = open.0, "storage usable; resumed");
        self.forget_rounds_before(open);
        shared.open_tx.send_replace(open);
        shared.wake.notify_one();
        Ok(())
    }
}

/// Tries the exchange's bucket every [`STORAGE_RETRY`] until it resumes from it, or the
/// exchange is dropped.
pub(super) async fn await_storage(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(STORAGE_RETRY).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(source) = shared.opts.storage.clone() else {
            return;
        };
        let exchange = Exchange { shared };
        let trying = exchange.clone();
        let tried = tokio::task::spawn_blocking(move || trying.try_resume(&source)).await;
        match tried {
            Ok(Ok(())) => return,
            Ok(Err(message)) => {
                tracing::warn!(error = %message, "storage cannot be used yet; retrying");
                exchange.state().storage_error = Some(message);
            }
            Err(e) => {
                exchange.state().storage_error = Some(format!("resuming panicked: {e}"));
            }
        }
    }
}
