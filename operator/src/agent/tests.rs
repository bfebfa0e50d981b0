//! The agent's decisions as tables of named cases: each case is an observation and the
//! calls it must lead to.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use serde_json::{Value, json};

use super::decide::{Observed, Plan, Site, decide, sweep};
use super::placement::{LocalPlacement, NodeSelector, Tolerations};
use crate::api::{PeerId, TrainerGroup};

const SITE: Site<'static> = Site {
    member: "home",
    namespace: "trainers",
    placement: &LocalPlacement {
        node_selector: NodeSelector(std::collections::BTreeMap::new()),
        tolerations: Tolerations(Vec::new()),
        upload_limit_mbps: None,
        trace_env: Vec::new(),
    },
};

fn group(peers: &[u32]) -> TrainerGroup {
    let peers: Vec<PeerId> = peers.iter().map(|i| PeerId::new(*i)).collect();
    serde_json::from_value(json!({
        "apiVersion": "starling.dev/v1alpha1", "kind": "TrainerGroup",
        "metadata": {"name": "g", "namespace": "starling-member-home", "generation": 3},
        "spec": {
            "runRef": {"namespace": "default", "name": "r", "uid": "u"},
            "member": "home",
            "peers": peers,
            "template": {"image": "starling-trainer:dev", "args": ["train"],
                "uploadLimitMbps": 20},
            "exchangeEndpoint": "http://exchange:7070",
            "credentialsSecret": "g-credentials",
        },
    }))
    .unwrap()
}

/// A pod of group `g`; `phase` is `None` for one never reported on.
fn pod(peer: u32, phase: Option<&str>, deleting: bool) -> Pod {
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("g-p{peer}"), "namespace": "trainers", "uid": format!("uid-p{peer}"),
            "labels": {"app.kubernetes.io/managed-by": "starling-agent",
                "starling.dev/group": "g", "starling.dev/peer": format!("p{peer}")},
            "deletionTimestamp": deleting.then_some("2026-01-01T00:00:00Z"),
        },
        "spec": {"containers": [{"name": "trainer"}]},
        "status": {"phase": phase},
    }))
    .unwrap()
}

fn hub_secret(tokens: Value) -> Secret {
    serde_json::from_value(json!({
        "metadata": {"name": "g-credentials", "namespace": "starling-member-home"},
        "data": tokens,
    }))
    .unwrap()
}

/// The local copy of the credentials as the agent writes it, with `tokens` as data.
fn local_secret(tokens: Value, extra_labels: Value) -> Secret {
    let mut labels = json!({"app.kubernetes.io/managed-by": "starling-agent",
        "starling.dev/group": "g", "starling.dev/member": "home"});
    if let (Some(l), Some(extra)) = (labels.as_object_mut(), extra_labels.as_object()) {
        l.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "metadata": {"name": "g-credentials", "namespace": "trainers", "uid": "uid-s",
            "labels": labels},
        "type": "Opaque", "data": tokens,
    }))
    .unwrap()
}

/// `cGVlci0w` is base64 for `peer-0`.
fn tokens() -> Value {
    json!({"p0": "cGVlci0w"})
}

/// An observation of group `g` with the given peers, its hub credentials and the local
/// copy both holding [`tokens`], and `pods`; its status is what those pods report, so a
/// case that wants a status difference says so.
fn observed(peers: &[u32], pods: Vec<Pod>) -> Observed {
    let mut observed = Observed {
        group: Arc::new(group(peers)),
        credentials: Some(Arc::new(hub_secret(tokens()))),
        pods: pods.into_iter().map(Arc::new).collect(),
        secret: Some(Arc::new(local_secret(tokens(), json!({})))),
    };
    let reported = decide(&observed, &SITE).status;
    let mut group = (*observed.group).clone();
    group.status = reported.or(group.status);
    observed.group = Arc::new(group);
    observed
}

/// The calls a plan leads to, by name.
#[derive(Debug, PartialEq)]
struct Calls {
    create: Vec<String>,
    delete: Vec<String>,
    secret: bool,
    status: bool,
}

fn calls(plan: &Plan) -> Calls {
    Calls {
        create: plan.create.iter().map(|p| p.name_any()).collect(),
        delete: plan.delete.iter().map(|d| d.name.clone()).collect(),
        secret: plan.secret.is_some(),
        status: plan.status.is_some(),
    }
}

fn expect(create: &[&str], delete: &[&str], secret: bool, status: bool) -> Calls {
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect();
    Calls {
        create: names(create),
        delete: names(delete),
        secret,
        status,
    }
}

fn without_status(mut observed: Observed) -> Observed {
    let mut group = (*observed.group).clone();
    group.status = None;
    observed.group = Arc::new(group);
    observed
}

fn pod_cases() -> Vec<(&'static str, Observed, Calls)> {
    let running = |p| pod(p, Some("Running"), false);
    vec![
        (
            "a running group with nothing changed needs no calls",
            observed(&[0, 1], vec![running(0), running(1)]),
            expect(&[], &[], false, false),
        ),
        (
            "a missing pod is created",
            observed(&[0, 1], vec![running(0)]),
            expect(&["g-p1"], &[], false, false),
        ),
        (
            "a failed pod is deleted, to be created afresh once it is gone",
            observed(&[0, 1], vec![running(0), pod(1, Some("Failed"), false)]),
            expect(&[], &["g-p1"], false, false),
        ),
        (
            "a pod being deleted is not re-created until it is gone",
            observed(&[0, 1], vec![running(0), pod(1, Some("Running"), true)]),
            expect(&[], &[], false, false),
        ),
        (
            "a failed pod already being deleted is not deleted again",
            observed(&[0], vec![pod(0, Some("Failed"), true)]),
            expect(&[], &[], false, false),
        ),
        (
            "pods of peers no longer in the group are deleted while the others stay",
            observed(&[0, 2], vec![running(0), running(1), running(2)]),
            expect(&[], &["g-p1"], false, false),
        ),
        (
            "every peer of a new group gets a pod",
            observed(&[0, 1, 2], vec![]),
            expect(&["g-p0", "g-p1", "g-p2"], &[], false, false),
        ),
    ]
}

fn secret_and_status_cases() -> Vec<(&'static str, Observed, Calls)> {
    let running = |p| pod(p, Some("Running"), false);
    let with = |mut o: Observed, f: &dyn Fn(&mut Observed)| {
        f(&mut o);
        o
    };
    vec![
        (
            "pods wait for the group's credentials to reach the hub cache",
            with(observed(&[0], vec![]), &|o| o.credentials = None),
            expect(&[], &[], false, false),
        ),
        (
            "a missing local Secret is written before the pods that read it",
            with(observed(&[0], vec![]), &|o| o.secret = None),
            expect(&["g-p0"], &[], true, false),
        ),
        (
            "an unchanged Secret is not rewritten",
            observed(&[0], vec![running(0)]),
            expect(&[], &[], false, false),
        ),
        (
            "a changed token is rewritten",
            with(observed(&[0], vec![running(0)]), &|o| {
                o.credentials = Some(Arc::new(hub_secret(json!({"p0": "bmV3"}))))
            }),
            expect(&[], &[], true, false),
        ),
        (
            "labels others added to the local Secret are no difference",
            with(observed(&[0], vec![running(0)]), &|o| {
                o.secret = Some(Arc::new(local_secret(tokens(), json!({"team": "x"}))))
            }),
            expect(&[], &[], false, false),
        ),
        (
            "an unchanged status is not written",
            observed(&[0], vec![running(0)]),
            expect(&[], &[], false, false),
        ),
        (
            "a status the hub has not seen is written",
            without_status(observed(&[0], vec![running(0)])),
            expect(&[], &[], false, true),
        ),
        (
            "a pod's new phase is written to the status",
            with(observed(&[0], vec![pod(0, Some("Pending"), false)]), &|o| {
                o.pods = vec![Arc::new(running(0))]
            }),
            expect(&[], &[], false, true),
        ),
    ]
}

#[test]
fn the_agent_decides_only_what_differs() {
    for (name, observed, want) in pod_cases().into_iter().chain(secret_and_status_cases()) {
        assert_eq!(calls(&decide(&observed, &SITE)), want, "{name}");
    }
}

#[test]
fn a_pod_made_from_another_template_is_replaced_and_a_current_one_kept() {
    let made: Vec<Pod> = decide(&observed(&[0, 1], vec![]), &SITE)
        .create
        .into_iter()
        .map(|mut pod| {
            pod.metadata.uid = Some(format!("uid-{}", pod.name_any()));
            pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
                phase: Some("Running".into()),
                ..Default::default()
            });
            pod
        })
        .collect();
    let current = observed(&[0, 1], made.clone());
    assert_eq!(
        calls(&decide(&current, &SITE)),
        expect(&[], &[], false, false)
    );
    let mut group = (*current.group).clone();
    group.spec.template.image = "starling-trainer:v2".into();
    let changed = Observed {
        group: Arc::new(group),
        ..current
    };
    let plan = decide(&changed, &SITE);
    assert_eq!(calls(&plan), expect(&[], &["g-p0", "g-p1"], false, false));
    assert_eq!(plan.delete[0].uid.as_deref(), Some("uid-g-p0"));
}

#[test]
fn deletions_are_pinned_to_the_observed_pod() {
    let observed = observed(&[0], vec![pod(0, Some("Failed"), false)]);
    let plan = decide(&observed, &SITE);
    assert_eq!(plan.delete[0].uid.as_deref(), Some("uid-p0"));
}

#[test]
fn the_status_counts_the_pods_of_wanted_peers() {
    let observed = without_status(observed(
        &[0, 1, 2],
        vec![
            pod(0, Some("Running"), false),
            pod(1, Some("Failed"), false),
            pod(3, Some("Running"), false),
        ],
    ));
    let status = decide(&observed, &SITE).status.unwrap();
    assert_eq!((status.replicas, status.running, status.ready), (3, 1, 1));
    assert_eq!(status.failed, 1);
    let phases: Vec<_> = status.pods.iter().map(|p| p.phase.as_str()).collect();
    assert_eq!(phases, ["Running", "Failed", "Pending"]);
    assert_eq!(status.observed_generation, Some(3));
}

#[test]
fn a_created_pod_runs_its_peer_with_the_peer_s_token() {
    let observed = observed(&[4], vec![]);
    let pod = decide(&observed, &SITE).create.remove(0);
    let pod = serde_json::to_value(&pod).unwrap();
    assert_eq!(pod["metadata"]["name"], "g-p4");
    assert_eq!(pod["metadata"]["namespace"], "trainers");
    assert_eq!(pod["metadata"]["labels"]["starling.dev/peer"], "p4");
    assert_eq!(pod["metadata"]["labels"]["starling.dev/member"], "home");
    assert_eq!(pod["spec"]["restartPolicy"], "OnFailure");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["image"], "starling-trainer:dev");
    let env = |name: &str| {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(env("STARLING_EXCHANGE")["value"], "http://exchange:7070");
    assert_eq!(
        env("STARLING_TOKEN")["valueFrom"]["secretKeyRef"],
        json!({"name": "g-credentials", "key": "p4"})
    );
    assert_eq!(env("STARLING_BANDWIDTH_MBPS")["value"], "20");
    assert_eq!(env("STARLING_DEVICE")["value"], "cpu");
    assert!(
        !container["env"].to_string().contains("STARLING_TLS_CA"),
        "plain text"
    );
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    // What the member's trainer namespace enforces (Pod Security `restricted`) admits it,
    // and it writes only to its emptyDir working directory and /tmp.
    let spec: k8s_openapi::api::core::v1::PodSpec =
        serde_json::from_value(pod["spec"].clone()).unwrap();
    assert_eq!(
        crate::k8s::restricted_violations(&spec),
        Vec::<String>::new()
    );
    assert_eq!(container["workingDir"], crate::k8s::WORKDIR);
}

#[test]
fn a_peer_of_a_tls_exchange_gets_the_runs_ca_from_its_local_secret() {
    let mut observed = observed(&[4], vec![]);
    Arc::make_mut(&mut observed.group).spec.exchange_endpoint = "https://exchange:7070".into();
    let pod = decide(&observed, &SITE).create.remove(0);
    let env = pod.spec.unwrap().containers[0].env.clone().unwrap();
    let ca = env.iter().find(|e| e.name == "STARLING_TLS_CA").unwrap();
    let from = ca.value_from.clone().unwrap().secret_key_ref.unwrap();
    assert_eq!(
        (from.name.as_str(), from.key.as_str()),
        ("g-credentials", "ca.crt")
    );
}

#[test]
fn a_pod_that_asks_for_a_gpu_trains_on_cuda_unless_its_template_says_otherwise() {
    let device_of = |template: Value| {
        let mut observed = observed(&[0], vec![]);
        let mut g = (*observed.group).clone();
        g.spec.template = serde_json::from_value(template).unwrap();
        observed.group = Arc::new(g);
        let pod = serde_json::to_value(decide(&observed, &SITE).create.remove(0)).unwrap();
        let env = pod["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .clone();
        let devices: Vec<Value> = env
            .iter()
            .filter(|e| e["name"] == "STARLING_DEVICE")
            .map(|e| e["value"].clone())
            .collect();
        assert_eq!(devices.len(), 1, "one STARLING_DEVICE: {devices:?}");
        devices[0].as_str().unwrap().to_owned()
    };
    let image = json!("starling-trainer:dev");
    let gpu = json!({"image": image, "resources": {"limits": {"nvidia.com/gpu": "1"}}});
    assert_eq!(device_of(gpu), "cuda");
    let requested = json!({"image": image, "resources": {"requests": {"nvidia.com/gpu": "2"}}});
    assert_eq!(device_of(requested), "cuda");
    let none =
        json!({"image": image, "resources": {"limits": {"nvidia.com/gpu": "0", "cpu": "4"}}});
    assert_eq!(device_of(none), "cpu");
    let pinned = json!({"image": image, "resources": {"limits": {"nvidia.com/gpu": "1"}},
        "env": [{"name": "STARLING_DEVICE", "value": "cuda:1"}]});
    assert_eq!(device_of(pinned), "cuda:1");
}

fn local_objects() -> (Vec<Arc<Pod>>, Vec<Arc<Secret>>) {
    let mut other = pod(0, Some("Running"), false);
    other.metadata.name = Some("gone-p0".into());
    other
        .labels_mut()
        .insert("starling.dev/group".into(), "gone".into());
    let mut leaving = other.clone();
    leaving.metadata.name = Some("gone-p1".into());
    leaving.metadata.deletion_timestamp = pod(0, None, true).metadata.deletion_timestamp;
    let mut other_secret = local_secret(tokens(), json!({}));
    other_secret.metadata.name = Some("gone-credentials".into());
    other_secret
        .labels_mut()
        .insert("starling.dev/group".into(), "gone".into());
    (
        vec![pod(0, Some("Running"), false), other, leaving]
            .into_iter()
            .map(Arc::new)
            .collect(),
        vec![local_secret(tokens(), json!({})), other_secret]
            .into_iter()
            .map(Arc::new)
            .collect(),
    )
}

/// A name, the hub's groups (`None`: no answer), and the pods and Secrets swept.
type SweepCase<'a> = (
    &'a str,
    Option<&'a BTreeSet<String>>,
    Vec<&'a str>,
    Vec<&'a str>,
);

#[test]
fn only_what_the_hub_says_is_gone_is_swept() {
    let (pods, secrets) = local_objects();
    let hub_has_g: BTreeSet<String> = ["g".to_string()].into();
    let hub_has_none = BTreeSet::new();
    let cases: Vec<SweepCase> = vec![
        (
            "pods and Secrets of groups the hub no longer has are swept, unless already going",
            Some(&hub_has_g),
            vec!["gone-p0"],
            vec!["gone-credentials"],
        ),
        (
            "when the hub has no groups at all, everything goes",
            Some(&hub_has_none),
            vec!["g-p0", "gone-p0"],
            vec!["g-credentials", "gone-credentials"],
        ),
        (
            "nothing is swept when the hub did not answer",
            None,
            vec![],
            vec![],
        ),
    ];
    for (name, groups, want_pods, want_secrets) in cases {
        let swept = sweep(groups, &pods, &secrets);
        let got_pods: Vec<&str> = swept.pods.iter().map(|d| d.name.as_str()).collect();
        let got_secrets: Vec<&str> = swept.secrets.iter().map(|d| d.name.as_str()).collect();
        assert_eq!((got_pods, got_secrets), (want_pods, want_secrets), "{name}");
    }
}

#[test]
fn a_trainer_serves_metrics_on_its_pod_ip_and_exports_traces_where_its_agent_does() {
    let placement = LocalPlacement {
        trace_env: vec![crate::k8s::env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://collector:4317",
        )],
        ..LocalPlacement::default()
    };
    let site = Site {
        placement: &placement,
        ..SITE
    };
    let pod =
        serde_json::to_value(decide(&observed(&[0], vec![]), &site).create.remove(0)).unwrap();
    let container = &pod["spec"]["containers"][0];
    let value = |name: &str| {
        let env = container["env"].as_array().unwrap();
        let var = env.iter().find(|e| e["name"] == name);
        var.map(|e| e["value"].clone())
    };
    assert_eq!(
        value("OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some(json!("http://collector:4317"))
    );
    assert_eq!(
        value("STARLING_METRICS_LISTEN"),
        Some(json!("$(POD_IP):9090"))
    );
    assert_eq!(
        container["ports"],
        json!([{"name": "metrics", "containerPort": 9090}])
    );
}
