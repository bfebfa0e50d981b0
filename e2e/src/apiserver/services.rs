//! What the API server itself fills in on Services: the virtual IP it allocates.

use serde_json::{Value, json};

/// A Service's virtual IP, as the API server allocates one on create (from 10.96.0.0/16
/// here; `n` is unique per object): every type but ExternalName, unless headless
/// (`clusterIP: None`) or given one.
pub(super) fn allocate_cluster_ip(service: &mut Value, n: u64) {
    let spec = &mut service["spec"];
    if spec["type"].is_null() {
        spec["type"] = json!("ClusterIP");
    }
    if spec["type"] == "ExternalName" {
        return;
    }
    let ip = match spec["clusterIP"].as_str() {
        Some(ip) if !ip.is_empty() => ip.to_owned(),
        _ => format!("10.96.{}.{}", (n >> 8) & 0xff, n & 0xff),
    };
    spec["clusterIP"] = json!(ip);
    spec["clusterIPs"] = json!([ip]);
}

/// An update that leaves out the Service's allocated IP keeps it, as a real server does.
pub(super) fn keep_cluster_ip(service: &mut Value, current: &Value) {
    for field in ["clusterIP", "clusterIPs"] {
        let given = &service["spec"][field];
        if (given.is_null() || given == "") && !current["spec"][field].is_null() {
            service["spec"][field] = current["spec"][field].clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_get_a_cluster_ip_unless_headless_external_or_given_one() {
        let mut plain = json!({"spec": {"ports": [{"port": 80}]}});
        allocate_cluster_ip(&mut plain, 258);
        assert_eq!(plain["spec"]["type"], "ClusterIP");
        assert_eq!(plain["spec"]["clusterIP"], "10.96.1.2");
        assert_eq!(plain["spec"]["clusterIPs"], json!(["10.96.1.2"]));
        let mut headless = json!({"spec": {"clusterIP": "None"}});
        allocate_cluster_ip(&mut headless, 3);
        assert_eq!(headless["spec"]["clusterIP"], "None");
        let mut external = json!({"spec": {"type": "ExternalName", "externalName": "x.org"}});
        allocate_cluster_ip(&mut external, 4);
        assert!(external["spec"]["clusterIP"].is_null());
        // An update without the IP keeps the allocated one.
        let mut update = json!({"spec": {"ports": [{"port": 81}]}});
        keep_cluster_ip(&mut update, &plain);
        assert_eq!(update["spec"]["clusterIP"], "10.96.1.2");
    }
}
