//! The operator's connections to the runs' exchanges.
//!
//! One task per live run watches its exchange (`WatchRunState`, pushed by the exchange
//! when anything changes) and wakes the run's reconcile when what it says changes. A
//! reconcile reads the latest state from here and never calls the exchange itself, so a
//! fleet at rest costs nothing: a run is looked at when its training moves, not every
//! few seconds, and a thousand runs are a thousand idle streams.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc::UnboundedSender;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use starling_trainer::exchange::client::{ClientOptions, ExchangeClient};
use starling_trainer::exchange::tls::ClientTls;
use starling_trainer::exchange::{WATCH_KEEPALIVE, proto};
use tokio::sync::watch;

use crate::api::TrainingRun;

/// First wait before watching again an exchange that did not answer; it doubles up to
/// [`RETRY_MAX`] and starts over once the exchange answers.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// A watch that has sent nothing for this long (it sends at least every keepalive) is
/// on a dead link: it is dropped and opened again.
const SILENT: Duration = Duration::from_secs(3 * WATCH_KEEPALIVE.as_secs());
/// Longest wait for an exchange to accept a watch or a configuration.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Wakes a run's reconcile.
pub type Wake = UnboundedSender<ObjectRef<TrainingRun>>;

/// Every watched exchange, by run uid.
pub struct Exchanges {
    watched: Mutex<HashMap<String, Watched>>,
    wake: Wake,
}

struct Watched {
    url: String,
    token: String,
    client: ExchangeClient,
    /// What the exchange last said; `None` while it does not answer.
    latest: watch::Receiver<Option<proto::RunState>>,
    task: tokio::task::AbortHandle,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Exchanges {
    pub fn new(wake: Wake) -> Self {
        Self {
            watched: Mutex::default(),
            wake,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watched>> {
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `run`'s exchange at `url` last said, `None` while it does not answer. The
    /// first call starts watching it (so the answer comes with a later wake-up), and a
    /// new `url` or `token` starts over. An `https://` exchange is verified as `tls` says.
    pub fn state(
        &self,
        run: &TrainingRun,
        url: &str,
        token: &str,
        tls: Option<ClientTls>,
    ) -> Option<proto::RunState> {
        let uid = run.uid().unwrap_or_default();
        let mut watched = self.lock();
        if let Some(w) = watched
            .get(&uid)
            .filter(|w| w.url == url && w.token == token)
        {
            return w.latest.borrow().clone();
        }
        let client = match connect(url, token, tls) {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(run = %run.name_any(), error = %e, "exchange address");
                return None;
            }
        };
        let (tx, latest) = watch::channel(None);
        let task = tokio::spawn(watch_exchange(
            client.clone(),
            ObjectRef::from_obj(run),
            tx,
            self.wake.clone(),
        ));
        let entry = Watched {
            url: url.into(),
            token: token.into(),
            client,
            latest,
            task: task.abort_handle(),
        };
        watched.insert(uid, entry);
        None
    }

    /// The connection to the run's exchange, once watched.
    pub fn client(&self, uid: &str) -> Option<ExchangeClient> {
        self.lock().get(uid).map(|w| w.client.clone())
    }

    /// Stops watching the run's exchange (the run finished or is gone).
    pub fn forget(&self, uid: &str) {
        self.lock().remove(uid);
    }
}

fn connect(
    url: &str,
    token: &str,
    tls: Option<ClientTls>,
) -> Result<ExchangeClient, impl std::fmt::Display> {
    ExchangeClient::new(ClientOptions {
        url: url.into(),
        token: token.into(),
        bandwidth_mbps: None,
        // One attempt per call: the watch retries on its own schedule.
        retry_for: Duration::ZERO,
        tls,
        // Only peers' joins and updates are checked against the run's fingerprint.
        fingerprint: String::new(),
    })
}

/// Watches one exchange until aborted: each state that says something new is kept and
/// wakes the run. An exchange that cannot be watched is `None` (and wakes the run once),
/// then tried again with back-off; a watch that merely ended is reopened at once.
async fn watch_exchange(
    client: ExchangeClient,
    run: ObjectRef<TrainingRun>,
    latest: watch::Sender<Option<proto::RunState>>,
    wake: Wake,
) {
    let publish = |state: Option<proto::RunState>| {
        let changed = latest.send_if_modified(|current| {
            let changed = match (&*current, &state) {
                (Some(a), Some(b)) => a.differs_from(b),
                (None, None) => false,
                _ => true,
            };
            if changed {
                *current = state;
            }
            changed
        });
        if changed {
            let _ = wake.unbounded_send(run.clone());
        }
    };
    let mut retry = RETRY_MIN;
    loop {
        let answered = match tokio::time::timeout(CALL_TIMEOUT, client.watch_run_state()).await {
            Ok(Ok(stream)) => {
                let mut stream = Box::pin(stream);
                let mut answered = false;
                while let Ok(Some(Ok(state))) = tokio::time::timeout(SILENT, stream.next()).await {
                    answered = true;
                    publish(Some(state));
                }
                answered
            }
            Ok(Err(e)) => {
                tracing::debug!(run = %run, error = %e, "exchange not answering");
                false
            }
            Err(_) => false,
        };
        if answered {
            retry = RETRY_MIN;
        } else {
            publish(None);
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RETRY_MAX);
        }
    }
}
