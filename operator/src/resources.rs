//! The Kubernetes objects the hub writes for a run and a member, built as plain values so
//! the controllers only decide *whether* to write them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector, SecretKeySelector};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::api::{
    Algorithm, CorpusSource, MemberCluster, PeerId, TrainingRun, TrainingRunSpec, validation,
};

/// Field manager of everything the operator writes.
pub const MANAGER: &str = "starling-operator";
/// Port the exchange serves gRPC and `/metrics` on.
pub const EXCHANGE_PORT: u16 = 7070;
/// Where the exchange keeps its state, data and checkpoints inside its pod.
pub const EXCHANGE_WORKDIR: &str = "/var/lib/starling";

pub const LABEL_RUN: &str = "starling.dev/run";
pub const LABEL_RUN_NAMESPACE: &str = "starling.dev/run-namespace";
pub const LABEL_RUN_UID: &str = "starling.dev/run-uid";
pub const LABEL_MEMBER: &str = "starling.dev/member";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// The hub namespace holding one member's TrainerGroups and credentials.
pub fn member_namespace(member: &str) -> String {
    format!("starling-member-{member}")
}

/// Name of a run's objects in a member namespace: unique across run namespaces.
pub fn group_name(run: &TrainingRun) -> String {
    format!("{}-{}", run.namespace().unwrap_or_default(), run.name_any())
}

pub fn exchange_name(run: &TrainingRun) -> String {
    format!("{}-exchange", run.name_any())
}

pub fn credentials_name(run: &TrainingRun) -> String {
    format!("{}-credentials", run.name_any())
}

/// Labels every object of a run carries; `starling.dev/run-uid` is what cleanup selects on.
pub fn run_labels(run: &TrainingRun) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_RUN.into(), run.name_any()),
        (
            LABEL_RUN_NAMESPACE.into(),
            run.namespace().unwrap_or_default(),
        ),
        (LABEL_RUN_UID.into(), run.uid().unwrap_or_default()),
        (LABEL_MANAGED_BY.into(), MANAGER.into()),
    ])
}

pub fn owner(run: &TrainingRun) -> OwnerReference {
    run.controller_owner_ref(&())
        .expect("stored runs have a uid")
}

/// Sets one condition, keeping its transition time when its status does not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let message = message.into();
    let existing = conditions.iter_mut().find(|c| c.type_ == type_);
    let transition = match &existing {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(k8s_openapi::jiff::Timestamp::now()),
    };
    let condition = Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: transition,
    };
    match existing {
        Some(c) => *c = condition,
        None => conditions.push(condition),
    }
}

pub fn condition_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

fn env(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

fn env_from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// The run's configuration as the trainer reads it (`STARLING_*`), identical for the
/// exchange and every peer: the exchange refuses peers whose configuration differs.
/// Fails with the field to fix when the spec asks for what this trainer cannot do.
pub fn run_env(spec: &TrainingRunSpec) -> Result<Vec<EnvVar>, validation::FieldError> {
    let unsupported = |path: &str, message: &str| validation::FieldError {
        path: path.into(),
        message: message.into(),
    };
    let model = validation::resolved_model(spec).ok_or_else(|| {
        unsupported(
            "spec.model.preset",
            "a preset needs the built-in `bytes` tokenizer; give an explicit model.config",
        )
    })?;
    // Hugging Face `config.json` keys, which the trainer reads.
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size,
        "num_hidden_layers": model.num_hidden_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.kv_heads(),
        "max_position_embeddings": model.max_position_embeddings,
        "rope_theta": model.rope_theta,
        "rms_norm_eps": model.rms_norm_eps,
        "tie_word_embeddings": model.tie_word_embeddings,
    });
    let s = &spec.schedule;
    let c = &spec.compression;
    let mut out = vec![
        env("STARLING_MODEL_CONFIG", config),
        env("STARLING_SEED", spec.seed),
        env(
            "STARLING_ALGORITHM",
            match c.algorithm {
                Algorithm::SparseLoCo => "sparseloco",
                Algorithm::DiLoCo => "diloco",
                Algorithm::Ddp => "ddp",
            },
        ),
        env("STARLING_MAX_PEERS", spec.peers.max),
        env("STARLING_ROUNDS", s.outer_rounds),
        env("STARLING_INNER_STEPS", s.inner_steps),
        env("STARLING_BATCH", s.batch_size),
        env(
            "STARLING_MICRO_BATCH",
            s.micro_batch_size.unwrap_or(s.batch_size),
        ),
        env("STARLING_SEQUENCE_LENGTH", spec.data.sequence_length),
        env("STARLING_LR", s.inner_optimizer.lr),
        env("STARLING_WARMUP_STEPS", s.inner_optimizer.warmup_steps),
        env("STARLING_OUTER_LR", s.outer_lr),
        env("STARLING_CHUNK", c.chunk_size),
        env("STARLING_TOPK", c.k()),
        env("STARLING_VALUE_BITS", c.value_bits.bits()),
        env("STARLING_ERROR_FEEDBACK", c.error_feedback_decay),
        env("STARLING_TOKENIZER", &spec.data.tokenizer),
    ];
    match &spec.data.corpus {
        CorpusSource {
            builtin: Some(_), ..
        } => {}
        CorpusSource { path: Some(p), .. } => out.push(env("STARLING_CORPUS", p)),
        _ => {
            return Err(unsupported(
                "spec.data.corpus.hubDataset",
                "Hub datasets are not supported yet; use builtin or path",
            ));
        }
    }
    if spec.data.tokenizer != "bytes" {
        return Err(unsupported(
            "spec.data.tokenizer",
            "only the built-in `bytes` tokenizer is supported yet",
        ));
    }
    if spec.model.init.is_some() {
        return Err(unsupported(
            "spec.model.init",
            "starting from Hub weights is not supported yet",
        ));
    }
    Ok(out)
}

/// A fresh random bearer token.
pub fn mint_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..40)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect()
}

/// The run's credentials Secret: one token per peer and one for the operator, plus the
/// exchange's tokens file built from them.
pub fn credentials_secret(run: &TrainingRun, max_peers: u32) -> Value {
    let mut data = BTreeMap::new();
    let mut file = String::new();
    for i in 0..max_peers {
        let token = mint_token();
        file.push_str(&format!("{} {token}\n", PeerId::new(i)));
        data.insert(PeerId::new(i).to_string(), token);
    }
    let operator = mint_token();
    file.push_str(&format!("operator {operator}\n"));
    data.insert("operator".into(), operator);
    data.insert("tokens".into(), file);
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": credentials_name(run),
            "namespace": run.namespace(),
            "labels": run_labels(run),
            "ownerReferences": [owner(run)],
        },
        "type": "Opaque",
        "stringData": data,
    })
}

/// The exchange: one pod (a Deployment, so a lost node brings it back) and a
/// LoadBalancer Service, since members dial it from other clusters and homes.
pub fn exchange_objects(run: &TrainingRun, image: &str, run_env: &[EnvVar]) -> (Value, Value) {
    let name = exchange_name(run);
    let spec = &run.spec;
    let mut labels = run_labels(run);
    labels.insert(LABEL_COMPONENT.into(), "exchange".into());
    let selector = BTreeMap::from([
        (LABEL_RUN_UID.to_string(), run.uid().unwrap_or_default()),
        (LABEL_COMPONENT.to_string(), "exchange".to_string()),
    ]);
    let mut vars: Vec<EnvVar> = run_env.to_vec();
    vars.extend([
        EnvVar {
            name: "POD_IP".into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "status.podIP".into(),
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
        },
        env("STARLING_LISTEN", format!("$(POD_IP):{EXCHANGE_PORT}")),
        env_from_secret("STARLING_TOKENS", &credentials_name(run), "tokens"),
        env("STARLING_MIN_PEERS", spec.peers.min),
        env(
            "STARLING_ROUND_DEADLINE",
            spec.placement.round_deadline_seconds,
        ),
        env("STARLING_STATE_DIR", "state"),
        env("STARLING_DATA_DIR", "data"),
        env("STARLING_CHECKPOINT_DIR", "checkpoints"),
        env("STARLING_CHECKPOINT_EVERY", spec.checkpoint.every_rounds),
        env("STARLING_RUN", run.name_any()),
    ]);
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {
            "name": name, "namespace": run.namespace(), "labels": labels,
            "ownerReferences": [owner(run)],
        },
        "spec": {
            "replicas": 1,
            // Two exchanges of one run must never serve at once.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{
                        "name": "exchange",
                        "image": image,
                        "args": ["exchange"],
                        "env": vars,
                        "workingDir": EXCHANGE_WORKDIR,
                        "ports": [{"name": "grpc", "containerPort": EXCHANGE_PORT}],
                        "volumeMounts": [{"name": "data", "mountPath": EXCHANGE_WORKDIR}],
                        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
                    }],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
        },
    });
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": name, "namespace": run.namespace(), "labels": labels,
            "ownerReferences": [owner(run)],
        },
        "spec": {
            "type": "LoadBalancer",
            "selector": selector,
            "ports": [{"name": "grpc", "port": EXCHANGE_PORT, "targetPort": EXCHANGE_PORT}],
        },
    });
    (deployment, service)
}

/// What a member's agent may do on the hub: read its TrainerGroups and their
/// credentials and write their status in its own namespace, and report its own
/// MemberCluster's status. Nothing else.
pub fn member_rbac(member: &MemberCluster) -> Vec<Value> {
    let name = member.name_any();
    let name = name.as_str();
    let ns = member_namespace(name);
    let owner = json!([{
        "apiVersion": "starling.dev/v1alpha1", "kind": "MemberCluster", "name": name,
        "uid": member.uid(), "controller": true, "blockOwnerDeletion": true,
    }]);
    let labels = json!({LABEL_MEMBER: name, LABEL_MANAGED_BY: MANAGER});
    let role_name = format!("starling-member-{name}");
    let subject = json!([{"kind": "ServiceAccount", "name": "agent", "namespace": ns}]);
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": labels, "ownerReferences": owner}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "agent", "namespace": ns, "labels": labels}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "agent", "namespace": ns, "labels": labels},
        "rules": [
            {"apiGroups": ["starling.dev"], "resources": ["trainergroups"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["starling.dev"], "resources": ["trainergroups/status"],
             "verbs": ["get", "patch", "update"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]},
        ]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "agent", "namespace": ns, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "agent"},
            "subjects": subject}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": role_name, "labels": labels, "ownerReferences": owner},
        "rules": [
            {"apiGroups": ["starling.dev"], "resources": ["memberclusters"],
             "resourceNames": [name], "verbs": ["get", "watch"]},
            {"apiGroups": ["starling.dev"], "resources": ["memberclusters/status"],
             "resourceNames": [name], "verbs": ["get", "patch", "update"]},
        ]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": role_name, "labels": labels, "ownerReferences": owner},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                "name": role_name},
            "subjects": subject}),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TrainingRun {
        let yaml = include_str!("../../crds/samples/trainingrun-shakespeare.yaml");
        let mut run: TrainingRun = serde_yaml::from_str(yaml).unwrap();
        run.metadata.uid = Some("uid-1".into());
        run
    }

    #[test]
    fn the_sample_run_maps_onto_the_trainer_configuration() {
        let run = sample();
        let env = run_env(&run.spec).unwrap();
        let get = |k: &str| {
            env.iter()
                .find(|e| e.name == k)
                .and_then(|e| e.value.clone())
                .unwrap_or_else(|| panic!("{k} missing"))
        };
        assert_eq!(get("STARLING_ROUNDS"), "12");
        assert_eq!(get("STARLING_TOPK"), "64");
        assert_eq!(get("STARLING_MAX_PEERS"), "3");
        let config: Value = serde_json::from_str(&get("STARLING_MODEL_CONFIG")).unwrap();
        assert_eq!(config["vocab_size"], 256);
        assert_eq!(config["num_key_value_heads"], 2);
    }

    #[test]
    fn unsupported_sources_name_the_field_to_change() {
        let mut run = sample();
        run.spec.data.corpus = CorpusSource {
            builtin: None,
            path: None,
            hub_dataset: Some(crate::api::HubRef {
                repo_id: "a/b".into(),
                revision: "main".into(),
            }),
        };
        let err = run_env(&run.spec).unwrap_err();
        assert_eq!(err.path, "spec.data.corpus.hubDataset");
    }

    #[test]
    fn credentials_hold_one_token_per_peer_and_a_matching_tokens_file() {
        let secret = credentials_secret(&sample(), 3);
        let data = &secret["stringData"];
        let file = data["tokens"].as_str().unwrap();
        for peer in ["p0", "p1", "p2", "operator"] {
            let token = data[peer].as_str().unwrap();
            assert!(token.len() >= 32);
            assert!(file.contains(&format!("{peer} {token}\n")));
        }
        assert_ne!(data["p0"], data["p1"]);
    }

    #[test]
    fn conditions_keep_their_transition_time_while_unchanged() {
        let mut conds = vec![];
        set_condition(&mut conds, "Ready", false, "Placing", "a", Some(1));
        let first = conds[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        set_condition(&mut conds, "Ready", false, "Placing", "b", Some(2));
        assert_eq!(conds[0].last_transition_time, first);
        assert_eq!(conds[0].message, "b");
        set_condition(&mut conds, "Ready", true, "Running", "c", Some(2));
        assert_ne!(conds[0].last_transition_time, first);
        assert!(condition_true(&conds, "Ready"));
    }
}
