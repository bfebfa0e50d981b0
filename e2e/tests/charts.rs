//! The Helm charts under `charts/`: they lint clean, render what a real API server accepts
//! under strict validation, grant exactly the RBAC the operator is held to, run locked
//! down, and refuse bad values with the schema's message.
//!
//! Helm is named by `STARLING_HELM` (`.ci/run` installs it; under `CI` it is required).

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, json};
use starling_e2e::apiserver::ApiServer;
use starling_operator::agent::placement;
use starling_operator::k8s::{
    AGENT, COMPONENT_EXCHANGE, LABEL_COMPONENT, LABEL_MANAGED_BY, MANAGER,
};
use starling_operator::rbac;

#[path = "common/helm.rs"]
mod helm_cli;
use helm_cli::{chart, helm, run_helm};

const NAMESPACE: &str = "starling-system";

/// `helm template` of `name` in the test namespace with `args`; the objects, or the error.
fn template(helm: &Path, name: &str, args: &[&str]) -> Result<Vec<Value>, String> {
    let path = chart(name);
    let mut all = vec!["template", name, path.to_str().unwrap(), "-n", NAMESPACE];
    all.extend_from_slice(args);
    let out = run_helm(helm, &all);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect())
}

fn with_test_values(helm: &Path, name: &str) -> Vec<Value> {
    let values = chart(name).join("ci/test-values.yaml");
    template(
        helm,
        name,
        &["-f", values.to_str().unwrap(), "--include-crds"],
    )
    .unwrap()
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = find(objects, kind);
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

/// Rules as sets, so the order a chart lists them in does not matter.
fn rule_set(rules: &Value) -> std::collections::BTreeSet<String> {
    rules
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let list = |k: &str| {
                let mut v: Vec<String> = r[k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| s.as_str().unwrap().to_owned())
                    .collect();
                v.sort();
                v.join(",")
            };
            format!(
                "{} {} {}",
                list("apiGroups"),
                list("resources"),
                list("verbs")
            )
        })
        .collect()
}

fn granted(grants: &[rbac::Grant]) -> std::collections::BTreeSet<String> {
    rule_set(&serde_json::to_value(rbac::rules(grants)).unwrap())
}

#[test]
fn both_charts_lint_clean_under_strict() {
    let Some(helm) = helm() else { return };
    for name in ["starling-hub", "starling-member"] {
        let values = chart(name).join("ci/test-values.yaml");
        let out = run_helm(
            &helm,
            &[
                "lint",
                "--strict",
                chart(name).to_str().unwrap(),
                "-f",
                values.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_charts_grant_exactly_the_rules_the_operator_is_held_to() {
    let Some(helm) = helm() else { return };
    let hub = with_test_values(&helm, "starling-hub");
    assert_eq!(
        rule_set(&one(&hub, "ClusterRole")["rules"]),
        granted(rbac::HUB)
    );
    let role = one(&hub, "Role");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    assert_eq!(rule_set(&role["rules"]), granted(rbac::HUB_LEADER_ELECTION));

    let member = with_test_values(&helm, "starling-member");
    assert_eq!(
        rule_set(&one(&member, "ClusterRole")["rules"]),
        granted(rbac::AGENT_CLUSTER)
    );
    let role = one(&member, "Role");
    assert_eq!(role["metadata"]["namespace"], "starling-trainers");
    assert_eq!(rule_set(&role["rules"]), granted(rbac::AGENT_TRAINERS));

    // Every binding binds the release's own ServiceAccount, and only it.
    for objects in [&hub, &member] {
        let account = one(objects, "ServiceAccount");
        for kind in ["ClusterRoleBinding", "RoleBinding"] {
            assert_eq!(
                one(objects, kind)["subjects"],
                json!([{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                    "namespace": NAMESPACE}])
            );
        }
        let pod = &one(objects, "Deployment")["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
    }
}

#[tokio::test]
async fn what_the_charts_render_passes_the_api_servers_strict_validation() {
    let Some(helm) = helm() else { return };
    let running = ApiServer::new().start(0).await.unwrap();
    let client = running.client();
    let release_namespace = json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NAMESPACE}});
    starling_e2e::apply(&client, &release_namespace, true)
        .await
        .unwrap();
    for name in ["starling-hub", "starling-member"] {
        let mut objects = with_test_values(&helm, name);
        // What Helm installs first: CRDs, then namespaces (its install order).
        objects.sort_by_key(|o| match o["kind"].as_str() {
            Some("CustomResourceDefinition") => 0,
            Some("Namespace") => 1,
            _ => 2,
        });
        for object in &objects {
            starling_e2e::apply(&client, object, true).await.unwrap();
        }
    }
}

#[test]
fn by_default_images_follow_the_app_version_and_pods_run_locked_down() {
    let Some(helm) = helm() else { return };
    let version = env!("CARGO_PKG_VERSION");
    let hub = template(&helm, "starling-hub", &[]).unwrap();
    let member = template(
        &helm,
        "starling-member",
        &[
            "--set",
            "member.name=cloud-eu",
            "--set",
            "hub.existingSecret=hub",
        ],
    )
    .unwrap();
    let hub_deployment = one(&hub, "Deployment");
    assert_eq!(hub_deployment["spec"]["replicas"], 2);
    let env = &hub_deployment["spec"]["template"]["spec"]["containers"][0]["env"];
    let trainer_image = env
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "STARLING_TRAINER_IMAGE")
        .unwrap();
    assert_eq!(
        trainer_image["value"],
        format!("ghcr.io/starling-dev/starling-trainer:{version}")
    );
    assert_eq!(one(&hub, "PodDisruptionBudget")["spec"]["minAvailable"], 1);
    for objects in [&hub, &member] {
        for object in objects.iter() {
            let labels = &object["metadata"]["labels"];
            for label in ["name", "instance", "version", "managed-by", "part-of"] {
                assert!(
                    labels[format!("app.kubernetes.io/{label}")].is_string(),
                    "{} {} lacks app.kubernetes.io/{label}",
                    object["kind"],
                    object["metadata"]["name"]
                );
            }
        }
        let pod = &one(objects, "Deployment")["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(
            container["image"],
            format!("ghcr.io/starling-dev/starling-operator:{version}")
        );
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
        assert!(container["resources"]["requests"]["memory"].is_string());
        assert!(container["resources"]["limits"]["memory"].is_string());
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    }
    // The trainers' namespace enforces what the agent's pods meet.
    let namespace = &one(&member, "Namespace")["metadata"]["labels"];
    assert_eq!(
        namespace["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
}

#[test]
fn the_member_charts_trainer_values_reach_the_agent_in_the_form_it_parses() {
    let Some(helm) = helm() else { return };
    let member = with_test_values(&helm, "starling-member");
    let env: Vec<&Value> = one(&member, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        ["env"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    let value = |name: &str| -> String {
        env.iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no {name}"))["value"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let selector = placement::parse_selector(&value("STARLING_TRAINER_NODE_SELECTOR")).unwrap();
    assert_eq!(
        serde_json::to_value(&selector.0).unwrap(),
        json!({"nvidia.com/gpu.present": "true"})
    );
    let tolerations = placement::parse_tolerations(&value("STARLING_TRAINER_TOLERATIONS")).unwrap();
    assert_eq!(
        serde_json::to_value(&tolerations.0).unwrap(),
        json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    );
    assert_eq!(value("STARLING_UPLOAD_LIMIT_MBPS"), "20");
    assert_eq!(value("STARLING_MEMBER"), "home-lagos");
    assert_eq!(value("STARLING_TRAINER_NAMESPACE"), "starling-trainers");
    // The hub's kubeconfig comes from the Secret named in the values, never the values.
    let volumes = &one(&member, "Deployment")["spec"]["template"]["spec"]["volumes"];
    assert_eq!(
        volumes[0]["secret"]["secretName"],
        "starling-hub-kubeconfig"
    );
}

#[test]
fn the_monitors_select_what_the_operator_labels_and_the_dashboard_ships_verbatim() {
    let Some(helm) = helm() else { return };
    let on = ["--set", "metrics.serviceMonitor.enabled=true"];
    let hub = template(
        &helm,
        "starling-hub",
        &[&on[..], &["--set", "metrics.podMonitor.enabled=true"]].concat(),
    )
    .unwrap();
    let exchanges = one(&hub, "PodMonitor");
    assert_eq!(
        exchanges["spec"]["selector"]["matchLabels"],
        json!({LABEL_COMPONENT: COMPONENT_EXCHANGE, LABEL_MANAGED_BY: MANAGER})
    );
    assert_eq!(
        exchanges["spec"]["podMetricsEndpoints"][0]["port"],
        "metrics"
    );
    assert_eq!(exchanges["spec"]["namespaceSelector"]["any"], true);
    let dashboard = one(&hub, "ConfigMap");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped = dashboard["data"]["starling.json"].as_str().unwrap();
    let file =
        std::fs::read_to_string(chart("starling-hub").join("dashboards/starling.json")).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(shipped).unwrap(),
        serde_json::from_str::<serde_json::Value>(&file).unwrap()
    );
    let off = template(
        &helm,
        "starling-hub",
        &["--set", "dashboards.enabled=false"],
    )
    .unwrap();
    assert!(find(&off, "ConfigMap").is_empty());

    let member = template(
        &helm,
        "starling-member",
        &[
            "-f",
            chart("starling-member")
                .join("ci/test-values.yaml")
                .to_str()
                .unwrap(),
            "--set",
            "metrics.podMonitor.enabled=true",
        ],
    )
    .unwrap();
    let monitors = find(&member, "PodMonitor");
    let trainers = monitors
        .iter()
        .find(|m| m["spec"]["namespaceSelector"]["matchNames"][0] == "starling-trainers")
        .expect("a PodMonitor for the trainer namespace");
    assert_eq!(
        trainers["spec"]["selector"]["matchLabels"],
        json!({LABEL_MANAGED_BY: AGENT})
    );
    assert_eq!(
        trainers["spec"]["podMetricsEndpoints"][0]["port"],
        "metrics"
    );
    assert_eq!(monitors.len(), 2, "the agent's and the trainers'");
}

#[test]
fn the_opentelemetry_values_reach_the_operator_and_the_agent_as_the_standard_variables() {
    let Some(helm) = helm() else { return };
    let test_values = chart("starling-member").join("ci/test-values.yaml");
    let set = [
        "--set",
        "opentelemetry.endpoint=http://collector.monitoring:4317",
        "--set",
        "opentelemetry.resourceAttributes=k8s.cluster.name=x",
    ];
    let hub = template(&helm, "starling-hub", &set).unwrap();
    let member_args = [&["-f", test_values.to_str().unwrap()], &set[..]].concat();
    let member = template(&helm, "starling-member", &member_args).unwrap();
    for objects in [&hub, &member] {
        let container = &one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0];
        let env = container["env"].as_array().unwrap();
        let value = |name: &str| env.iter().find(|e| e["name"] == name).map(|e| &e["value"]);
        assert_eq!(
            value("OTEL_EXPORTER_OTLP_ENDPOINT"),
            Some(&json!("http://collector.monitoring:4317"))
        );
        assert_eq!(
            value("OTEL_RESOURCE_ATTRIBUTES"),
            Some(&json!("k8s.cluster.name=x"))
        );
    }
    let plain = template(&helm, "starling-hub", &[]).unwrap();
    let env = &one(&plain, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        !env.to_string().contains("OTEL_"),
        "no endpoint, no export: {env}"
    );
    let bad = template(
        &helm,
        "starling-hub",
        &["--set", "opentelemetry.endpoint=collector:4317"],
    );
    assert!(bad.unwrap_err().contains("/opentelemetry/endpoint"));
}

#[test]
fn values_that_break_the_schema_fail_with_the_schemas_message() {
    let Some(helm) = helm() else { return };
    let cases = [
        (
            "starling-hub",
            vec!["--set", "replicaCount=0"],
            "at '/replicaCount': minimum: got 0, want 1",
        ),
        (
            "starling-hub",
            vec!["--set", "replicas=3"],
            "additional properties 'replicas' not allowed",
        ),
        (
            "starling-hub",
            vec!["--set", "metrics.serviceMonitor.interval=often"],
            "at '/metrics/serviceMonitor/interval'",
        ),
        (
            "starling-member",
            vec![
                "--set",
                "member.name=Home_Lagos",
                "--set",
                "hub.existingSecret=s",
            ],
            "at '/member/name': 'Home_Lagos' does not match pattern",
        ),
        (
            "starling-member",
            vec![
                "--set",
                "member.name=home",
                "--set",
                "hub.existingSecret=s",
                "--set",
                "trainers.uploadLimitMbps=-5",
            ],
            "at '/trainers/uploadLimitMbps': minimum: got -5, want 0",
        ),
    ];
    for (name, args, message) in cases {
        let error = template(&helm, name, &args).expect_err(message);
        assert!(
            error.contains("values don't meet the specifications of the schema"),
            "{error}"
        );
        assert!(error.contains(message), "{message} not in: {error}");
    }
}

#[test]
fn the_member_chart_names_the_value_it_is_missing() {
    let Some(helm) = helm() else { return };
    let no_secret = template(&helm, "starling-member", &["--set", "member.name=home"]);
    assert!(
        no_secret
            .unwrap_err()
            .contains("hub.existingSecret is required: a Secret with the hub's kubeconfig")
    );
    let no_name = template(&helm, "starling-member", &["--set", "hub.existingSecret=s"]);
    assert!(
        no_name
            .unwrap_err()
            .contains("member.name is required: the member's MemberCluster on the hub")
    );
}
