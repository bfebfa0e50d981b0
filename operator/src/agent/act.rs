//! The agent's writes: each applies one part of a decision, and only that part.
//!
//! Writes tolerate the races a cache-driven agent meets: a pod created twice before the
//! cache shows it (409), an object already gone (404), or one replaced since it was
//! observed (the uid precondition fails with 409). Each of those means the decision's
//! aim already holds or will be decided again from the next observation.

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::Error;
use super::decide::{AGENT, Deletion, Plan, Sweep};
use crate::api::{GpuCapacity, MemberCluster, TrainerGroup};

/// The clients and places the agent writes to.
pub struct Writer {
    pub pods: Api<Pod>,
    pub secrets: Api<Secret>,
    pub groups: Api<TrainerGroup>,
    pub members: Api<MemberCluster>,
    pub member: String,
    /// When the hub token was issued and expires, reported with every heartbeat.
    pub credentials: Option<Lifetime>,
}

/// A token's (issued, expires).
pub type Lifetime = (k8s_openapi::jiff::Timestamp, k8s_openapi::jiff::Timestamp);

fn tolerate<T>(result: kube::Result<T>, codes: &[u16]) -> Result<(), Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if codes.contains(&e.code) => Ok(()),
        Err(e) => Err(Error::Local(e)),
    }
}

async fn delete<K>(api: &Api<K>, what: &Deletion) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = DeleteParams {
        preconditions: what.uid.clone().map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    tolerate(api.delete(&what.name, &params).await, &[404, 409])
}

impl Writer {
    /// Applies a group's plan: its credentials first (new pods read their token from
    /// them), then pod deletions and creations, then the group's status on the hub.
    pub async fn apply(&self, group: &TrainerGroup, plan: Plan) -> Result<(), Error> {
        let name = group.name_any();
        if let Some(secret) = &plan.secret {
            tracing::info!(group = %name, "writing the group's credentials");
            let params = PatchParams::apply(AGENT).force();
            let result = self
                .secrets
                .patch(&secret.name_any(), &params, &Patch::Apply(secret))
                .await;
            tolerate(result, &[])?;
        }
        for pod in &plan.delete {
            tracing::info!(group = %name, pod = %pod.name, "deleting a failed or unwanted pod");
            delete(&self.pods, pod).await?;
        }
        for pod in &plan.create {
            tracing::info!(group = %name, pod = %pod.name_any(), "creating a trainer pod");
            tolerate(self.pods.create(&PostParams::default(), pod).await, &[409])?;
        }
        if let Some(status) = &plan.status {
            // Every field written, so a list that emptied is cleared on the hub too.
            let mut body = json!({"status": status});
            body["status"]["pods"] = json!(status.pods);
            self.groups
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(body))
                .await
                .map_err(Error::Hub)?;
        }
        Ok(())
    }

    /// Deletes the local objects of groups the hub no longer has.
    pub async fn sweep(&self, sweep: &Sweep) -> Result<(), Error> {
        for pod in &sweep.pods {
            tracing::info!(pod = %pod.name, "deleting the pod of a removed group");
            delete(&self.pods, pod).await?;
        }
        for secret in &sweep.secrets {
            tracing::info!(secret = %secret.name, "deleting the credentials of a removed group");
            delete(&self.secrets, secret).await?;
        }
        Ok(())
    }

    /// The heartbeat: the time, the agent's version and the member's GPU capacity.
    pub async fn heartbeat(&self, gpus: &[GpuCapacity]) -> Result<(), Error> {
        let mut status = json!({"status": {
            "lastHeartbeat": k8s_openapi::jiff::Timestamp::now(),
            "agentVersion": env!("CARGO_PKG_VERSION"),
            "gpusAllocatable": gpus.iter().map(|g| g.allocatable).sum::<u32>(),
            "gpusInUse": gpus.iter().map(|g| g.in_use).sum::<u32>(),
            "gpus": gpus,
        }});
        if let Some((issued, expires)) = self.credentials {
            status["status"]["credentialsIssued"] = json!(issued);
            status["status"]["credentialsExpire"] = json!(expires);
        }
        self.members
            .patch_status(&self.member, &PatchParams::default(), &Patch::Merge(status))
            .await
            .map_err(Error::Hub)?;
        Ok(())
    }
}
