//! The Job controller: one pod at a time from each Job's template until one succeeds,
//! a new one after each failure up to `backoffLimit`, then `Complete` or `Failed`.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::watch::Cache;
use super::{Kubelet, finished, now, rand_u32};

/// What Kubernetes allows a Job when its spec says nothing.
const DEFAULT_BACKOFF_LIMIT: i32 = 6;

impl Kubelet {
    pub(super) async fn jobs(&mut self, cache: &Cache, all: &[Pod]) -> kube::Result<()> {
        for job in cache.jobs.state() {
            if job.metadata.deletion_timestamp.is_none() && !done(&job) {
                self.job(&job, all).await?;
            }
        }
        Ok(())
    }

    async fn job(&mut self, job: &Job, all: &[Pod]) -> kube::Result<()> {
        let ns = job.namespace().unwrap_or_default();
        let uid = job.uid().unwrap_or_default();
        let owned: Vec<&Pod> = all
            .iter()
            .filter(|p| {
                !self.assumed.is_deleted(p) && p.owner_references().iter().any(|o| o.uid == uid)
            })
            .collect();
        let phase = |p: &&Pod| p.status.as_ref().and_then(|s| s.phase.clone());
        let succeeded = owned
            .iter()
            .filter(|p| phase(p).as_deref() == Some("Succeeded"))
            .count();
        let failed = owned
            .iter()
            .filter(|p| phase(p).as_deref() == Some("Failed"))
            .count() as i32;
        let active = owned.iter().filter(|p| !finished(p)).count();
        let limit = job
            .spec
            .as_ref()
            .and_then(|s| s.backoff_limit)
            .unwrap_or(DEFAULT_BACKOFF_LIMIT);
        let condition = if succeeded > 0 {
            Some(json!({"type": "Complete", "status": "True", "lastTransitionTime": now()}))
        } else if failed > limit {
            Some(
                json!({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
                "lastTransitionTime": now()}),
            )
        } else {
            None
        };
        let mut creating = 0;
        if condition.is_none()
            && active == 0
            && let Some(pod) = pod_from(job)
        {
            let created = Api::<Pod>::namespaced(self.client.clone(), &ns)
                .create(&Default::default(), &pod)
                .await?;
            self.assumed.created(created);
            creating = 1;
        }
        let mut status = json!({"active": active + creating, "succeeded": succeeded,
            "failed": failed});
        if let Some(c) = condition {
            status["conditions"] = json!([c]);
            if succeeded > 0 {
                status["completionTime"] = json!(now());
            }
        }
        let current = job
            .status
            .as_ref()
            .map(|s| (s.active, s.succeeded, s.failed));
        let next = Some((
            Some((active + creating) as i32),
            Some(succeeded as i32),
            Some(failed),
        ));
        if current != next || status.get("conditions").is_some() {
            Api::<Job>::namespaced(self.client.clone(), &ns)
                .patch_status(
                    &job.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": status})),
                )
                .await?;
        }
        Ok(())
    }
}

/// Whether the Job has finished (`Complete` or `Failed`).
fn done(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
}

/// A new pod for `job`, from its template.
fn pod_from(job: &Job) -> Option<Pod> {
    let template = serde_json::to_value(&job.spec.as_ref()?.template).ok()?;
    let name = format!("{}-{:05x}", job.name_any(), rand_u32() & 0xfffff);
    let labels = [
        ("job-name", job.name_any()),
        ("controller-uid", job.uid().unwrap_or_default()),
    ];
    super::deployment::owned_pod(template, &name, ("batch/v1", "Job", job), &labels)
}
