//! What the operator's own identities may do: the hub controllers' ServiceAccount on the
//! hub and each agent's ServiceAccount on its member cluster.
//!
//! These tables are the one definition of those permissions. The Helm charts grant
//! exactly them (a test renders the charts and compares), the local federation runs the
//! hub and the agents under them, and a test holds them to what a run's whole life uses:
//! nothing refused, nothing granted that is never used. Objects created by server-side
//! apply need `create` as well as `patch`, as a real API server checks both when an apply
//! creates.
//!
//! What a member's agent may do *on the hub* is not here: the operator grants it per
//! member, scoped to that member's namespace (see `hub::children::member_access`).

use k8s_openapi::api::rbac::v1::PolicyRule;

/// One rule: these verbs on these resources of one API group.
#[derive(Clone, Copy, Debug)]
pub struct Grant {
    pub group: &'static str,
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
}

impl Grant {
    pub fn rule(&self) -> PolicyRule {
        PolicyRule {
            api_groups: Some(vec![self.group.into()]),
            resources: Some(self.resources.iter().map(|r| r.to_string()).collect()),
            verbs: self.verbs.iter().map(|v| v.to_string()).collect(),
            resource_names: None,
            non_resource_urls: None,
        }
    }
}

const WATCH: &[&str] = &["list", "watch"];

/// The hub controllers, in every namespace (runs live in any namespace, members in their
/// own): a ClusterRole.
pub const HUB: &[Grant] = &[
    Grant {
        group: "starling.dev",
        resources: &["trainingruns"],
        verbs: &["list", "watch", "patch"],
    },
    Grant {
        group: "starling.dev",
        resources: &["trainingruns/status", "memberclusters/status"],
        verbs: &["patch"],
    },
    Grant {
        group: "starling.dev",
        resources: &["memberclusters"],
        verbs: WATCH,
    },
    // The agent's Role on the hub grants these; RBAC lets the operator grant only what
    // it holds itself.
    Grant {
        group: "starling.dev",
        resources: &["trainergroups"],
        verbs: &["list", "watch", "create", "patch", "delete"],
    },
    Grant {
        group: "starling.dev",
        resources: &["trainergroups/status"],
        verbs: &["patch"],
    },
    // `get`: only the certificate Secret a run names (`spec.exchange.tls.secretName`),
    // once; every other Secret it reads is one it made, from its cache.
    Grant {
        group: "",
        resources: &["secrets"],
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
    Grant {
        group: "",
        resources: &["services"],
        verbs: &["list", "watch", "create", "patch"],
    },
    Grant {
        group: "apps",
        resources: &["deployments"],
        verbs: &["list", "watch", "create", "patch"],
    },
    Grant {
        group: "",
        resources: &["pods"],
        verbs: WATCH,
    },
    Grant {
        group: "batch",
        resources: &["jobs"],
        verbs: &["create", "patch"],
    },
    // Each member's namespace, its agent's ServiceAccount and RBAC.
    Grant {
        group: "",
        resources: &["namespaces", "serviceaccounts"],
        verbs: &["create", "patch"],
    },
    Grant {
        group: "rbac.authorization.k8s.io",
        resources: &[
            "roles",
            "rolebindings",
            "clusterroles",
            "clusterrolebindings",
        ],
        verbs: &["create", "patch"],
    },
    Grant {
        group: "events.k8s.io",
        resources: &["events"],
        verbs: &["create", "patch"],
    },
];

/// The hub controllers' leader election, in the operator's own namespace: a Role.
pub const HUB_LEADER_ELECTION: &[Grant] = &[Grant {
    group: "coordination.k8s.io",
    resources: &["leases"],
    verbs: &["get", "create", "update"],
}];

/// A member's agent on its own cluster, cluster-wide: the nodes' GPUs, and whether its
/// trainer namespace exists (the member chart makes it; an agent that could create
/// namespaces could create any). A ClusterRole.
pub const AGENT_CLUSTER: &[Grant] = &[
    Grant {
        group: "",
        resources: &["nodes"],
        verbs: WATCH,
    },
    Grant {
        group: "",
        resources: &["namespaces"],
        verbs: &["get"],
    },
];

/// A member's agent in its trainer namespace: the trainer pods and their credentials.
/// A Role.
pub const AGENT_TRAINERS: &[Grant] = &[
    Grant {
        group: "",
        resources: &["pods"],
        verbs: &["list", "watch", "create", "delete"],
    },
    Grant {
        group: "",
        resources: &["secrets"],
        verbs: &["list", "watch", "create", "patch", "delete"],
    },
];

/// The rules of a table, as a Role or ClusterRole holds them.
pub fn rules(grants: &[Grant]) -> Vec<PolicyRule> {
    grants.iter().map(Grant::rule).collect()
}
