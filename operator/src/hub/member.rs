//! MemberCluster controller: the member's hub namespace and scoped RBAC, and `Ready`
//! from the agent's heartbeats.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::{Context, Error, apply_object};
use crate::api::MemberCluster;
use crate::resources::{MANAGER, member_rbac, set_condition};

pub async fn reconcile(member: Arc<MemberCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = member.name_any();
    if member.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Namespace, ServiceAccount and RBAC: applied every time, so a deleted Role heals.
    for object in member_rbac(&member) {
        apply_object(&ctx, object).await?;
    }

    let status = member.status.clone().unwrap_or_default();
    let grace = SignedDuration::from_secs(ctx.config.heartbeat_grace as i64);
    let now = Timestamp::now();
    let (ready, reason, message, recheck) = match &status.last_heartbeat {
        None => (
            false,
            "AgentNotConnected",
            "no heartbeat from the member's agent yet".to_string(),
            grace,
        ),
        Some(beat) => {
            let age = now.duration_since(beat.0);
            if age <= grace {
                (
                    true,
                    "HeartbeatReceived",
                    format!("agent heartbeat {}s ago", age.as_secs()),
                    grace - age + SignedDuration::from_secs(1),
                )
            } else {
                (
                    false,
                    "HeartbeatMissed",
                    format!(
                        "no agent heartbeat for {}s (grace {}s)",
                        age.as_secs(),
                        grace.as_secs()
                    ),
                    grace,
                )
            }
        }
    };
    let was_ready = crate::resources::condition_true(&status.conditions, "Ready");
    let mut conditions = status.conditions.clone();
    set_condition(
        &mut conditions,
        "Ready",
        ready,
        reason,
        message.clone(),
        member.metadata.generation,
    );
    let changed = conditions
        .iter()
        .map(|c| (&c.status, &c.reason))
        .collect::<Vec<_>>()
        != status
            .conditions
            .iter()
            .map(|c| (&c.status, &c.reason))
            .collect::<Vec<_>>();
    if changed {
        let api: Api<MemberCluster> = Api::all(ctx.client.clone());
        let patch = json!({
            "apiVersion": "starling.dev/v1alpha1", "kind": "MemberCluster",
            "status": {"conditions": conditions},
        });
        api.patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
        if was_ready != ready {
            let event = Event {
                type_: if ready {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason: reason.into(),
                note: Some(message),
                action: "Heartbeat".into(),
                secondary: None,
            };
            let _ = ctx.recorder.publish(&event, &member.object_ref(&())).await;
        }
    }
    ctx.succeeded(&name);
    // Heartbeats are status writes, which wake this controller; the requeue catches the
    // heartbeat that never comes.
    let recheck = Duration::try_from(recheck).unwrap_or(Duration::from_secs(1));
    Ok(Action::requeue(recheck.max(Duration::from_secs(1))))
}

pub fn error_policy(member: Arc<MemberCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(member = %member.name_any(), %error, "reconcile failed");
    ctx.backoff(format!("mc/{}", member.name_any()))
}
