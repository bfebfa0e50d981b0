//! kube-rs against the test API server: CRDs become served resources, the samples round
//! trip, writes follow a real server's rules, and watchers and controllers work —
//! including a watcher that must relist after 410 Gone.

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{Controller, controller::Action, watcher};
use kube::{Client, Discovery, ResourceExt};
use serde_json::json;
use starling_e2e::apiserver::{ApiServer, Running};
use starling_operator::api::TrainingRun;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

async fn client(running: &Running) -> Client {
    running.client()
}

/// A server with Starling's CRDs created from `crds/`.
async fn cluster() -> (Running, Client) {
    let running = ApiServer::new().start(0).await.unwrap();
    let client = client(&running).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for entry in std::fs::read_dir(repo("crds")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let crd: CustomResourceDefinition =
                serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            crds.create(&PostParams::default(), &crd).await.unwrap();
        }
    }
    (running, client)
}

fn sample() -> TrainingRun {
    let text = std::fs::read_to_string(repo("crds/samples/trainingrun-shakespeare.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn code(e: kube::Error) -> (u16, String) {
    let (status, reason, _) = api_error(e);
    (status, reason)
}

/// An API error's code, reason and message.
fn api_error(e: kube::Error) -> (u16, String, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason, s.message),
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test]
async fn crds_are_discovered_and_the_sample_run_round_trips() {
    let (_server, client) = cluster().await;
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let group = discovery
        .groups()
        .find(|g| g.name() == "starling.dev")
        .expect("starling.dev is discovered");
    let kinds: Vec<String> = group
        .recommended_resources()
        .into_iter()
        .map(|(ar, _)| ar.kind)
        .collect();
    for kind in ["MemberCluster", "TrainerGroup", "TrainingRun"] {
        assert!(kinds.contains(&kind.to_owned()), "{kinds:?}");
    }

    let runs: Api<TrainingRun> = Api::namespaced(client.clone(), "default");
    let created = runs
        .create(&PostParams::default(), &sample())
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some());
    assert_eq!(created.spec, sample().spec);
    let fetched = runs.get("shakespeare").await.unwrap();
    assert_eq!(fetched, created);
    assert_eq!(runs.list(&Default::default()).await.unwrap().items.len(), 1);

    // Writes follow a real server's rules.
    let (status, reason) = code(
        runs.create(&PostParams::default(), &sample())
            .await
            .unwrap_err(),
    );
    assert_eq!((status, reason.as_str()), (409, "AlreadyExists"));
    let (status, _) = code(runs.get("nope").await.unwrap_err());
    assert_eq!(status, 404);
    let elsewhere: Api<TrainingRun> = Api::namespaced(client.clone(), "no-such-namespace");
    let (status, _) = code(
        elsewhere
            .create(&PostParams::default(), &sample())
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 404);

    let mut changed = created.clone();
    changed.spec.seed = 7;
    let replaced = runs
        .replace("shakespeare", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    let (status, reason) = code(
        runs.replace("shakespeare", &PostParams::default(), &created)
            .await
            .unwrap_err(),
    );
    assert_eq!((status, reason.as_str()), (409, "Conflict"));

    // Status goes through its subresource only and does not bump the generation.
    let status_patch = Patch::Merge(json!({"status": {"round": 3, "phase": "Placing"}}));
    let patched = runs
        .patch_status("shakespeare", &PatchParams::default(), &status_patch)
        .await
        .unwrap();
    assert_eq!(patched.status.as_ref().unwrap().round, 3);
    assert_eq!(patched.metadata.generation, Some(2));
    let mut sneaky = patched.clone();
    sneaky.status.as_mut().unwrap().round = 99;
    let after = runs
        .replace("shakespeare", &PostParams::default(), &sneaky)
        .await
        .unwrap();
    assert_eq!(after.status.unwrap().round, 3);

    let spec_patch = Patch::Merge(json!({"spec": {"seed": 9}}));
    let patched = runs
        .patch("shakespeare", &PatchParams::default(), &spec_patch)
        .await
        .unwrap();
    assert_eq!(
        (patched.spec.seed, patched.metadata.generation),
        (9, Some(3))
    );
    let json_patch: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/spec/seed", "value": 11}]))
            .unwrap();
    let patched = runs
        .patch(
            "shakespeare",
            &PatchParams::default(),
            &Patch::<()>::Json(json_patch),
        )
        .await
        .unwrap();
    assert_eq!(patched.spec.seed, 11);
    let applied = runs
        .patch(
            "shakespeare",
            &PatchParams::apply("test").force(),
            &Patch::Apply(
                json!({"apiVersion": "starling.dev/v1alpha1", "kind": "TrainingRun",
                "metadata": {"name": "shakespeare"}, "spec": {"seed": 12}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(applied.spec.seed, 12);

    // Once the run is Running, what it trains is fixed (a transition rule that reads the
    // stored status); the rest may still change.
    let running = Patch::Merge(json!({"status": {"phase": "Running"}}));
    runs.patch_status("shakespeare", &PatchParams::default(), &running)
        .await
        .unwrap();
    let reseed = Patch::Merge(json!({"spec": {"seed": 13}}));
    match runs
        .patch("shakespeare", &PatchParams::default(), &reseed)
        .await
    {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422);
            assert!(
                e.message.contains("cannot change once the run has started"),
                "{}",
                e.message
            );
        }
        other => panic!("a new seed mid-run was not refused: {other:?}"),
    }
    let longer = Patch::Merge(json!({"spec": {"schedule": {"outerRounds": 14}}}));
    let patched = runs
        .patch("shakespeare", &PatchParams::default(), &longer)
        .await
        .unwrap();
    assert_eq!(
        (patched.spec.seed, patched.spec.schedule.outer_rounds),
        (12, 14)
    );

    // The wrong kind at a TrainingRun's URL is invalid, with the field named.
    let dynamic: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &kube::api::ApiResource::erase::<TrainingRun>(&()),
    );
    let mut wrong: kube::api::DynamicObject =
        serde_json::from_value(json!({"apiVersion": "starling.dev/v1alpha1", "kind": "Pod",
            "metadata": {"name": "wrong"}}))
        .unwrap();
    wrong.metadata.namespace = None;
    let (status, reason) = code(
        dynamic
            .create(&PostParams::default(), &wrong)
            .await
            .unwrap_err(),
    );
    assert_eq!((status, reason.as_str()), (422, "Invalid"));
}

#[tokio::test]
async fn custom_resources_are_defaulted_pruned_and_validated_by_their_schema() {
    let (_server, client) = cluster().await;
    let dynamic: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &kube::api::ApiResource::erase::<TrainingRun>(&()),
    );
    let mut object = serde_json::to_value(sample()).unwrap();
    object["spec"]["compression"]
        .as_object_mut()
        .unwrap()
        .remove("errorFeedbackDecay");
    object["spec"]["notAField"] = json!(true);
    let created = dynamic
        .create(
            &PostParams::default(),
            &serde_json::from_value(object.clone()).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        created.data["spec"]["compression"]["errorFeedbackDecay"],
        0.95
    );
    assert!(created.data["spec"].get("notAField").is_none());

    object["metadata"]["name"] = json!("invalid");
    object["spec"]["compression"]["valueBits"] = json!(3);
    object["spec"]["seed"] = json!("forty-two");
    let err = dynamic
        .create(
            &PostParams::default(),
            &serde_json::from_value(object).unwrap(),
        )
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("{err}")
    };
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert!(
        status
            .message
            .contains("spec.compression.valueBits: Unsupported value: 3"),
        "{}",
        status.message
    );
    assert!(
        status.message.contains("spec.seed: Invalid value"),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn deletion_waits_for_finalizers() {
    let (_server, client) = cluster().await;
    let runs: Api<TrainingRun> = Api::namespaced(client, "default");
    let mut run = sample();
    run.metadata.finalizers = Some(vec!["starling.dev/cleanup".into()]);
    runs.create(&PostParams::default(), &run).await.unwrap();
    runs.delete("shakespeare", &DeleteParams::default())
        .await
        .unwrap();
    let held = runs.get("shakespeare").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    let release = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    runs.patch("shakespeare", &PatchParams::default(), &release)
        .await
        .unwrap();
    let (status, _) = code(runs.get("shakespeare").await.unwrap_err());
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_watcher_sees_changes_and_relists_after_410_gone() {
    let (server, client) = cluster().await;
    let runs: Api<TrainingRun> = Api::namespaced(client, "default");
    let mut events = watcher(runs.clone(), watcher::Config::default()).boxed();
    let mut inits = 0;
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event within 10 s")
            .expect("the watcher goes on")
    };
    assert!(matches!(next().await, Ok(watcher::Event::Init)));
    inits += 1;
    assert!(matches!(next().await, Ok(watcher::Event::InitDone)));
    runs.create(&PostParams::default(), &sample())
        .await
        .unwrap();
    match next().await.unwrap() {
        watcher::Event::Apply(run) => assert_eq!(run.name_any(), "shakespeare"),
        other => panic!("expected the new run, got {other:?}"),
    }
    // History compacted and the watch cut: resuming from the old version gets 410, so
    // the watcher lists again, and sees a change made in between.
    server.server.compact_and_drop_watches();
    let patch = Patch::Merge(json!({"spec": {"seed": 5}}));
    runs.patch("shakespeare", &PatchParams::default(), &patch)
        .await
        .unwrap();
    let mut gone = false;
    loop {
        match next().await {
            Err(watcher::Error::WatchError(status)) if status.code == 410 => gone = true,
            Ok(watcher::Event::Init) => inits += 1,
            Ok(watcher::Event::InitApply(run)) => {
                assert_eq!(run.spec.seed, 5);
                break;
            }
            other => panic!("expected 410 and a relist, got {other:?}"),
        }
    }
    assert!(
        gone,
        "the watch was resumed from a version the server no longer had"
    );
    assert_eq!(inits, 2, "the watcher relisted once");
    assert!(matches!(next().await, Ok(watcher::Event::InitDone)));
    runs.delete("shakespeare", &DeleteParams::default())
        .await
        .unwrap();
    loop {
        if let Ok(watcher::Event::Delete(run)) = next().await {
            assert_eq!(run.name_any(), "shakespeare");
            break;
        }
    }
}

#[tokio::test]
async fn a_controller_reconciles_creates_updates_and_deletes() {
    let (_server, client) = cluster().await;
    let runs: Api<TrainingRun> = Api::namespaced(client, "default");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, u64, bool)>();
    let controller = Controller::new(runs.clone(), watcher::Config::default())
        .run(
            move |run: std::sync::Arc<TrainingRun>, tx| async move {
                let deleting = run.metadata.deletion_timestamp.is_some();
                let _ = tx.send((run.name_any(), run.spec.seed, deleting));
                Ok::<_, kube::Error>(Action::await_change())
            },
            |_, _: &kube::Error, _| Action::await_change(),
            std::sync::Arc::new(tx),
        )
        .for_each(|_| async {});
    let controller = tokio::spawn(controller);
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a reconcile within 10 s")
            .unwrap()
    };
    let mut run = sample();
    run.metadata.finalizers = Some(vec!["starling.dev/cleanup".into()]);
    runs.create(&PostParams::default(), &run).await.unwrap();
    assert_eq!(next().await, ("shakespeare".into(), 42, false));
    let patch = Patch::Merge(json!({"spec": {"seed": 6}}));
    runs.patch("shakespeare", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert_eq!(next().await, ("shakespeare".into(), 6, false));
    // Deletion reaches the controller while the finalizer holds the object.
    runs.delete("shakespeare", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(next().await, ("shakespeare".into(), 6, true));
    controller.abort();
}

#[tokio::test]
async fn rbac_confines_a_restricted_token_to_what_its_role_grants() {
    let (server, admin) = cluster().await;
    let apply = |kind: &str, body: serde_json::Value| {
        let (admin, kind) = (admin.clone(), kind.to_owned());
        async move {
            let (group, plural) = match kind.as_str() {
                "Namespace" => ("", "namespaces"),
                "Role" => ("rbac.authorization.k8s.io", "roles"),
                _ => ("rbac.authorization.k8s.io", "rolebindings"),
            };
            let gvk = kube::api::GroupVersionKind::gvk(group, "v1", &kind);
            let ar = kube::api::ApiResource::from_gvk_with_plural(&gvk, plural);
            let ns = body["metadata"]["namespace"].as_str().map(str::to_owned);
            let api: Api<kube::api::DynamicObject> = match ns {
                Some(ns) => Api::namespaced_with(admin, &ns, &ar),
                None => Api::all_with(admin, &ar),
            };
            api.create(
                &PostParams::default(),
                &serde_json::from_value(body).unwrap(),
            )
            .await
            .unwrap();
        }
    };
    let ns = "starling-member-home";
    apply(
        "Namespace",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await;
    apply(
        "Role",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "agent", "namespace": ns},
        "rules": [{"apiGroups": ["starling.dev"], "resources": ["trainingruns"],
                   "verbs": ["get", "list", "watch"]}]}),
    )
    .await;
    apply(
        "RoleBinding",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "agent", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "agent"},
        "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": ns}]}),
    )
    .await;
    server.server.add_token(
        "agent-token-0000",
        starling_e2e::apiserver::User::service_account(ns, "agent"),
    );
    let agent = server.client_with_token("agent-token-0000");

    let mine: Api<TrainingRun> = Api::namespaced(agent.clone(), ns);
    assert!(
        mine.list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let (status, reason) = code(
        mine.create(&PostParams::default(), &sample())
            .await
            .unwrap_err(),
    );
    assert_eq!((status, reason.as_str()), (403, "Forbidden"));
    let theirs: Api<TrainingRun> = Api::namespaced(agent, "default");
    let err = theirs.list(&Default::default()).await.unwrap_err();
    let kube::Error::Api(e) = err else {
        panic!("{err}")
    };
    assert_eq!(e.code, 403);
    assert_eq!(
        e.message,
        "trainingruns.starling.dev is forbidden: User \"system:serviceaccount:starling-member-home:agent\" \
         cannot list resource \"trainingruns\" in API group \"starling.dev\" in the namespace \"default\""
    );
    let stranger = server.client_with_token("no-such-token");
    let (status, _) = code(
        Api::<TrainingRun>::namespaced(stranger, ns)
            .list(&Default::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 401);
}

#[tokio::test]
async fn owners_take_dependents_with_them_and_namespaces_their_contents() {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
    let (_server, client) = cluster().await;
    let runs: Api<TrainingRun> = Api::namespaced(client.clone(), "default");
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let owned = async |run: &str, map: &str, finalizer: bool| {
        let mut r = sample();
        r.metadata.name = Some(run.into());
        let r = runs.create(&PostParams::default(), &r).await.unwrap();
        let mut meta = json!({"name": map, "ownerReferences": [{"apiVersion": "starling.dev/v1alpha1",
            "kind": "TrainingRun", "name": run, "uid": r.metadata.uid, "blockOwnerDeletion": true}]});
        if finalizer {
            meta["finalizers"] = json!(["test.starling.dev/hold"]);
        }
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta});
        maps.create(&PostParams::default(), &serde_json::from_value(cm).unwrap())
            .await
            .unwrap();
    };
    let gone = |e: kube::Error| code(e).0 == 404;

    owned("background", "bg", false).await;
    runs.delete("background", &DeleteParams::background())
        .await
        .unwrap();
    assert!(gone(maps.get("bg").await.unwrap_err()));

    owned("orphaning", "orphan", false).await;
    runs.delete("orphaning", &DeleteParams::orphan())
        .await
        .unwrap();
    let orphan = maps.get("orphan").await.unwrap();
    assert!(
        orphan
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );

    // Foreground: the owner waits, marked, until its held dependent goes.
    owned("foreground", "held", true).await;
    runs.delete("foreground", &DeleteParams::foreground())
        .await
        .unwrap();
    let waiting = runs.get("foreground").await.unwrap();
    assert!(waiting.metadata.deletion_timestamp.is_some());
    assert!(
        maps.get("held")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );
    let release = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    maps.patch("held", &PatchParams::default(), &release)
        .await
        .unwrap();
    assert!(gone(maps.get("held").await.unwrap_err()));
    assert!(gone(runs.get("foreground").await.unwrap_err()));

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "doomed"}});
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(ns).unwrap())
        .await
        .unwrap();
    let doomed: Api<ConfigMap> = Api::namespaced(client, "doomed");
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "inside"}});
    doomed
        .create(&PostParams::default(), &serde_json::from_value(cm).unwrap())
        .await
        .unwrap();
    namespaces
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    assert!(gone(doomed.get("inside").await.unwrap_err()));
    assert!(gone(namespaces.get("doomed").await.unwrap_err()));
}

#[tokio::test]
async fn strategic_merge_patches_merge_containers_by_name() {
    use k8s_openapi::api::core::v1::Pod;
    let (_server, client) = cluster().await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "two"},
        "spec": {"containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]}});
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod).unwrap(),
    )
    .await
    .unwrap();
    let patch = json!({"spec": {"containers": [{"name": "b", "image": "b:2"}]}});
    let patched = pods
        .patch("two", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
    let images: Vec<_> = patched
        .spec
        .unwrap()
        .containers
        .into_iter()
        .map(|c| c.image.unwrap())
        .collect();
    assert_eq!(images, ["a:1", "b:2"]);
}

/// The managers of an object and, for each, the `fieldsV1` it owns.
fn owners(meta: &kube::api::ObjectMeta) -> Vec<(String, String, serde_json::Value)> {
    meta.managed_fields
        .iter()
        .flatten()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
                m.fields_v1
                    .as_ref()
                    .map(|f| f.0.clone())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn server_side_apply_tracks_field_owners_and_conflicts() {
    let (_server, client) = cluster().await;
    let runs: Api<TrainingRun> = Api::namespaced(client.clone(), "default");
    let mut config = serde_json::to_value(sample()).unwrap();
    config["metadata"]["labels"] = json!({"team": "ml", "queue": "spot"});
    let apply = |config: &serde_json::Value, params: PatchParams| {
        let (runs, config) = (runs.clone(), config.clone());
        async move {
            runs.patch("shakespeare", &params, &Patch::Apply(config))
                .await
        }
    };

    // Applying creates the run; its manager owns what it sent.
    let created = apply(&config, PatchParams::apply("ci")).await.unwrap();
    let owned = owners(&created.metadata);
    assert_eq!(owned.len(), 1, "{owned:?}");
    assert_eq!((owned[0].0.as_str(), owned[0].1.as_str()), ("ci", "Apply"));
    assert_eq!(owned[0].2["f:spec"]["f:seed"], json!({}));
    assert_eq!(
        owned[0].2["f:metadata"]["f:labels"],
        json!({"f:queue": {}, "f:team": {}})
    );

    // Applying the same configuration again changes nothing at all.
    let again = apply(&config, PatchParams::apply("ci")).await.unwrap();
    assert_eq!(
        again.metadata.resource_version,
        created.metadata.resource_version
    );

    // Someone else changes the seed with an ordinary patch and so owns it now ...
    let tuner = PatchParams {
        field_manager: Some("tuner".into()),
        ..Default::default()
    };
    let tuned = runs
        .patch(
            "shakespeare",
            &tuner,
            &Patch::Merge(json!({"spec": {"seed": 99}})),
        )
        .await
        .unwrap();
    let tuner_fields: Vec<_> = owners(&tuned.metadata)
        .into_iter()
        .filter(|(m, _, _)| m == "tuner")
        .collect();
    assert_eq!(tuner_fields[0].1, "Update");
    assert_eq!(tuner_fields[0].2, json!({"f:spec": {"f:seed": {}}}));

    // ... so re-applying the old seed conflicts, naming the field and its manager ...
    let (code, reason, message) =
        api_error(apply(&config, PatchParams::apply("ci")).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(
        message,
        "Apply failed with 1 conflict: conflict with \"tuner\" using starling.dev/v1alpha1: .spec.seed"
    );
    assert_eq!(runs.get("shakespeare").await.unwrap().spec.seed, 99);

    // ... unless it forces, which takes the field back.
    let forced = apply(&config, PatchParams::apply("ci").force())
        .await
        .unwrap();
    assert_eq!(forced.spec.seed, sample().spec.seed);
    let managers: Vec<String> = owners(&forced.metadata)
        .into_iter()
        .map(|(m, _, _)| m)
        .collect();
    assert_eq!(managers, ["ci"], "the tuner owned nothing else");

    // A field left out of the next configuration is removed when nobody else owns it,
    // and kept when somebody does.
    let labeler = json!({"apiVersion": "starling.dev/v1alpha1", "kind": "TrainingRun",
        "metadata": {"name": "shakespeare", "labels": {"queue": "spot"}}});
    apply(&labeler, PatchParams::apply("labeler"))
        .await
        .unwrap();
    config["metadata"]["labels"] = json!({"owner": "ana"});
    let relabelled = apply(&config, PatchParams::apply("ci")).await.unwrap();
    let labels = relabelled.metadata.labels.unwrap();
    assert_eq!(
        labels.keys().collect::<Vec<_>>(),
        ["owner", "queue"],
        "team went, queue stayed with its other owner"
    );

    // Status has owners of its own, kept apart from the main resource's.
    let status = json!({"apiVersion": "starling.dev/v1alpha1", "kind": "TrainingRun",
        "status": {"phase": "Running", "round": 2}});
    let with_status = runs
        .patch_status(
            "shakespeare",
            &PatchParams::apply("operator"),
            &Patch::Apply(status),
        )
        .await
        .unwrap();
    let entry = with_status
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .find(|m| m.manager.as_deref() == Some("operator"))
        .expect("the operator owns the status it applied");
    assert_eq!(entry.subresource.as_deref(), Some("status"));
    assert_eq!(
        entry.fields_v1.as_ref().unwrap().0,
        json!({"f:status": {"f:phase": {}, "f:round": {}}})
    );
    // Dropping a status field it applied removes it.
    let status = json!({"apiVersion": "starling.dev/v1alpha1", "kind": "TrainingRun",
        "status": {"phase": "Running"}});
    runs.patch_status(
        "shakespeare",
        &PatchParams::apply("operator"),
        &Patch::Apply(status),
    )
    .await
    .unwrap();
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client,
        "default",
        &kube::api::ApiResource::erase::<TrainingRun>(&()),
    );
    let stored = raw.get("shakespeare").await.unwrap();
    assert_eq!(stored.data["status"]["phase"], "Running");
    assert_eq!(
        stored.data["status"]["round"], 0,
        "round 2 is gone; the schema defaults it"
    );
}

#[tokio::test]
async fn cel_rules_are_enforced_and_dry_runs_leave_nothing_behind() {
    let (_server, client) = cluster().await;
    let runs: Api<TrainingRun> = Api::namespaced(client.clone(), "default");
    let mut both = serde_json::to_value(sample()).unwrap();
    both["spec"]["model"]["config"] = json!({"hiddenSize": 64, "numHiddenLayers": 2,
        "numAttentionHeads": 4, "numKeyValueHeads": 2, "intermediateSize": 128,
        "vocabSize": 256, "maxPositionEmbeddings": 128});
    let dynamic: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &kube::api::ApiResource::erase::<TrainingRun>(&()),
    );
    let err = dynamic
        .create(
            &PostParams::default(),
            &serde_json::from_value(both).unwrap(),
        )
        .await
        .unwrap_err();
    let (status, reason, message) = api_error(err);
    assert_eq!((status, reason.as_str()), (422, "Invalid"));
    assert!(
        message.contains(
            "spec.model: Invalid value: \"object\": set exactly one of preset and config"
        ),
        "{message}"
    );

    // A dry run answers as the write would, and keeps nothing.
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let answered = runs.create(&dry, &sample()).await.unwrap();
    assert_eq!(answered.metadata.name.as_deref(), Some("shakespeare"));
    let (status, _) = code(runs.get("shakespeare").await.unwrap_err());
    assert_eq!(status, 404);
    runs.create(&PostParams::default(), &sample())
        .await
        .unwrap();
    let patch = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    let answered = runs
        .patch(
            "shakespeare",
            &patch,
            &Patch::Merge(json!({"spec": {"seed": 5}})),
        )
        .await
        .unwrap();
    assert_eq!(answered.spec.seed, 5);
    assert_eq!(
        runs.get("shakespeare").await.unwrap().spec.seed,
        sample().spec.seed
    );
    let delete = DeleteParams {
        dry_run: true,
        ..Default::default()
    };
    runs.delete("shakespeare", &delete).await.unwrap();
    assert!(runs.get("shakespeare").await.is_ok());
}

#[tokio::test]
async fn deletecollection_deletes_what_the_selector_matches() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let (_server, client) = cluster().await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "default");
    for (name, app) in [("a", "trainer"), ("b", "trainer"), ("c", "exchange")] {
        let map = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": {"app": app}}});
        maps.create(
            &PostParams::default(),
            &serde_json::from_value(map).unwrap(),
        )
        .await
        .unwrap();
    }
    let deleted = maps
        .delete_collection(
            &DeleteParams::default(),
            &kube::api::ListParams::default().labels("app=trainer"),
        )
        .await
        .unwrap();
    let names: Vec<String> = deleted
        .left()
        .expect("the deleted objects")
        .items
        .iter()
        .map(|m| m.name_any())
        .collect();
    assert_eq!(names, ["a", "b"]);
    let left: Vec<String> = maps
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|m| m.name_any())
        .collect();
    assert_eq!(left, ["c"]);
}

#[tokio::test]
async fn a_pod_on_a_node_is_deleted_gracefully_and_finalizers_still_hold_it() {
    use k8s_openapi::api::core::v1::Pod;
    let (_server, client) = cluster().await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "held", "finalizers": ["example.com/keep"]},
        "spec": {"nodeName": "node-a", "terminationGracePeriodSeconds": 7,
            "containers": [{"name": "a", "image": "a:1"}]}});
    let created = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod).unwrap(),
        )
        .await
        .unwrap();
    pods.delete("held", &DeleteParams::default()).await.unwrap();
    let marked = pods.get("held").await.unwrap();
    assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(7));
    // A final delete for another pod of the same name is refused by its precondition.
    let elsewhere = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(kube::api::Preconditions {
            uid: Some("another-uid".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    let (status, reason) = code(pods.delete("held", &elsewhere).await.unwrap_err());
    assert_eq!((status, reason.as_str()), (409, "Conflict"));
    // The kubelet's final delete ends the grace period; the finalizer still holds it ...
    let finally = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(kube::api::Preconditions {
            uid: created.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    pods.delete("held", &finally).await.unwrap();
    let held = pods.get("held").await.unwrap();
    assert_eq!(held.metadata.deletion_grace_period_seconds, Some(0));
    // ... until it is released.
    let release = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    pods.patch("held", &PatchParams::default(), &release)
        .await
        .unwrap();
    let (status, _) = code(pods.get("held").await.unwrap_err());
    assert_eq!(status, 404);
}
