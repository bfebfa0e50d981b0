//! The columns a real API server prints for the built-in kinds (its "table convertors"):
//! `kubectl get pods` shows READY, STATUS, RESTARTS, AGE (and IP, NODE with `-o wide`),
//! events LAST SEEN, TYPE, REASON, OBJECT, MESSAGE, and so on. Custom resources take
//! their columns from the CRD instead (see `table`).

use serde_json::{Value, json};

/// One column: its header, type, whether only `-o wide` shows it (priority 1), and how a
/// cell is made from the object.
pub struct Column {
    pub name: &'static str,
    pub kind: &'static str,
    pub priority: i64,
    pub value: fn(&Value) -> Value,
}

const fn col(name: &'static str, kind: &'static str, value: fn(&Value) -> Value) -> Column {
    Column {
        name,
        kind,
        priority: 0,
        value,
    }
}

const fn wide(name: &'static str, value: fn(&Value) -> Value) -> Column {
    Column {
        name,
        kind: "string",
        priority: 1,
        value,
    }
}

fn name(o: &Value) -> Value {
    o["metadata"]["name"].clone()
}

/// `5s`, `3m`, `2h`, `4d`: how kubectl shows a timestamp's age.
pub fn age(timestamp: &str) -> String {
    let Ok(then) = chrono::DateTime::parse_from_rfc3339(timestamp) else {
        return "<invalid>".into();
    };
    let secs = (chrono::Utc::now() - then.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn created(o: &Value) -> Value {
    o["metadata"]["creationTimestamp"]
        .as_str()
        .map_or(Value::Null, |t| json!(age(t)))
}

fn or_none(v: &Value) -> Value {
    match v.as_str() {
        Some(s) if !s.is_empty() => json!(s),
        _ => json!("<none>"),
    }
}

fn count(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn pod_ready(o: &Value) -> Value {
    let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
    let ready = o["status"]["containerStatuses"]
        .as_array()
        .map_or(0, |s| s.iter().filter(|c| c["ready"] == true).count());
    json!(format!("{ready}/{total}"))
}

/// What kubectl shows as a pod's status: Terminating, a container's waiting or
/// terminated reason (CrashLoopBackOff, Completed, Error), else the phase.
fn pod_status(o: &Value) -> Value {
    if o["metadata"]["deletionTimestamp"].is_string() {
        return json!("Terminating");
    }
    let statuses = o["status"]["containerStatuses"].as_array();
    let reason = statuses.into_iter().flatten().find_map(|c| {
        let state = &c["state"];
        state["waiting"]["reason"]
            .as_str()
            .or_else(|| state["terminated"]["reason"].as_str())
            .filter(|r| !r.is_empty())
    });
    json!(
        reason
            .or(o["status"]["phase"].as_str())
            .unwrap_or("Pending")
    )
}

fn pod_restarts(o: &Value) -> Value {
    let restarts: i64 = o["status"]["containerStatuses"]
        .as_array()
        .map_or(0, |s| s.iter().map(|c| count(&c["restartCount"])).sum());
    json!(restarts)
}

fn event_last_seen(o: &Value) -> Value {
    let when = ["lastTimestamp", "eventTime", "firstTimestamp"]
        .iter()
        .find_map(|k| o[*k].as_str())
        .or(o["metadata"]["creationTimestamp"].as_str());
    when.map_or(Value::Null, |t| json!(age(t)))
}

fn event_object(o: &Value) -> Value {
    let object = &o["involvedObject"];
    let kind = object["kind"].as_str().unwrap_or_default().to_lowercase();
    json!(format!(
        "{kind}/{}",
        object["name"].as_str().unwrap_or_default()
    ))
}

fn replicas_ready(o: &Value) -> Value {
    let want = o["spec"]["replicas"].as_i64().unwrap_or(1);
    json!(format!("{}/{want}", count(&o["status"]["readyReplicas"])))
}

fn containers(o: &Value, field: &str) -> Value {
    let list: Vec<&str> = o["spec"]["template"]["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c[field].as_str())
        .collect();
    json!(list.join(","))
}

fn selector(map: &Value) -> Value {
    let pairs: Vec<String> = map
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    if pairs.is_empty() {
        json!("<none>")
    } else {
        json!(pairs.join(","))
    }
}

fn service_external_ip(o: &Value) -> Value {
    let ingress: Vec<&str> = o["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().or(i["hostname"].as_str()))
        .collect();
    match (o["spec"]["type"].as_str(), ingress.is_empty()) {
        (_, false) => json!(ingress.join(",")),
        (Some("LoadBalancer"), true) => json!("<pending>"),
        _ => json!("<none>"),
    }
}

fn service_ports(o: &Value) -> Value {
    let ports: Vec<String> = o["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let protocol = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_i64() {
                Some(node) => format!("{}:{node}/{protocol}", p["port"]),
                None => format!("{}/{protocol}", p["port"]),
            }
        })
        .collect();
    if ports.is_empty() {
        json!("<none>")
    } else {
        json!(ports.join(","))
    }
}

fn node_status(o: &Value) -> Value {
    let ready = o["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    json!(if ready { "Ready" } else { "NotReady" })
}

fn node_roles(o: &Value) -> Value {
    let roles: Vec<&str> = o["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
        .collect();
    or_none(&json!(roles.join(",")))
}

fn job_status(o: &Value) -> Value {
    let conditions = o["status"]["conditions"].as_array();
    let holds = |t: &str| {
        conditions
            .into_iter()
            .flatten()
            .any(|c| c["type"] == t && c["status"] == "True")
    };
    json!(if holds("Complete") {
        "Complete"
    } else if holds("Failed") {
        "Failed"
    } else {
        "Running"
    })
}

fn job_completions(o: &Value) -> Value {
    let want = o["spec"]["completions"].as_i64().unwrap_or(1);
    json!(format!("{}/{want}", count(&o["status"]["succeeded"])))
}

/// The wide columns of a kind with a pod template: its containers, their images, and
/// the pods it selects.
fn template_columns() -> [Column; 3] {
    [
        wide("Containers", |o| containers(o, "name")),
        wide("Images", |o| containers(o, "image")),
        wide("Selector", |o| {
            selector(&o["spec"]["selector"]["matchLabels"])
        }),
    ]
}

/// The columns of Deployments and ReplicaSets.
fn apps_columns(kind: &str) -> Option<Vec<Column>> {
    Some(match kind {
        "Deployment" => vec![
            col("Name", "string", name),
            col("Ready", "string", replicas_ready),
            col("Up-to-date", "integer", |o| {
                json!(count(&o["status"]["updatedReplicas"]))
            }),
            col("Available", "integer", |o| {
                json!(count(&o["status"]["availableReplicas"]))
            }),
            col("Age", "string", created),
        ]
        .into_iter()
        .chain(template_columns())
        .collect(),
        "ReplicaSet" => vec![
            col("Name", "string", name),
            col("Desired", "integer", |o| {
                json!(o["spec"]["replicas"].as_i64().unwrap_or(1))
            }),
            col("Current", "integer", |o| {
                json!(count(&o["status"]["replicas"]))
            }),
            col("Ready", "integer", |o| {
                json!(count(&o["status"]["readyReplicas"]))
            }),
            col("Age", "string", created),
        ]
        .into_iter()
        .chain(template_columns())
        .collect(),
        _ => return None,
    })
}

/// The columns of a built-in kind, or `None` for the kinds printed by name and age.
pub fn columns(group: &str, kind: &str) -> Option<Vec<Column>> {
    Some(match (group, kind) {
        ("", "Pod") => vec![
            col("Name", "string", name),
            col("Ready", "string", pod_ready),
            col("Status", "string", pod_status),
            col("Restarts", "integer", pod_restarts),
            col("Age", "string", created),
            wide("IP", |o| or_none(&o["status"]["podIP"])),
            wide("Node", |o| or_none(&o["spec"]["nodeName"])),
        ],
        ("", "Event") => vec![
            col("Last Seen", "string", event_last_seen),
            col("Type", "string", |o| o["type"].clone()),
            col("Reason", "string", |o| o["reason"].clone()),
            col("Object", "string", event_object),
            col("Message", "string", |o| o["message"].clone()),
            wide("Name", name),
            wide("Count", |o| json!(o["count"].as_i64().unwrap_or(1))),
        ],
        ("apps", kind) => return apps_columns(kind),
        ("", "Service") => vec![
            col("Name", "string", name),
            col("Type", "string", |o| {
                json!(o["spec"]["type"].as_str().unwrap_or("ClusterIP"))
            }),
            col("Cluster-IP", "string", |o| or_none(&o["spec"]["clusterIP"])),
            col("External-IP", "string", service_external_ip),
            col("Port(s)", "string", service_ports),
            col("Age", "string", created),
            wide("Selector", |o| selector(&o["spec"]["selector"])),
        ],
        ("", "Node") => vec![
            col("Name", "string", name),
            col("Status", "string", node_status),
            col("Roles", "string", node_roles),
            col("Age", "string", created),
            col("Version", "string", |o| {
                o["status"]["nodeInfo"]["kubeletVersion"].clone()
            }),
        ],
        ("batch", "Job") => vec![
            col("Name", "string", name),
            col("Status", "string", job_status),
            col("Completions", "string", job_completions),
            col("Age", "string", created),
        ],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(group: &str, kind: &str, o: &Value) -> Vec<(String, Value)> {
        columns(group, kind)
            .unwrap()
            .iter()
            .filter(|c| c.name != "Age" && c.name != "Last Seen")
            .map(|c| (c.name.to_owned(), (c.value)(o)))
            .collect()
    }

    fn row(pairs: &[(&str, Value)]) -> Vec<(String, Value)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn pods_print_readiness_the_reason_they_are_stuck_restarts_ip_and_node() {
        let crashing = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1",
            "containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.7", "containerStatuses": [
                {"ready": true, "restartCount": 0, "state": {"running": {}}},
                {"ready": false, "restartCount": 4,
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        assert_eq!(
            cells("", "Pod", &crashing),
            row(&[
                ("Name", json!("p")),
                ("Ready", json!("1/2")),
                ("Status", json!("CrashLoopBackOff")),
                ("Restarts", json!(4)),
                ("IP", json!("10.0.0.7")),
                ("Node", json!("n1"))
            ])
        );
        let pending = json!({"metadata": {"name": "q"}, "spec": {"containers": [{}]},
            "status": {"phase": "Pending"}});
        assert_eq!(pod_status(&pending), json!("Pending"));
        assert_eq!(or_none(&pending["status"]["podIP"]), json!("<none>"));
        let going = json!({"metadata": {"name": "r", "deletionTimestamp": "2026-01-01T00:00:00Z"}});
        assert_eq!(pod_status(&going), json!("Terminating"));
    }

    #[test]
    fn events_print_type_reason_object_and_message() {
        let e = json!({"metadata": {"name": "tr.1"}, "type": "Warning", "reason": "PeerLost",
            "involvedObject": {"kind": "TrainingRun", "name": "shakespeare"},
            "message": "peer 2 went dark", "count": 3});
        assert_eq!(
            cells("", "Event", &e),
            row(&[
                ("Type", json!("Warning")),
                ("Reason", json!("PeerLost")),
                ("Object", json!("trainingrun/shakespeare")),
                ("Message", json!("peer 2 went dark")),
                ("Name", json!("tr.1")),
                ("Count", json!(3))
            ])
        );
    }

    #[test]
    fn deployments_replica_sets_services_nodes_and_jobs_print_their_usual_columns() {
        let d = json!({"metadata": {"name": "x"}, "spec": {"replicas": 2,
            "selector": {"matchLabels": {"app": "x"}},
            "template": {"spec": {"containers": [{"name": "op", "image": "img:1"}]}}},
            "status": {"readyReplicas": 1, "updatedReplicas": 2, "availableReplicas": 1}});
        assert_eq!(
            cells("apps", "Deployment", &d),
            row(&[
                ("Name", json!("x")),
                ("Ready", json!("1/2")),
                ("Up-to-date", json!(2)),
                ("Available", json!(1)),
                ("Containers", json!("op")),
                ("Images", json!("img:1")),
                ("Selector", json!("app=x"))
            ])
        );
        let rs = json!({"metadata": {"name": "x-5f7c"}, "spec": {"replicas": 2,
            "selector": {"matchLabels": {"app": "x", "pod-template-hash": "5f7c"}},
            "template": {"spec": {"containers": [{"name": "op", "image": "img:1"}]}}},
            "status": {"replicas": 2, "readyReplicas": 1}});
        assert_eq!(
            cells("apps", "ReplicaSet", &rs),
            row(&[
                ("Name", json!("x-5f7c")),
                ("Desired", json!(2)),
                ("Current", json!(2)),
                ("Ready", json!(1)),
                ("Containers", json!("op")),
                ("Images", json!("img:1")),
                ("Selector", json!("app=x,pod-template-hash=5f7c"))
            ])
        );
        let s = json!({"metadata": {"name": "ex"}, "spec": {"type": "LoadBalancer",
            "clusterIP": "10.96.0.9", "selector": {"app": "ex"},
            "ports": [{"port": 7070, "nodePort": 30070, "protocol": "TCP"}]}});
        assert_eq!(
            cells("", "Service", &s),
            row(&[
                ("Name", json!("ex")),
                ("Type", json!("LoadBalancer")),
                ("Cluster-IP", json!("10.96.0.9")),
                ("External-IP", json!("<pending>")),
                ("Port(s)", json!("7070:30070/TCP")),
                ("Selector", json!("app=ex"))
            ])
        );
        let n = json!({"metadata": {"name": "n1", "labels": {"node-role.kubernetes.io/gpu": ""}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                "nodeInfo": {"kubeletVersion": "v1.32.0"}}});
        assert_eq!(
            cells("", "Node", &n),
            row(&[
                ("Name", json!("n1")),
                ("Status", json!("Ready")),
                ("Roles", json!("gpu")),
                ("Version", json!("v1.32.0"))
            ])
        );
        let j = json!({"metadata": {"name": "eval"}, "spec": {"completions": 1},
            "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}});
        assert_eq!(
            cells("batch", "Job", &j),
            row(&[
                ("Name", json!("eval")),
                ("Status", json!("Complete")),
                ("Completions", json!("1/1"))
            ])
        );
    }
}
