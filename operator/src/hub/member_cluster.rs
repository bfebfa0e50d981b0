//! MemberCluster controller: the member's hub namespace and scoped RBAC, and `Ready`
//! from the agent's heartbeats. Observe (the member) → [`decide`] (pure: the `Ready`
//! condition at `now`, whether it changed, when to look again) → act (apply the access
//! objects that differ, write the status only on a change).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::children::member_access;
use super::{Context, Error, publish};
use crate::api::MemberCluster;
use crate::k8s::{MANAGER, condition, condition_true, reason, set_condition};

/// What to do about one member's status.
#[derive(Debug, PartialEq)]
pub struct Decision {
    /// The conditions to write, when they changed in status or reason.
    pub conditions: Option<Vec<Condition>>,
    /// An Event when `Ready` flipped: (warning, reason, message).
    pub event: Option<(bool, &'static str, String)>,
    /// An Event when `Credentials` changed.
    pub credentials_event: Option<(bool, &'static str, String)>,
    /// When the heartbeat that never comes must be noticed.
    pub recheck: Duration,
}

/// `Ready` from the last heartbeat: fresh within `grace`, missed after it.
pub fn decide(member: &MemberCluster, grace: Duration, now: Timestamp) -> Decision {
    let status = member.status.clone().unwrap_or_default();
    let grace = SignedDuration::try_from(grace).unwrap_or(SignedDuration::from_secs(30));
    let (ready, why, message, recheck) = match &status.last_heartbeat {
        None => (
            false,
            reason::AGENT_NOT_CONNECTED,
            "no heartbeat from the member's agent yet".to_string(),
            grace,
        ),
        Some(beat) => {
            let age = now.duration_since(beat.0);
            if age <= grace {
                let message = format!("agent heartbeat {}s ago", age.as_secs());
                let recheck = grace - age + SignedDuration::from_secs(1);
                (true, reason::HEARTBEAT_RECEIVED, message, recheck)
            } else {
                let message = format!(
                    "no agent heartbeat for {}s (grace {}s)",
                    age.as_secs(),
                    grace.as_secs()
                );
                (false, reason::HEARTBEAT_MISSED, message, grace)
            }
        }
    };
    let was_ready = condition_true(&status.conditions, condition::READY);
    let mut conditions = status.conditions.clone();
    let generation = member.metadata.generation;
    set_condition(
        &mut conditions,
        condition::READY,
        ready,
        why,
        message.clone(),
        generation,
        now,
    );
    // The message carries the heartbeat's age; rewriting it on every beat would make a
    // fleet at rest write constantly.
    let essence = |c: &[Condition]| -> Vec<(String, String)> {
        c.iter()
            .map(|c| (c.status.clone(), c.reason.clone()))
            .collect()
    };
    let mut recheck = recheck;
    let mut credentials_event = None;
    if let Some((valid, why, message, next)) = credentials(member, now) {
        let before = conditions
            .iter()
            .find(|c| c.type_ == condition::CREDENTIALS)
            .map(|c| c.reason.clone());
        set_condition(
            &mut conditions,
            condition::CREDENTIALS,
            valid,
            why,
            message.clone(),
            generation,
            now,
        );
        if before.as_deref() != Some(why) {
            credentials_event = Some((!valid, why, message));
        }
        if let Some(next) = next {
            recheck = recheck.min(next + SignedDuration::from_secs(1));
        }
    }
    let changed = essence(&conditions) != essence(&status.conditions);
    let recheck = Duration::try_from(recheck).unwrap_or(Duration::from_secs(1));
    Decision {
        credentials_event,
        event: (changed && was_ready != ready).then_some((!ready, why, message)),
        conditions: changed.then_some(conditions),
        recheck: recheck.max(Duration::from_secs(1)),
    }
}

/// How long before its expiry a token counts as expiring: a fifth of its lifetime (as
/// the kubelet renews projected tokens at 80%), at most a week.
fn warn_before(issued: Timestamp, expires: Timestamp) -> SignedDuration {
    let lifetime = expires.duration_since(issued);
    (lifetime / 5).min(SignedDuration::from_hours(24 * 7))
}

/// `Credentials` from the token lifetime the agent reports: (valid, reason, message, when
/// it next changes). None until an agent reports a token that expires.
fn credentials(
    member: &MemberCluster,
    now: Timestamp,
) -> Option<(bool, &'static str, String, Option<SignedDuration>)> {
    let status = member.status.as_ref()?;
    let expires = status.credentials_expire.as_ref()?.0;
    let issued = status.credentials_issued.as_ref().map_or(expires, |t| t.0);
    let left = expires.duration_since(now);
    let warn = warn_before(issued, expires);
    let rotate = format!(
        "run `starling-operator member rotate-token {}` against the hub, apply the Secret it \
         writes on the member and restart the agent",
        member.name_any()
    );
    Some(if left <= SignedDuration::ZERO {
        let message = format!("the agent's hub token expired at {expires}: {rotate}");
        (false, reason::CREDENTIALS_EXPIRED, message, None)
    } else if left <= warn {
        let hours = left.as_secs() / 3600;
        let message = format!("the agent's hub token expires at {expires} (in {hours}h): {rotate}");
        (false, reason::CREDENTIALS_EXPIRING, message, Some(left))
    } else {
        let message = format!("the agent's hub token expires at {expires}");
        (true, reason::CREDENTIALS_VALID, message, Some(left - warn))
    })
}

#[tracing::instrument(skip_all, fields(member = %member.name_any()))]
pub async fn reconcile(member: Arc<MemberCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let mut timer = ctx.metrics.reconcile("membercluster");
    let result = converge(&member, &ctx).await;
    match &result {
        Ok(_) => ctx.backoff.succeeded(member.as_ref()),
        Err(_) => timer.failed(),
    }
    result
}

async fn converge(member: &MemberCluster, ctx: &Context) -> Result<Action, Error> {
    if member.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    apply_access(ctx, member).await?;
    let grace = Duration::from_secs(ctx.config.heartbeat_grace);
    let decision = decide(member, grace, Timestamp::now());
    if let Some(conditions) = decision.conditions {
        let api: Api<MemberCluster> = Api::all(ctx.client.clone());
        let patch = json!({
            "apiVersion": "starling.dev/v1alpha1", "kind": "MemberCluster",
            "status": {"conditions": conditions},
        });
        let params = PatchParams::apply(MANAGER).force();
        api.patch_status(&member.name_any(), &params, &Patch::Apply(patch))
            .await?;
    }
    if let Some((warning, why, message)) = decision.event {
        publish(ctx, member, warning, why, &message, "Heartbeat").await;
    }
    if let Some((warning, why, message)) = decision.credentials_event {
        publish(ctx, member, warning, why, &message, "Credentials").await;
    }
    // Heartbeats are status writes, which wake this controller; the requeue catches the
    // heartbeat that never comes.
    Ok(Action::requeue(decision.recheck))
}

/// Namespace, ServiceAccount and RBAC: written when they differ from what this replica
/// applied, and re-applied now and then so a deleted Role heals.
async fn apply_access(ctx: &Context, member: &MemberCluster) -> Result<(), Error> {
    let access = member_access(member);
    let ns = access.namespace.name_any();
    let c = &ctx.client;
    ctx.apply_changed(&Api::all(c.clone()), None, &access.namespace)
        .await?;
    ctx.apply_changed(
        &Api::namespaced(c.clone(), &ns),
        None,
        &access.service_account,
    )
    .await?;
    ctx.apply_changed(&Api::namespaced(c.clone(), &ns), None, &access.role)
        .await?;
    ctx.apply_changed(&Api::namespaced(c.clone(), &ns), None, &access.role_binding)
        .await?;
    ctx.apply_changed(&Api::all(c.clone()), None, &access.cluster_role)
        .await?;
    ctx.apply_changed(&Api::all(c.clone()), None, &access.cluster_role_binding)
        .await?;
    Ok(())
}

pub fn error_policy(member: Arc<MemberCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(member = %member.name_any(), %error, "reconcile failed");
    Action::requeue(ctx.backoff.failed(member.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const GRACE: Duration = Duration::from_secs(30);

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn member(heartbeat: Option<i64>, ready: Option<(&str, &str)>) -> MemberCluster {
        let mut m: MemberCluster = serde_json::from_value(json!({
            "apiVersion": "starling.dev/v1alpha1", "kind": "MemberCluster",
            "metadata": {"name": "home-lagos", "generation": 1},
            "spec": {"tier": "home", "region": "lagos", "bandwidth": {"uploadMbps": 20, "downloadMbps": 20}},
        }))
        .unwrap();
        let mut status = crate::api::MemberClusterStatus {
            last_heartbeat: heartbeat.map(|s| Time(at(s))),
            ..Default::default()
        };
        if let Some((s, r)) = ready {
            set_condition(
                &mut status.conditions,
                "Ready",
                s == "True",
                r,
                "",
                Some(1),
                at(0),
            );
        }
        m.status = Some(status);
        m
    }

    #[test]
    fn a_member_whose_agent_never_called_is_not_ready_and_says_so() {
        let d = decide(&member(None, None), GRACE, at(100));
        let conditions = d.conditions.unwrap();
        assert_eq!(conditions[0].status, "False");
        assert_eq!(conditions[0].reason, "AgentNotConnected");
        assert_eq!(d.event, None, "it was never Ready, so nothing flipped");
    }

    #[test]
    fn a_fresh_heartbeat_makes_a_member_ready_with_an_event() {
        let d = decide(&member(Some(95), None), GRACE, at(100));
        assert_eq!(d.conditions.unwrap()[0].reason, "HeartbeatReceived");
        assert_eq!(d.event.unwrap().1, "HeartbeatReceived");
        // Looked at again just after the heartbeat would expire.
        assert_eq!(d.recheck, Duration::from_secs(26));
    }

    #[test]
    fn another_heartbeat_of_a_ready_member_writes_nothing() {
        let ready = member(Some(99), Some(("True", "HeartbeatReceived")));
        let d = decide(&ready, GRACE, at(100));
        assert_eq!(d.conditions, None);
        assert_eq!(d.event, None);
    }

    #[test]
    fn a_missed_heartbeat_turns_a_ready_member_not_ready_with_a_warning() {
        let ready = member(Some(50), Some(("True", "HeartbeatReceived")));
        let d = decide(&ready, GRACE, at(100));
        let conditions = d.conditions.unwrap();
        assert_eq!(
            (conditions[0].status.as_str(), conditions[0].reason.as_str()),
            ("False", "HeartbeatMissed")
        );
        assert!(
            conditions[0].message.contains("50s"),
            "{}",
            conditions[0].message
        );
        let (warning, why, _) = d.event.unwrap();
        assert!(warning);
        assert_eq!(why, "HeartbeatMissed");
    }

    #[test]
    fn credentials_warn_a_fifth_of_a_tokens_life_ahead_at_most_a_week_then_expire() {
        let hour = 3600;
        let cases = [
            (
                "a 100-hour token, 90 hours left",
                100,
                10,
                ("True", "CredentialsValid"),
                None,
            ),
            (
                "a 100-hour token, 19 hours left",
                100,
                81,
                ("False", "CredentialsExpiring"),
                Some(true),
            ),
            (
                "a 30-day token, 145 hours left",
                720,
                575,
                ("True", "CredentialsValid"),
                None,
            ),
            (
                "a 30-day token, 143 hours left",
                720,
                577,
                ("False", "CredentialsExpiring"),
                Some(true),
            ),
            (
                "a year's token warns a week ahead",
                8760,
                8760 - 169,
                ("True", "CredentialsValid"),
                None,
            ),
            (
                "a year's token, 167 hours left",
                8760,
                8760 - 167,
                ("False", "CredentialsExpiring"),
                Some(true),
            ),
            (
                "an expired token",
                100,
                101,
                ("False", "CredentialsExpired"),
                Some(true),
            ),
        ];
        for (name, lifetime, age, (status, why), warning) in cases {
            let now = at(age * hour);
            let mut m = member(Some(age * hour - 1), Some(("True", "HeartbeatReceived")));
            let st = m.status.as_mut().unwrap();
            st.credentials_issued = Some(Time(at(0)));
            st.credentials_expire = Some(Time(at(lifetime * hour)));
            let d = decide(&m, GRACE, now);
            let conditions = d.conditions.expect(name);
            let c = conditions
                .iter()
                .find(|c| c.type_ == "Credentials")
                .expect(name);
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                (status, why),
                "{name}"
            );
            if status == "False" {
                assert!(
                    c.message.contains("member rotate-token home-lagos"),
                    "{name}: {}",
                    c.message
                );
            }
            let event = d.credentials_event.expect(name);
            assert_eq!(Some(event.0), warning.or(Some(false)), "{name}");
            // Told once: the same finding again writes and announces nothing.
            let mut again = m.clone();
            again.status.as_mut().unwrap().conditions = conditions;
            let d = decide(&again, GRACE, now);
            assert_eq!(d.conditions, None, "{name}");
            assert_eq!(d.credentials_event, None, "{name}");
        }
    }

    #[test]
    fn a_member_whose_agent_reports_no_token_expiry_has_no_credentials_condition() {
        let d = decide(&member(Some(95), None), GRACE, at(100));
        assert!(
            d.conditions
                .unwrap()
                .iter()
                .all(|c| c.type_ != "Credentials")
        );
        assert_eq!(d.credentials_event, None);
    }

    #[test]
    fn a_member_back_from_the_dark_is_ready_again() {
        let dark = member(Some(99), Some(("False", "HeartbeatMissed")));
        let d = decide(&dark, GRACE, at(100));
        assert_eq!(d.conditions.unwrap()[0].status, "True");
        assert!(!d.event.unwrap().0);
    }
}
