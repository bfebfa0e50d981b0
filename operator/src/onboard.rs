//! Onboarding a member cluster, run by the hub's administrator against the hub:
//! `starling-operator member add` registers the member's MemberCluster, waits for the
//! operator to make the member's agent ServiceAccount, and writes the two files the
//! member's administrator applies there — a Secret holding a hub kubeconfig with a bound
//! token of that ServiceAccount (TokenRequest, with an expiry), and the member chart's
//! values file that names the Secret, so no credential lands in Helm's release record.
//! `member rotate-token` writes a new Secret with a fresh token; the member's
//! MemberCluster, namespace and TrainerGroups are untouched, so the agent keeps its place.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::api::{MemberCluster, Tier};
use crate::k8s::member_namespace;

/// The agent's ServiceAccount on the hub, in the member's namespace.
pub const AGENT_ACCOUNT: &str = "agent";
/// The Secret the member chart reads the hub kubeconfig from, and its key.
pub const SECRET_NAME: &str = "starling-hub-kubeconfig";
pub const SECRET_KEY: &str = "kubeconfig";

/// How a member's agent reaches the hub, and for how long its token lasts.
#[derive(Clone, Debug, clap::Args)]
pub struct Access {
    /// The hub API server's URL as members reach it (by default the one in your
    /// kubeconfig, which may be a private address).
    #[arg(long)]
    pub hub_url: Option<String>,
    /// How long the agent's token is valid, in hours; rotate it before then.
    #[arg(long, default_value_t = 720, value_parser = clap::value_parser!(u32).range(1..))]
    pub token_hours: u32,
    /// The namespace on the member where the member chart is installed (the Secret's).
    #[arg(long, default_value = "starling-system")]
    pub member_namespace: String,
    /// How long to wait for the hub operator to make the member's agent ServiceAccount.
    #[arg(long, default_value_t = 60)]
    pub wait_seconds: u64,
    /// Where to write `member-NAME-secret.yaml` and `member-NAME.yaml`.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

/// What `member add` registers.
#[derive(Clone, Debug, clap::Args)]
pub struct NewMember {
    /// The member's name (a DNS label), as its MemberCluster is called.
    pub name: String,
    /// `cloud` or `home`.
    #[arg(long, value_parser = parse_tier)]
    pub tier: Tier,
    #[arg(long)]
    pub region: String,
    /// The member's link, up and down, in Mb/s (a home link's upload caps its trainers).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub bandwidth_mbps: u32,
    /// The most trainer pods the member runs at once.
    #[arg(long)]
    pub max_trainers: Option<u32>,
}

fn parse_tier(text: &str) -> Result<Tier, String> {
    serde_json::from_value(json!(text))
        .map_err(|_| format!("{text:?} is not a tier: cloud or home"))
}

impl NewMember {
    /// The MemberCluster it describes.
    pub fn object(&self) -> serde_json::Result<MemberCluster> {
        serde_json::from_value(json!({
            "apiVersion": "starling.dev/v1alpha1", "kind": "MemberCluster",
            "metadata": {"name": self.name},
            "spec": {
                "tier": self.tier, "region": self.region,
                "bandwidth": {"uploadMbps": self.bandwidth_mbps, "downloadMbps": self.bandwidth_mbps},
                "maxTrainers": self.max_trainers,
            },
        }))
    }
}

/// The files written for a member.
#[derive(Debug)]
pub struct Written {
    pub secret: PathBuf,
    pub values: Option<PathBuf>,
    /// When the token stops working (RFC 3339).
    pub expires: String,
}

/// Registers `member` (server-side apply: running it again updates the spec), waits for
/// its agent's ServiceAccount, and writes the Secret and the values file.
pub async fn add(
    hub: &kube::Client,
    config: &kube::Config,
    member: &NewMember,
    access: &Access,
) -> anyhow::Result<Written> {
    let object = member.object()?;
    let api: Api<MemberCluster> = Api::all(hub.clone());
    api.patch(
        &member.name,
        &PatchParams::apply("starling-member-add"),
        &Patch::Apply(&object),
    )
    .await
    .with_context(|| format!("registering MemberCluster {}", member.name))?;
    let mut written = rotate(hub, config, &member.name, access).await?;
    let values = access.out.join(format!("member-{}.yaml", member.name));
    let upload = (member.tier == Tier::Home).then_some(member.bandwidth_mbps);
    std::fs::write(&values, values_file(&member.name, upload))
        .with_context(|| values.display().to_string())?;
    written.values = Some(values);
    Ok(written)
}

/// A member agent's way into the hub.
#[derive(Clone, Debug)]
pub struct Issued {
    /// A kubeconfig for the hub holding the token.
    pub kubeconfig: String,
    pub token: String,
    /// When the token stops working (RFC 3339).
    pub expires: String,
}

/// A fresh bound token for `member`'s agent, in a kubeconfig for the hub at `hub_url`
/// (by default the URL `config` reaches it at), trusting the CA `config` trusts. Waits
/// for the operator to have made the agent's ServiceAccount.
pub async fn issue(
    hub: &kube::Client,
    config: &kube::Config,
    member: &str,
    hub_url: Option<&str>,
    (hours, wait): (u32, Duration),
) -> anyhow::Result<Issued> {
    let namespace = member_namespace(member);
    wait_for_account(hub, &namespace, wait).await?;
    let (token, expires) = request_token(hub, &namespace, hours).await?;
    let url = hub_url.map_or_else(|| config.cluster_url.to_string(), str::to_owned);
    let ca = config
        .root_cert
        .as_ref()
        .and_then(|certs| certs.first())
        .map(|der| pem(der));
    let kubeconfig = hub_kubeconfig(url.trim_end_matches('/'), ca.as_deref(), member, &token);
    Ok(Issued {
        kubeconfig,
        token,
        expires,
    })
}

/// Issues a fresh token for `member`'s agent and writes its Secret.
pub async fn rotate(
    hub: &kube::Client,
    config: &kube::Config,
    member: &str,
    access: &Access,
) -> anyhow::Result<Written> {
    let wait = Duration::from_secs(access.wait_seconds);
    let issued = issue(
        hub,
        config,
        member,
        access.hub_url.as_deref(),
        (access.token_hours, wait),
    )
    .await?;
    std::fs::create_dir_all(&access.out).with_context(|| access.out.display().to_string())?;
    let secret = access.out.join(format!("member-{member}-secret.yaml"));
    let manifest = secret_manifest(
        &access.member_namespace,
        &issued.kubeconfig,
        &issued.expires,
    );
    std::fs::write(&secret, manifest).with_context(|| secret.display().to_string())?;
    Ok(Written {
        secret,
        values: None,
        expires: issued.expires,
    })
}

async fn wait_for_account(
    hub: &kube::Client,
    namespace: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let api: Api<ServiceAccount> = Api::namespaced(hub.clone(), namespace);
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if api.get_opt(AGENT_ACCOUNT).await?.is_some() {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the hub operator did not make ServiceAccount {namespace}/{AGENT_ACCOUNT} within {}s: \
             is it running (kubectl -n starling-system get pods)?",
            within.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A bound token for the agent's ServiceAccount (TokenRequest) and its expiry.
async fn request_token(
    hub: &kube::Client,
    namespace: &str,
    hours: u32,
) -> anyhow::Result<(String, String)> {
    let api: Api<ServiceAccount> = Api::namespaced(hub.clone(), namespace);
    let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": u64::from(hours) * 3600}});
    let response: Value = api
        .create_subresource("token", AGENT_ACCOUNT, &PostParams::default(), &request)
        .await
        .with_context(|| format!("requesting a token for {namespace}/{AGENT_ACCOUNT}"))?;
    let status = &response["status"];
    let token = status["token"]
        .as_str()
        .context("a TokenRequest without a token")?;
    let expires = status["expirationTimestamp"].as_str().unwrap_or_default();
    Ok((token.to_owned(), expires.to_owned()))
}

/// The bearer token a client configuration authenticates with, if it has one inline.
pub fn bearer_token(config: &kube::Config) -> Option<String> {
    use secrecy::ExposeSecret;
    let token = config.auth_info.token.as_ref()?;
    Some(token.expose_secret().to_owned())
}

/// When a bound ServiceAccount token was issued and expires: its JWT claims `iat` and
/// `exp` (read, not verified: the hub verifies it; the agent only needs to know when to
/// ask for a new one). `None` for a token that is not a JWT or never expires.
pub fn token_lifetime(
    token: &str,
) -> Option<(k8s_openapi::jiff::Timestamp, k8s_openapi::jiff::Timestamp)> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let at = |claim: &str| k8s_openapi::jiff::Timestamp::from_second(claims[claim].as_i64()?).ok();
    Some((at("iat")?, at("exp")?))
}

fn pem(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// A kubeconfig for the hub at `url` (trusting `ca_pem`, if given) as `token`.
pub fn hub_kubeconfig(url: &str, ca_pem: Option<&str>, member: &str, token: &str) -> String {
    let mut cluster = json!({"server": url});
    if let Some(ca) = ca_pem {
        cluster["certificate-authority-data"] =
            json!(base64::engine::general_purpose::STANDARD.encode(ca));
    }
    let name = format!("starling-hub-{member}");
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "hub", "cluster": cluster}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "hub", "context": {"cluster": "hub", "user": name}}],
        "current-context": "hub",
    });
    serde_yaml::to_string(&config).unwrap_or_default()
}

/// The Secret the member chart mounts, as a manifest to `kubectl apply` on the member.
pub fn secret_manifest(namespace: &str, kubeconfig: &str, expires: &str) -> String {
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": SECRET_NAME, "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "starling"},
            "annotations": {"starling.dev/token-expires": expires}},
        "type": "Opaque",
        "stringData": {SECRET_KEY: kubeconfig},
    });
    serde_yaml::to_string(&secret).unwrap_or_default()
}

/// The member chart's values for `member`: its name, the Secret, and a home link's cap.
pub fn values_file(member: &str, upload_mbps: Option<u32>) -> String {
    let mut values = json!({
        "member": {"name": member},
        "hub": {"existingSecret": SECRET_NAME, "key": SECRET_KEY},
    });
    if let Some(mbps) = upload_mbps {
        values["trainers"] = json!({"uploadLimitMbps": mbps});
    }
    format!(
        "# helm install starling-member charts/starling-member -n starling-system -f {}\n{}",
        Path::new(&format!("member-{member}.yaml")).display(),
        serde_yaml::to_string(&values).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: Value) -> String {
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.sig", b64(&json!({"alg": "RS256"})), b64(&claims))
    }

    #[test]
    fn a_bound_tokens_lifetime_is_read_from_its_claims_and_other_tokens_have_none() {
        let token = jwt(json!({"iat": 1_700_000_000, "exp": 1_700_086_400}));
        let (issued, expires) = token_lifetime(&token).unwrap();
        assert_eq!(expires.duration_since(issued).as_secs(), 86_400);
        assert_eq!(token_lifetime(&jwt(json!({"sub": "x"}))), None, "no expiry");
        assert_eq!(token_lifetime("an-opaque-token"), None);
        assert_eq!(token_lifetime("a.!!!.c"), None);
    }

    async fn config_of(kubeconfig: &str) -> kube::Config {
        let parsed = kube::config::Kubeconfig::from_yaml(kubeconfig).unwrap();
        kube::Config::from_custom_kubeconfig(parsed, &Default::default())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_token_of_the_current_context_is_found_in_a_written_kubeconfig() {
        let written = hub_kubeconfig("https://hub:6443", None, "home", "secret-token");
        let config = config_of(&written).await;
        assert_eq!(bearer_token(&config).as_deref(), Some("secret-token"));
        assert_eq!(config.cluster_url.to_string(), "https://hub:6443/");
        let without = written.replace("token: secret-token", "username: someone");
        assert_eq!(bearer_token(&config_of(&without).await), None);
    }
}
