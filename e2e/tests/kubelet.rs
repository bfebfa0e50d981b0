//! The process kubelet runs Pods as processes and reports them as a kubelet would.

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

#[path = "common/kubelet.rs"]
mod local;

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;
use starling_e2e::apiserver::ApiServer;
use starling_e2e::kubelet::{InCluster, Kubelet, KubeletConfig, NodeConfig};

use local::*;

#[tokio::test]
async fn pods_run_as_processes_and_report_phase_exit_codes_and_restarts() {
    let c = cluster().await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(c.client.clone());
    let registered = async {
        loop {
            let node = nodes.get("node-a").await;
            if let Some(capacity) = node.ok().and_then(|n| n.status?.capacity) {
                break capacity;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let capacity = tokio::time::timeout(PATIENCE, registered)
        .await
        .expect("the kubelet registers its node with its capacity");
    assert_eq!(capacity["nvidia.com/gpu"].0, "1");

    let create = async |p: Pod| c.pods.create(&PostParams::default(), &p).await.unwrap();
    // Runs until the test lets it finish, so it is seen running however slow the machine.
    create(pod(
        "ok",
        "Never",
        "until [ -e done ]; do sleep 0.05; done",
        json!({}),
    ))
    .await;
    create(pod("fails", "Never", "exit 3", json!({}))).await;
    // Fails once, then succeeds: its working directory survives the restart.
    let flaky = "if [ -e marker ]; then exit 0; fi; touch marker; exit 1";
    create(pod("flaky", "OnFailure", flaky, json!({}))).await;

    let running = c.wait("ok", "ran", |p| phase(p) == "Running").await;
    assert!(container(&running).state.unwrap().running.is_some());
    assert_eq!(running.spec.unwrap().node_name.as_deref(), Some("node-a"));
    std::fs::write(c.work_dir.path().join("default_ok/done"), "").unwrap();
    let done = c.wait("ok", "succeeded", |p| phase(p) == "Succeeded").await;
    let exit = container(&done).state.unwrap().terminated.unwrap();
    assert_eq!(
        (exit.exit_code, exit.reason.as_deref()),
        (0, Some("Completed"))
    );

    let failed = c.wait("fails", "failed", |p| phase(p) == "Failed").await;
    assert_eq!(
        container(&failed)
            .state
            .unwrap()
            .terminated
            .unwrap()
            .exit_code,
        3
    );

    let flaky = c
        .wait("flaky", "succeeded", |p| phase(p) == "Succeeded")
        .await;
    let status = container(&flaky);
    assert_eq!(status.restart_count, 1);
    assert_eq!(status.last_state.unwrap().terminated.unwrap().exit_code, 1);
}

#[tokio::test]
async fn pods_get_their_environment_and_are_scheduled_only_where_they_fit() {
    let c = cluster().await;
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), "default");
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "run-tokens"},
        "data": {"p0": "c2VjcmV0LXRva2Vu"}});
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(secret).unwrap(),
        )
        .await
        .unwrap();
    let env = json!({"spec": {"containers": [{"name": "main", "image": "example.com/sh",
        "command": ["sh", "-c", "echo token=$TOKEN pod=$POD"],
        "env": [
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "run-tokens", "key": "p0"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]}});
    let mut p = pod("env", "Never", "", json!({}));
    let mut value = serde_json::to_value(&p).unwrap();
    json_patch::merge(&mut value, &env);
    p = serde_json::from_value(value).unwrap();
    c.pods.create(&PostParams::default(), &p).await.unwrap();
    c.wait("env", "succeeded", |p| phase(p) == "Succeeded")
        .await;
    let log = std::fs::read_to_string(c.work_dir.path().join("default_env/main.log")).unwrap();
    assert_eq!(log.trim(), "token=secret-token pod=env");

    let greedy = json!({"spec": {"containers": [{"name": "main", "image": "example.com/sh",
        "command": ["sh", "-c", "true"], "resources": {"limits": {"nvidia.com/gpu": "2"}}}]}});
    c.pods
        .create(
            &PostParams::default(),
            &pod("greedy", "Never", "true", greedy),
        )
        .await
        .unwrap();
    let elsewhere = json!({"spec": {"nodeSelector": {"starling.dev/tier": "cloud"}}});
    c.pods
        .create(
            &PostParams::default(),
            &pod("elsewhere", "Never", "true", elsewhere),
        )
        .await
        .unwrap();
    let unschedulable = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
            .filter(|c| c.status == "False")
            .and_then(|c| c.message.clone())
    };
    let greedy = c
        .wait("greedy", "was refused", |p| unschedulable(p).is_some())
        .await;
    assert!(
        unschedulable(&greedy)
            .unwrap()
            .contains("1 Insufficient nvidia.com/gpu")
    );
    let elsewhere = c
        .wait("elsewhere", "was refused", |p| unschedulable(p).is_some())
        .await;
    assert!(
        unschedulable(&elsewhere)
            .unwrap()
            .contains("didn't match Pod's node affinity/selector")
    );

    let foreign = json!({"spec": {"containers": [{"name": "main", "image": "nginx:1.27"}]}});
    c.pods
        .create(
            &PostParams::default(),
            &pod("foreign", "Never", "", foreign),
        )
        .await
        .unwrap();
    let foreign = c
        .wait("foreign", "was refused", |p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some()
        })
        .await;
    let waiting = container(&foreign).state.unwrap().waiting.unwrap();
    assert_eq!(waiting.reason.as_deref(), Some("ErrImagePull"));
}

#[tokio::test]
async fn a_federation_of_local_clusters_runs_pods_and_a_member_can_go_dark() {
    use starling_e2e::harness::{ClusterSpec, LocalClusters};
    let dir = tempfile::tempdir().unwrap();
    let images = vec![("example.com/sh".to_owned(), PathBuf::from("/bin/sh"))];
    let members = [
        ClusterSpec::single_node("cloud-eu", 2),
        ClusterSpec::single_node("home-lagos", 1),
    ];
    let mut federation = LocalClusters::start(
        &ClusterSpec::single_node("hub", 0),
        &members,
        &images,
        dir.path(),
    )
    .await
    .unwrap();
    let home = federation.member("home-lagos").unwrap();
    assert!(home.kubeconfig.starts_with(dir.path()));
    let pods: Api<Pod> = Api::namespaced(home.client.clone(), "default");
    pods.create(
        &PostParams::default(),
        &pod("hello", "Never", "exit 0", json!({})),
    )
    .await
    .unwrap();
    let start = std::time::Instant::now();
    while phase(&pods.get("hello").await.unwrap()) != "Succeeded" {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the pod never ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = dir.path().join("home-lagos/pods/default_hello/main.log");
    assert!(log.exists(), "{}", log.display());

    home.go_dark();
    assert!(
        pods.get("hello").await.is_err(),
        "a dark member still answers"
    );
    let hub_pods: Api<Pod> = Api::namespaced(federation.hub.client.clone(), "default");
    assert!(hub_pods.list(&Default::default()).await.is_ok());
}

/// The pid of the process whose command line contains `marker`.
fn find_process(marker: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(marker)
                .then_some(pid)
        })
}

#[tokio::test]
async fn a_killed_pod_process_is_a_failed_pod() {
    let c = cluster().await;
    // Two commands, so the shell stays (a shell may exec a lone command, and the marker
    // would leave the process's command line).
    let marker = format!("sleep 30; exit 0 # victim-{}", std::process::id());
    c.pods
        .create(
            &PostParams::default(),
            &pod("victim", "Never", &marker, json!({})),
        )
        .await
        .unwrap();
    c.wait("victim", "ran", |p| phase(p) == "Running").await;
    let mut pid = None;
    for _ in 0..100 {
        pid = find_process(&marker);
        if pid.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pid = pid.expect("the pod's process");
    // SAFETY: signalling a process the test's own kubelet started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let failed = c.wait("victim", "failed", |p| phase(p) == "Failed").await;
    let exit = container(&failed).state.unwrap().terminated.unwrap();
    assert_eq!(
        (exit.exit_code, exit.reason.as_deref()),
        (137, Some("Error"))
    );
}

#[tokio::test]
async fn logs_are_served_through_the_api_from_the_pods_node() {
    use futures::AsyncReadExt;
    use kube::api::LogParams;
    let c = cluster().await;
    // The last line waits for the test, so the pod is seen running and followed before
    // it ends.
    let script = "echo line 1; echo line 2; until [ -e done ]; do sleep 0.05; done; echo line 3";
    c.pods
        .create(
            &PostParams::default(),
            &pod("talker", "Never", script, json!({})),
        )
        .await
        .unwrap();
    c.wait("talker", "ran", |p| phase(p) == "Running").await;

    // Following streams the lines as they come and ends when the container does.
    let follow = LogParams {
        follow: true,
        ..Default::default()
    };
    let mut stream = c.pods.log_stream("talker", &follow).await.unwrap();
    let mut first = [0; 14];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut first))
        .await
        .expect("the lines so far are streamed")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&first), "line 1\nline 2\n");
    std::fs::write(c.work_dir.path().join("default_talker/done"), "").unwrap();
    let mut followed = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut followed))
        .await
        .expect("the stream ends with the container")
        .unwrap();
    assert_eq!(followed, "line 3\n");

    let all = c.pods.logs("talker", &LogParams::default()).await.unwrap();
    assert_eq!(all, "line 1\nline 2\nline 3\n");
    let tail = LogParams {
        tail_lines: Some(1),
        ..Default::default()
    };
    assert_eq!(c.pods.logs("talker", &tail).await.unwrap(), "line 3\n");

    let wrong = LogParams {
        container: Some("sidecar".into()),
        ..Default::default()
    };
    let err = c.pods.logs("talker", &wrong).await.unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("{err}")
    };
    assert_eq!(status.code, 400);
    assert_eq!(
        status.message,
        "container sidecar is not valid for pod talker"
    );
}

#[tokio::test]
async fn deleted_pods_get_their_grace_period_then_go() {
    use kube::api::DeleteParams;
    let c = cluster().await;
    let polite = "trap 'echo bye; exit 0' TERM; echo up; while true; do sleep 0.1; done";
    let stubborn = "trap '' TERM; echo up; while true; do sleep 0.1; done";
    for (name, script) in [("polite", polite), ("stubborn", stubborn)] {
        let grace = json!({"spec": {"terminationGracePeriodSeconds": 2}});
        c.pods
            .create(&PostParams::default(), &pod(name, "Never", script, grace))
            .await
            .unwrap();
        c.wait(name, "ran", |p| phase(p) == "Running").await;
    }
    let log = |name: &str| {
        std::fs::read_to_string(c.work_dir.path().join(format!("default_{name}/main.log")))
            .unwrap_or_default()
    };
    for name in ["polite", "stubborn"] {
        let up = async {
            while !log(name).contains("up") {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(PATIENCE, up)
            .await
            .expect("the pod's process starts and writes its log");
        c.pods.delete(name, &DeleteParams::default()).await.unwrap();
        // Terminating: still there, marked, until its kubelet has stopped it.
        let held = c.pods.get(name).await.unwrap();
        assert!(held.metadata.deletion_timestamp.is_some());
        assert_eq!(held.metadata.deletion_grace_period_seconds, Some(2));
    }
    let started = std::time::Instant::now();
    let gone = |name: &'static str| {
        let pods = c.pods.clone();
        async move {
            loop {
                match pods.get(name).await {
                    Err(kube::Error::Api(e)) if e.code == 404 => return,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone("polite"))
        .await
        .expect("the polite pod goes once it has exited");
    assert_eq!(
        log("polite"),
        "up\nbye\n",
        "it was asked to stop with SIGTERM"
    );
    tokio::time::timeout(Duration::from_secs(10), gone("stubborn"))
        .await
        .expect("the stubborn pod is killed at the end of its grace period");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the stubborn pod had its grace period: {:?}",
        started.elapsed()
    );
}

/// A plain-HTTP proxy to a cluster's API that counts the requests through it.
struct CountingProxy {
    url: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    async fn start(upstream: Client) -> Self {
        use axum::body::Body;
        use axum::extract::Request;
        let requests = std::sync::Arc::<std::sync::Mutex<Vec<String>>>::default();
        let seen = requests.clone();
        let forward = move |request: Request| {
            let (upstream, seen) = (upstream.clone(), seen.clone());
            async move {
                let (parts, body) = request.into_parts();
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                seen.lock()
                    .unwrap()
                    .push(format!("{} {path}", parts.method));
                let mut forwarded = axum::http::Request::builder()
                    .method(&parts.method)
                    .uri(path);
                for (name, value) in &parts.headers {
                    if name != axum::http::header::HOST && name != axum::http::header::AUTHORIZATION
                    {
                        forwarded = forwarded.header(name, value);
                    }
                }
                let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
                let forwarded = forwarded.body(kube::client::Body::from(body)).unwrap();
                match upstream.send(forwarded).await {
                    Ok(response) => response.map(Body::new),
                    Err(e) => axum::http::Response::builder()
                        .status(502)
                        .body(Body::from(e.to_string()))
                        .unwrap(),
                }
            }
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(forward);
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            url,
            requests,
            _task: task,
        }
    }

    fn client(&self) -> Client {
        Client::try_from(kube::Config::new(self.url.parse().unwrap())).unwrap()
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.requests.lock().unwrap())
    }
}

#[tokio::test]
async fn a_kubelet_at_rest_makes_next_to_no_api_requests() {
    let server = ApiServer::new().start(0).await.unwrap();
    let client = server.client();
    let proxy = CountingProxy::start(client.clone()).await;
    let work_dir = tempfile::tempdir().unwrap();
    let config = KubeletConfig {
        nodes: vec![NodeConfig::new("node-a", 4.0, 8.0, 1)],
        images: vec![("example.com/sh".into(), PathBuf::from("/bin/sh"))],
        work_dir: work_dir.path().to_owned(),
        in_cluster: InCluster::new(&server.url, &server.ca_pem),
    };
    let _kubelet = tokio::spawn(Kubelet::new(proxy.client(), config).run());
    let c = Cluster {
        pods: Api::namespaced(client.clone(), "default"),
        client: client.clone(),
        work_dir,
        _server: server,
        _kubelet: tokio::spawn(async { Ok(()) }),
    };
    // A cluster with something of everything the kubelet looks after: a pod, a
    // Deployment's pod and a load balancer in front of it.
    let forever = "while true; do sleep 1; done";
    c.pods
        .create(
            &PostParams::default(),
            &pod("steady", "Always", forever, json!({})),
        )
        .await
        .unwrap();
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "main", "image": "example.com/sh",
                    "command": ["sh", "-c", forever]}]}}}});
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), "default");
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(deployment).unwrap(),
        )
        .await
        .unwrap();
    let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"type": "LoadBalancer", "selector": {"app": "web"},
            "ports": [{"port": 80}]}});
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(client.clone(), "default");
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(service).unwrap(),
        )
        .await
        .unwrap();
    c.wait("steady", "ran", |p| phase(p) == "Running").await;
    let settled = async {
        loop {
            let ready = deployments
                .get("web")
                .await
                .unwrap()
                .status
                .and_then(|s| s.ready_replicas);
            let ingress = services
                .get("web")
                .await
                .unwrap()
                .status
                .and_then(|s| s.load_balancer?.ingress)
                .is_some_and(|i| !i.is_empty());
            if ready == Some(1) && ingress {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PATIENCE, settled)
        .await
        .expect("the Deployment's pod runs behind its load balancer");
    assert!(
        !proxy.take().is_empty(),
        "the kubelet talks through the proxy"
    );

    // At rest, nothing changes, so the kubelet has nothing to ask (its watches stay
    // open; a node heartbeat could fall in the window).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let requests = proxy.take();
    eprintln!("{} API requests in 5 s at rest", requests.len());
    assert!(
        requests.len() <= 2,
        "{} requests in 5 s at rest: {requests:#?}",
        requests.len()
    );
}
