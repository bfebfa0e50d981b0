//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection
//! does it: take the Lease when it is free or expired, renew it every third of its
//! duration with optimistic concurrency, give it up on shutdown.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease as K8sLease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

pub struct Lease {
    api: Api<K8sLease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// Held leadership; renewed in the background until released or lost.
pub struct Leadership {
    lease: std::sync::Arc<Lease>,
    lost: watch::Receiver<Option<String>>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Lease {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(self) -> kube::Result<Leadership> {
        let period = self.duration / 3;
        loop {
            match self.try_hold().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(period).await;
        }
        let lease = std::sync::Arc::new(self);
        let (tx, rx) = watch::channel(None);
        let renewing = lease.clone();
        let renewer = tokio::spawn(async move {
            let mut last_renewal = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(period).await;
                match renewing.try_hold().await {
                    Ok(true) => last_renewal = tokio::time::Instant::now(),
                    Ok(false) => {
                        let _ = tx.send(Some("another replica holds it".into()));
                        return;
                    }
                    Err(e) if last_renewal.elapsed() >= renewing.duration => {
                        let _ = tx.send(Some(format!("could not renew it: {e}")));
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "renewing the leader Lease"),
                }
            }
        });
        Ok(Leadership {
            lease,
            lost: rx,
            renewer,
        })
    }

    /// Takes or renews the Lease if it is ours, free or expired. `Ok(false)` when another
    /// holder's Lease is current or another replica won the race.
    async fn try_hold(&self) -> kube::Result<bool> {
        let now = Timestamp::now();
        let seconds = self.duration.as_secs().max(1) as i32;
        let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(seconds),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        };
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = K8sLease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let current = lease.spec.clone().unwrap_or_default();
        let holder = current.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        let expired = current.renew_time.as_ref().is_none_or(|t| {
            let lasts =
                SignedDuration::from_secs(current.lease_duration_seconds.unwrap_or(seconds).into());
            t.0 + lasts < now
        });
        if !ours && !holder.is_empty() && !expired {
            return Ok(false);
        }
        let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours { current.acquire_time } else { None };
        lease.spec = Some(spec(transitions, acquired));
        // The resourceVersion makes this a compare-and-swap: of two replicas racing for
        // an expired Lease, one gets 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Leadership {
    /// Resolves when leadership is lost, with why.
    pub async fn lost(&self) -> String {
        let mut rx = self.lost.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "the renewer stopped".into(),
        }
    }

    /// Gives the Lease up so a successor need not wait for it to expire.
    pub async fn release(self) {
        self.renewer.abort();
        let lease = &self.lease;
        if let Ok(Some(mut current)) = lease.api.get_opt(&lease.name).await
            && let Some(spec) = current.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(lease.identity.as_str())
        {
            spec.holder_identity = None;
            let _ = lease
                .api
                .replace(&lease.name, &PostParams::default(), &current)
                .await;
        }
    }
}
