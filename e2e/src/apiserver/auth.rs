//! Authentication by bearer token and authorisation by the RBAC objects in the store,
//! evaluated as Kubernetes' RBAC authoriser does: Roles through RoleBindings in their
//! namespace, ClusterRoles through ClusterRoleBindings everywhere (or through a
//! RoleBinding in its namespace); `system:masters` may do anything.

use std::collections::HashMap;

use serde_json::Value;

use super::error::ApiError;
use super::store::Store;

const RBAC: &str = "rbac.authorization.k8s.io";

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    /// The user a ServiceAccount's token authenticates as.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self {
            name: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
        }
    }
}

/// Bearer tokens, who they are, and until when (bound tokens expire).
#[derive(Clone, Debug, Default)]
pub struct Tokens(HashMap<String, (User, Option<std::time::SystemTime>)>);

impl Tokens {
    pub fn insert(&mut self, token: String, user: User) {
        self.0.insert(token, (user, None));
    }

    /// A token that stops authenticating at `expires`, as TokenRequest's do.
    pub fn insert_expiring(&mut self, token: String, user: User, expires: std::time::SystemTime) {
        self.0.insert(token, (user, Some(expires)));
    }

    pub fn authenticate(&self, header: Option<&str>) -> Result<User, ApiError> {
        let now = std::time::SystemTime::now();
        header
            .and_then(|h| h.strip_prefix("Bearer "))
            .and_then(|t| self.0.get(t.trim()))
            .filter(|(_, expires)| expires.is_none_or(|e| now < e))
            .map(|(user, _)| user.clone())
            .ok_or_else(ApiError::unauthorized)
    }
}

/// What a request does, in RBAC's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: Option<String>,
    /// Empty for cluster-scoped resources and cluster-wide lists.
    pub namespace: String,
    pub name: Option<String>,
}

impl Attributes {
    /// The resource as RBAC rules name it: `pods`, `trainingruns/status`.
    pub fn resource_path(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        }
    }

    /// The 403 a real server sends for these attributes.
    pub fn forbidden(&self, user: &User) -> ApiError {
        let resource = self.resource_path();
        let qualified = if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        let object = match &self.name {
            Some(name) => format!("{qualified} \"{name}\""),
            None => qualified,
        };
        let scope = if self.namespace.is_empty() {
            "at the cluster scope".to_owned()
        } else {
            format!("in the namespace \"{}\"", self.namespace)
        };
        ApiError::forbidden(
            format!(
                "{object} is forbidden: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
                user.name, self.verb, self.group
            ),
            self.name.clone().unwrap_or_default(),
            &self.group,
            &self.resource,
        )
    }
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let any = |list: &[&str], x: &str| list.iter().any(|v| *v == "*" || *v == x);
    let resource = a.resource_path();
    let names = strings(&rule["resourceNames"]);
    any(&strings(&rule["verbs"]), &a.verb)
        && any(&strings(&rule["apiGroups"]), &a.group)
        && any(&strings(&rule["resources"]), &resource)
        && (names.is_empty() || a.name.as_deref().is_some_and(|n| names.contains(&n)))
}

fn binds(binding: &Value, user: &User) -> bool {
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| {
            let name = s["name"].as_str().unwrap_or_default();
            match s["kind"].as_str() {
                Some("User") => name == user.name,
                Some("Group") => user.groups.iter().any(|g| g == name),
                Some("ServiceAccount") => {
                    let ns = s["namespace"].as_str().unwrap_or_default();
                    user.name == format!("system:serviceaccount:{ns}:{name}")
                }
                _ => false,
            }
        })
}

/// The rules of the Role (in `namespace`) or ClusterRole a binding's `roleRef` names;
/// none if it does not exist.
fn referenced_rules(store: &Store, role_ref: &Value, namespace: &str) -> Vec<Value> {
    let (plural, ns) = match role_ref["kind"].as_str() {
        Some("ClusterRole") => ("clusterroles", ""),
        _ => ("roles", namespace),
    };
    let name = role_ref["name"].as_str().unwrap_or_default();
    store
        .get_raw(RBAC, plural, ns, name)
        .and_then(|r| r["rules"].as_array().cloned())
        .unwrap_or_default()
}

/// Whether `user` may do `a`, by the RBAC objects in `store`.
pub fn allowed(store: &Store, user: &User, a: &Attributes) -> bool {
    if user.groups.iter().any(|g| g == "system:masters") {
        return true;
    }
    let granted = |binding: &Value, namespace: &str| {
        binds(binding, user)
            && referenced_rules(store, &binding["roleRef"], namespace)
                .iter()
                .any(|rule| rule_allows(rule, a))
    };
    store
        .list_raw(RBAC, "clusterrolebindings", None)
        .iter()
        .any(|b| granted(b, ""))
        || (!a.namespace.is_empty()
            && store
                .list_raw(RBAC, "rolebindings", Some(&a.namespace))
                .iter()
                .any(|b| granted(b, &a.namespace)))
}

/// One authorisation decision, without the object's name: what a role must grant.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Decision {
    pub user: String,
    pub verb: String,
    pub group: String,
    /// The resource's plural, with `/subresource`.
    pub resource: String,
    /// Empty for cluster-scoped resources and cluster-wide requests.
    pub namespace: String,
    pub allowed: bool,
}

/// Every distinct decision the server has made, so a test can hold a role to exactly
/// what its holder used: nothing refused (missing) and nothing granted but unused (extra).
#[derive(Default)]
pub(super) struct Decisions(std::sync::Mutex<std::collections::BTreeSet<Decision>>);

impl Decisions {
    pub(super) fn record(&self, user: &User, a: &Attributes, allowed: bool) {
        let resource = a.resource_path();
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(Decision {
                user: user.name.clone(),
                verb: a.verb.clone(),
                group: a.group.clone(),
                resource,
                namespace: a.namespace.clone(),
                allowed,
            });
    }

    pub(super) fn snapshot(&self) -> Vec<Decision> {
        let set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        set.iter().cloned().collect()
    }
}

/// RBAC's escalation check: a caller may write a Role or ClusterRole only with rules it
/// holds itself, and bind a role only if it holds the role's rules, unless it has the
/// `escalate` (roles) or `bind` (bindings) verb. `rules` are those the write grants
/// (the object's own, or its `roleRef`'s), `a` the write's attributes. Every permission
/// checked is recorded, since holding it is a use of it.
pub(super) fn may_grant(
    store: &Store,
    decisions: &Decisions,
    user: &User,
    a: &Attributes,
    rules: &[Value],
) -> Result<(), ApiError> {
    let exempt_verb = if a.resource.ends_with("bindings") {
        "bind"
    } else {
        "escalate"
    };
    let exempt = Attributes {
        verb: exempt_verb.into(),
        subresource: None,
        ..a.clone()
    };
    if allowed(store, user, &exempt) {
        return Ok(());
    }
    let mut missing = vec![];
    for rule in rules {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    let (resource, subresource) = match resource.split_once('/') {
                        Some((r, sub)) => (r.to_owned(), Some(sub.to_owned())),
                        None => (resource.to_owned(), None),
                    };
                    let held = Attributes {
                        verb: verb.into(),
                        group: group.into(),
                        resource,
                        subresource,
                        namespace: a.namespace.clone(),
                        name: None,
                    };
                    let ok = allowed(store, user, &held);
                    decisions.record(user, &held, ok);
                    if !ok {
                        missing.push(format!(
                            "{{APIGroups:[\"{group}\"], Resources:[\"{}\"], Verbs:[\"{verb}\"]}}",
                            held.resource_path()
                        ));
                    }
                }
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let name = a.name.clone().unwrap_or_default();
    Err(ApiError::forbidden(
        format!(
            "{}.{RBAC} \"{name}\" is forbidden: user \"{}\" (groups={:?}) is attempting to \
             grant RBAC permissions not currently held:\n{}",
            a.resource,
            user.name,
            user.groups,
            missing.join("\n")
        ),
        name,
        RBAC,
        &a.resource,
    ))
}

/// The rules a write of an RBAC object grants: a role's own, or the role a binding
/// refers to (`None` for anything else).
pub(super) fn granted_rules(store: &Store, a: &Attributes, object: &Value) -> Option<Vec<Value>> {
    if a.group != RBAC || a.subresource.is_some() {
        return None;
    }
    match a.resource.as_str() {
        "roles" | "clusterroles" => Some(object["rules"].as_array().cloned().unwrap_or_default()),
        "rolebindings" | "clusterrolebindings" => {
            Some(referenced_rules(store, &object["roleRef"], &a.namespace))
        }
        _ => None,
    }
}

/// The verb of a request, as RBAC names it.
pub fn verb(method: &axum::http::Method, named: bool, watch: bool) -> &'static str {
    use axum::http::Method;
    match (method, named) {
        (&Method::GET, _) if watch => "watch",
        (&Method::GET, true) => "get",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn attributes(verb: &str, resource: &str, namespace: &str) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: "starling.dev".into(),
            resource: resource.into(),
            subresource: None,
            namespace: namespace.into(),
            name: Some("x".into()),
        }
    }

    #[test]
    fn rules_match_verbs_groups_resources_subresources_and_names() {
        let rule = json!({"apiGroups": ["starling.dev"], "resources": ["trainergroups",
            "trainergroups/status"], "verbs": ["get", "list", "watch", "patch"]});
        assert!(rule_allows(&rule, &attributes("get", "trainergroups", "m")));
        assert!(!rule_allows(
            &rule,
            &attributes("delete", "trainergroups", "m")
        ));
        assert!(!rule_allows(&rule, &attributes("get", "trainingruns", "m")));
        let mut status = attributes("patch", "trainergroups", "m");
        status.subresource = Some("status".into());
        assert!(rule_allows(&rule, &status));
        let named = json!({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"],
            "resourceNames": ["y"]});
        assert!(!rule_allows(
            &named,
            &attributes("get", "trainergroups", "m")
        ));
    }

    #[test]
    fn a_bound_token_authenticates_until_it_expires_and_then_is_unauthorized() {
        let mut tokens = Tokens::default();
        let user = User::service_account("starling-member-home", "agent");
        let now = std::time::SystemTime::now();
        let minute = std::time::Duration::from_secs(60);
        tokens.insert_expiring("fresh".into(), user.clone(), now + minute);
        tokens.insert_expiring("stale".into(), user.clone(), now - minute);
        assert_eq!(tokens.authenticate(Some("Bearer fresh")), Ok(user));
        assert_eq!(
            tokens.authenticate(Some("Bearer stale")).unwrap_err().code,
            401
        );
        assert_eq!(
            tokens
                .authenticate(Some("Bearer unknown"))
                .unwrap_err()
                .code,
            401
        );
    }

    #[test]
    fn forbidden_messages_read_as_a_real_servers() {
        let user = User::service_account("starling-member-home", "agent");
        let e = attributes("list", "trainingruns", "default").forbidden(&user);
        assert_eq!(e.code, 403);
        assert_eq!(
            e.message,
            "trainingruns.starling.dev \"x\" is forbidden: User \
             \"system:serviceaccount:starling-member-home:agent\" cannot list resource \
             \"trainingruns\" in API group \"starling.dev\" in the namespace \"default\""
        );
    }
}
