//! The real `kubectl` against the test API server.

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

use std::path::{Path, PathBuf};
use std::process::Command;

use starling_e2e::apiserver::{ApiServer, Running};

struct Kubectl {
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
    server: Running,
    _rt: tokio::runtime::Runtime,
}

impl Kubectl {
    fn new() -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let server = rt.block_on(ApiServer::new().start(0)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig("test")).unwrap();
        Self {
            kubeconfig,
            _dir: dir,
            server,
            _rt: rt,
        }
    }

    /// Runs kubectl; returns stdout, or stderr then stdout when `ok` is false (and asserts
    /// which).
    fn run_expecting(&self, ok: bool, args: &[&str]) -> String {
        let out = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .output()
            .expect("kubectl is installed (set KUBECTL to its path otherwise)");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert_eq!(
            out.status.success(),
            ok,
            "kubectl {args:?}\nstdout: {stdout}\nstderr: {stderr}"
        );
        if ok {
            stdout
        } else {
            format!("{stderr}{stdout}")
        }
    }

    fn dir(&self) -> &Path {
        self._dir.path()
    }

    fn run(&self, args: &[&str]) -> String {
        self.run_expecting(true, args)
    }
}

#[test]
fn kubectl_applies_gets_patches_and_deletes_starling_resources() {
    let k = Kubectl::new();
    let out = k.run(&["apply", "-f", "crds/"]);
    assert!(
        out.contains(
            "customresourcedefinition.apiextensions.k8s.io/trainingruns.starling.dev created"
        ),
        "{out}"
    );
    let out = k.run(&["apply", "-f", "crds/samples/"]);
    for line in [
        "membercluster.starling.dev/cloud-eu created",
        "membercluster.starling.dev/home-lagos created",
        "trainingrun.starling.dev/shakespeare created",
    ] {
        assert!(out.contains(line), "{out}");
    }
    // Applying again changes nothing.
    let out = k.run(&["apply", "-f", "crds/samples/"]);
    assert!(
        out.contains("trainingrun.starling.dev/shakespeare unchanged"),
        "{out}"
    );

    // Printer columns, through the short name.
    let out = k.run(&["get", "tr"]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "PHASE", "ROUND", "PEERS", "EXCLUDED", "LOSS", "RATIO", "AGE"
        ]
    );
    assert!(
        out.lines().nth(1).unwrap().starts_with("shakespeare"),
        "{out}"
    );

    let out = k.run(&["get", "mc", "home-lagos", "-o", "yaml"]);
    assert!(
        out.contains("kind: MemberCluster") && out.contains("tier: home"),
        "{out}"
    );
    assert!(
        out.contains("resourceVersion:") && out.contains("uid:"),
        "{out}"
    );

    // Status through its subresource shows in the columns.
    let out = k.run(&[
        "patch",
        "tr",
        "shakespeare",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running","round":4,"lastLoss":5.294079303741455,"loss":"5.294"}}"#,
    ]);
    assert!(
        out.contains("trainingrun.starling.dev/shakespeare patched"),
        "{out}"
    );
    let out = k.run(&["get", "tr", "shakespeare", "--no-headers"]);
    let cells: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(&cells[..3], ["shakespeare", "Running", "4"], "{out}");
    // The loss as a person reads it; the precise value stays in the status.
    assert_eq!(cells[5], "5.294", "{out}");

    // kubectl leaves validation to the server, which refuses unknown fields outright.
    let typo = k.dir().join("typo.yaml");
    std::fs::write(
        &typo,
        "apiVersion: starling.dev/v1alpha1\nkind: MemberCluster\nmetadata:\n  name: typo\n\
         spec:\n  tier: home\n  regoin: lagos\n",
    )
    .unwrap();
    let err = k.run_expecting(false, &["apply", "-f", typo.to_str().unwrap()]);
    assert!(err.contains(r#"unknown field "spec.regoin""#), "{err}");

    // Built-in kinds too: they are checked against their Kubernetes types.
    std::fs::write(
        &typo,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: typo\ndatas:\n  a: b\n",
    )
    .unwrap();
    let err = k.run_expecting(false, &["apply", "-f", typo.to_str().unwrap()]);
    assert!(err.contains(r#"unknown field "datas""#), "{err}");

    let out = k.run(&["explain", "trainingrun.spec.compression"]);
    assert!(out.contains("KIND:       TrainingRun"), "{out}");
    assert!(out.contains("valueBits"), "{out}");

    // What a restricted token may do, as kubectl auth can-i sees it.
    k.server.server.add_token(
        "viewer-token-0000",
        starling_e2e::apiserver::User {
            name: "viewer".into(),
            groups: vec!["system:authenticated".into()],
        },
    );
    let role = k.dir().join("viewer.yaml");
    std::fs::write(
        &role,
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: runs-viewer\n\
         rules:\n- apiGroups: [starling.dev]\n  resources: [trainingruns]\n  verbs: [get, list, watch]\n\
         ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: viewer\n\
         \x20 namespace: default\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n\
         \x20 name: runs-viewer\nsubjects:\n- kind: User\n  name: viewer\n",
    )
    .unwrap();
    k.run(&["apply", "-f", role.to_str().unwrap()]);
    let can = |args: &[&str]| {
        let mut all = vec!["--token", "viewer-token-0000", "auth", "can-i"];
        all.extend(args);
        let out = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
            .arg("--kubeconfig")
            .arg(&k.kubeconfig)
            .args(&all)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(can(&["list", "tr", "-n", "default"]), "yes");
    assert_eq!(can(&["delete", "tr", "-n", "default"]), "no");
    assert_eq!(can(&["list", "tr", "-n", "kube-system"]), "no");
    let err = k.run_expecting(false, &["--token", "viewer-token-0000", "get", "mc"]);
    assert!(
        err.contains(r#"User "viewer" cannot list resource "memberclusters" in API group "starling.dev" at the cluster scope"#),
        "{err}"
    );

    // Server-side apply.
    let out = k.run(&[
        "apply",
        "--server-side",
        "-f",
        "crds/samples/membercluster-cloud.yaml",
    ]);
    assert!(
        out.contains("membercluster.starling.dev/cloud-eu serverside-applied"),
        "{out}"
    );
    // kubectl hands the client-side apply's fields over to its server-side manager.
    let out = k.run(&[
        "get",
        "mc",
        "cloud-eu",
        "-o",
        "yaml",
        "--show-managed-fields",
    ]);
    assert!(
        out.contains("manager: kubectl\n") && out.contains("operation: Apply"),
        "{out}"
    );
    // A field someone else changed since is a conflict for the next apply ...
    k.run(&[
        "patch",
        "mc",
        "cloud-eu",
        "--type=merge",
        "-p",
        r#"{"spec":{"region":"eu-north"}}"#,
    ]);
    let err = k.run_expecting(
        false,
        &[
            "apply",
            "--server-side",
            "-f",
            "crds/samples/membercluster-cloud.yaml",
        ],
    );
    assert!(
        err.contains(
            r#"Apply failed with 1 conflict: conflict with "kubectl-patch" using starling.dev/v1alpha1: .spec.region"#
        ) && err.contains("--force-conflicts"),
        "{err}"
    );
    // ... which a dry run shows without changing anything ...
    let out = k.run(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "-f",
        "crds/samples/membercluster-cloud.yaml",
    ]);
    assert!(out.contains("(server dry run)"), "{out}");
    let region = || k.run(&["get", "mc", "cloud-eu", "-o", "jsonpath={.spec.region}"]);
    assert_eq!(region(), "eu-north");
    // ... as does kubectl diff (a dry run too), and forcing takes the field back.
    let out = k.run_expecting(
        false,
        &[
            "diff",
            "--server-side",
            "--force-conflicts",
            "-f",
            "crds/samples/membercluster-cloud.yaml",
        ],
    );
    assert!(
        out.contains("-  region: eu-north") && out.contains("+  region: eu-west"),
        "{out}"
    );
    k.run(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        "crds/samples/membercluster-cloud.yaml",
    ]);
    assert_eq!(region(), "eu-west");

    // CEL rules are the server's to enforce.
    let sample = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/samples/trainingrun-shakespeare.yaml"),
    )
    .unwrap();
    let tight = sample
        .replace("name: shakespeare", "name: tight")
        .replace("min: 2\n    max: 3", "min: 3\n    max: 2");
    assert_ne!(tight, sample);
    std::fs::write(&typo, tight).unwrap();
    let err = k.run_expecting(false, &["apply", "-f", typo.to_str().unwrap()]);
    assert!(
        err.contains(r#"spec.peers: Invalid value: "object": min must not exceed max"#),
        "{err}"
    );

    // kubectl create sends protobuf for the kinds it makes itself.
    let out = k.run(&["create", "namespace", "runs"]);
    assert!(out.contains("namespace/runs created"), "{out}");
    k.run(&[
        "create",
        "secret",
        "generic",
        "hf-token",
        "-n",
        "runs",
        "--from-literal=token=hf_example",
    ]);
    let token = k.run(&[
        "get",
        "secret",
        "hf-token",
        "-n",
        "runs",
        "-o",
        "jsonpath={.data.token}",
    ]);
    assert_eq!(token, "aGZfZXhhbXBsZQ==", "base64 of hf_example");
    let err = k.run_expecting(false, &["create", "deployment", "web", "--image=nginx"]);
    assert!(
        err.contains("Deployment in protobuf is not supported by this server"),
        "{err}"
    );

    // A finalizer holds deletion until it is removed.
    k.run(&[
        "patch",
        "tr",
        "shakespeare",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["starling.dev/cleanup"]}}"#,
    ]);
    let out = k.run(&["delete", "tr", "shakespeare", "--wait=false"]);
    assert!(out.contains("deleted"), "{out}");
    let out = k.run(&[
        "get",
        "tr",
        "shakespeare",
        "-o",
        "jsonpath={.metadata.deletionTimestamp}",
    ]);
    assert!(!out.is_empty(), "deletionTimestamp is set");
    k.run(&[
        "patch",
        "tr",
        "shakespeare",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    let err = k.run_expecting(false, &["get", "tr", "shakespeare"]);
    assert!(
        err.contains(r#"trainingruns.starling.dev "shakespeare" not found"#),
        "{err}"
    );
}

/// The header line and the rows of `kubectl get` output, split on runs of spaces.
fn table_of(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

#[test]
fn kubectl_get_prints_pods_events_deployments_and_services_with_their_usual_columns() {
    let k = Kubectl::new();
    let manifests = k.dir().join("objects.yaml");
    std::fs::write(
        &manifests,
        r#"
apiVersion: v1
kind: Pod
metadata: {name: trainer-0, namespace: default}
spec:
  nodeName: node-a
  containers: [{name: trainer, image: starling-trainer:dev}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: exchange, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: exchange}}
  template:
    metadata: {labels: {app: exchange}}
    spec: {containers: [{name: exchange, image: starling-trainer:dev}]}
---
apiVersion: v1
kind: Service
metadata: {name: exchange, namespace: default}
spec:
  selector: {app: exchange}
  ports: [{port: 7070}]
---
apiVersion: v1
kind: Event
metadata: {name: trainer-0.1, namespace: default}
involvedObject: {kind: Pod, name: trainer-0, namespace: default}
type: Warning
reason: BackOff
message: restarting a failed container
lastTimestamp: "2026-01-01T00:00:00Z"
---
apiVersion: v1
kind: Event
metadata: {name: trainer-0.2, namespace: default}
involvedObject: {kind: Pod, name: trainer-0, namespace: default}
type: Normal
reason: Scheduled
message: assigned to node-a
lastTimestamp: "2025-12-31T00:00:00Z"
"#,
    )
    .unwrap();
    k.run(&["apply", "-f", manifests.to_str().unwrap()]);

    let pods = table_of(&k.run(&["get", "pods", "-o", "wide"]));
    assert_eq!(
        pods[0][..6],
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP"]
    );
    assert_eq!(pods[0][6], "NODE");
    assert_eq!(pods[1][..4], ["trainer-0", "0/1", "Pending", "0"]);
    assert_eq!(pods[1][5..], ["<none>", "node-a"]);

    let deployments = table_of(&k.run(&["get", "deployments"]));
    assert_eq!(
        deployments[0],
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    );
    assert_eq!(deployments[1][..4], ["exchange", "0/1", "0", "0"]);

    let services = table_of(&k.run(&["get", "services"]));
    assert_eq!(
        services[0],
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    assert_eq!(services[1][1], "ClusterIP");
    assert!(
        services[1][2].starts_with("10.96."),
        "an allocated IP: {services:?}"
    );
    assert_eq!(services[1][4], "7070/TCP");

    // Sorted by when they happened, across namespaces, as an SRE reads them.
    let events = table_of(&k.run(&["get", "events", "-A", "--sort-by=.lastTimestamp"]));
    assert_eq!(
        events[0],
        [
            "NAMESPACE",
            "LAST SEEN",
            "TYPE",
            "REASON",
            "OBJECT",
            "MESSAGE"
        ]
    );
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(
        events[1][2..],
        ["Normal", "Scheduled", "pod/trainer-0", "assigned to node-a"]
    );
    assert_eq!(events[2][3], "BackOff");
}

#[test]
fn kubectl_starling_status_prints_a_runs_screen_through_kubectls_plugin_mechanism() {
    let k = Kubectl::new();
    k.run(&["apply", "-f", "crds/"]);
    k.run(&["apply", "-f", "crds/samples/trainingrun-shakespeare.yaml"]);
    k.run(&["apply", "-f", "crds/samples/membercluster-home.yaml"]);
    let status = r#"{"status": {"phase": "Running", "round": 3, "loss": "3.1", "activePeers": 1,
        "lossHistory": [{"round": 1, "loss": 4.2}, {"round": 2, "loss": 3.6}, {"round": 3, "loss": 3.1}],
        "peers": [{"id": "p0", "member": "home-lagos", "state": "Running", "rating": 25.5}]}}"#;
    k.run(&[
        "patch",
        "tr",
        "shakespeare",
        "--subresource=status",
        "--type=merge",
        "-p",
        status,
    ]);
    // kubectl finds `kubectl-starling` on the PATH, as it would once installed.
    let bin = std::env::current_exe().unwrap();
    let target = bin.parent().unwrap().parent().unwrap();
    assert!(
        target.join("kubectl-starling").exists(),
        "build the plugin first: cargo build -p starling-operator"
    );
    let path = format!(
        "{}:{}",
        target.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
        .args(["starling", "status", "shakespeare", "-n", "default"])
        .env("PATH", path)
        .env("KUBECONFIG", &k.kubeconfig)
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{screen}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        screen.starts_with("shakespeare (default)  Running  round 3/"),
        "{screen}"
    );
    assert!(
        screen.contains("Loss by round (1 to 3: 4.2000 → 3.1000)"),
        "{screen}"
    );
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with("p0 ") && l.contains("home-lagos")),
        "{screen}"
    );
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with("home-lagos ") && l.contains("never")),
        "{screen}"
    );

    let missing = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
        .args(["starling", "status", "nothing"])
        .env(
            "PATH",
            format!(
                "{}:{}",
                target.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("KUBECONFIG", &k.kubeconfig)
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("no TrainingRun nothing in namespace default")
    );
}
