//! What a member's administrator adds to every trainer pod on the member cluster: the
//! labels of its GPU nodes, the tolerations of their taints, and a cap on a home link's
//! upload. The hub cannot know these; the member chart's `trainers` values set them.
//! Trainers also export traces where the agent does.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, Toleration};

use crate::api::TrainerPodTemplate;

/// The member's own additions (flags of `starling-operator agent`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct LocalPlacement {
    /// Node labels every trainer pod must match, as `key=value,key=value`.
    #[arg(
        long = "trainer-node-selector",
        env = "STARLING_TRAINER_NODE_SELECTOR",
        value_parser = parse_selector,
        default_value = ""
    )]
    pub node_selector: NodeSelector,
    /// Tolerations every trainer pod gets, as a JSON list of Kubernetes tolerations.
    #[arg(
        long = "trainer-tolerations",
        env = "STARLING_TRAINER_TOLERATIONS",
        value_parser = parse_tolerations,
        default_value = "[]"
    )]
    pub tolerations: Tolerations,
    /// Cap on each trainer's upload in Mb/s (a home link shared with a household); the
    /// lower of this and the hub's cap applies.
    #[arg(long, env = "STARLING_UPLOAD_LIMIT_MBPS", value_parser = clap::value_parser!(u32).range(1..))]
    pub upload_limit_mbps: Option<u32>,
    /// The agent's own `OTEL_*` settings: its trainers export traces where it does (the
    /// member's collector).
    #[arg(skip = crate::k8s::trace_env())]
    pub trace_env: Vec<EnvVar>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeSelector(pub BTreeMap<String, String>);

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tolerations(pub Vec<Toleration>);

/// `key=value,key=value` (spaces around either ignored) as a node selector.
pub fn parse_selector(text: &str) -> Result<NodeSelector, String> {
    let mut selector = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        if key.trim().is_empty() {
            return Err(format!("{pair:?} has an empty key"));
        }
        selector.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    Ok(NodeSelector(selector))
}

/// A JSON list of Kubernetes tolerations.
pub fn parse_tolerations(text: &str) -> Result<Tolerations, String> {
    serde_json::from_str(text)
        .map(Tolerations)
        .map_err(|e| format!("not a JSON list of tolerations: {e}"))
}

/// Where and how fast a trainer pod runs: the hub's template with the member's additions.
#[derive(Clone, Debug, PartialEq)]
pub struct PodPlacement {
    pub node_selector: Option<BTreeMap<String, String>>,
    pub tolerations: Option<Vec<Toleration>>,
    pub upload_limit_mbps: Option<u32>,
}

impl LocalPlacement {
    /// The member's selector joins the hub's (the member's value wins on a shared key:
    /// it knows its nodes), tolerations add up, and the lower upload cap applies.
    pub fn place(&self, template: &TrainerPodTemplate) -> PodPlacement {
        let mut selector = template.node_selector.clone();
        selector.extend(self.node_selector.0.clone());
        let mut tolerations = template.tolerations.clone();
        tolerations.extend(self.tolerations.0.iter().cloned());
        let upload_limit_mbps = match (template.upload_limit_mbps, self.upload_limit_mbps) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        PodPlacement {
            node_selector: (!selector.is_empty()).then_some(selector),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            upload_limit_mbps,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn template(value: serde_json::Value) -> TrainerPodTemplate {
        let mut t = json!({"image": "trainer"});
        t.as_object_mut()
            .unwrap()
            .extend(value.as_object().unwrap().clone());
        serde_json::from_value(t).unwrap()
    }

    fn local(selector: &str, tolerations: &str, upload: Option<u32>) -> LocalPlacement {
        LocalPlacement {
            node_selector: parse_selector(selector).unwrap(),
            tolerations: parse_tolerations(tolerations).unwrap(),
            upload_limit_mbps: upload,
            trace_env: Vec::new(),
        }
    }

    #[test]
    fn the_members_additions_join_the_hubs_template() {
        let gpu_taint =
            r#"[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]"#;
        let cases = [
            (
                "nothing added leaves the template as it is",
                template(json!({"nodeSelector": {"zone": "a"}, "uploadLimitMbps": 20})),
                local("", "[]", None),
                json!({"nodeSelector": {"zone": "a"}, "tolerations": null, "upload": 20}),
            ),
            (
                "the member's selector joins the hub's and wins on a shared key",
                template(json!({"nodeSelector": {"zone": "a", "pool": "hub"}})),
                local("pool=gpu, accelerator=h100", "[]", None),
                json!({"nodeSelector": {"zone": "a", "pool": "gpu", "accelerator": "h100"},
                    "tolerations": null, "upload": null}),
            ),
            (
                "tolerations add up",
                template(json!({"tolerations": [{"key": "spot", "operator": "Exists"}]})),
                local("", gpu_taint, None),
                json!({"nodeSelector": null, "tolerations": [
                    {"key": "spot", "operator": "Exists"},
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "upload": null}),
            ),
            (
                "the lower upload cap applies",
                template(json!({"uploadLimitMbps": 50})),
                local("", "[]", Some(20)),
                json!({"nodeSelector": null, "tolerations": null, "upload": 20}),
            ),
            (
                "a member's cap applies where the hub set none",
                template(json!({})),
                local("", "[]", Some(8)),
                json!({"nodeSelector": null, "tolerations": null, "upload": 8}),
            ),
        ];
        for (name, template, local, expected) in cases {
            let placed = local.place(&template);
            let got = json!({"nodeSelector": placed.node_selector,
                "tolerations": placed.tolerations, "upload": placed.upload_limit_mbps});
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn malformed_additions_are_refused_with_what_is_wrong() {
        assert_eq!(
            parse_selector("gpu").unwrap_err(),
            "\"gpu\" is not key=value"
        );
        assert_eq!(parse_selector("=x").unwrap_err(), "\"=x\" has an empty key");
        assert!(
            parse_tolerations("{\"key\": 1}")
                .unwrap_err()
                .starts_with("not a JSON list of tolerations")
        );
    }
}
