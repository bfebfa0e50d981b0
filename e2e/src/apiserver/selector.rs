//! Label selectors (`a=b,c!=d,e,!f,g in (x,y),h notin (z)`) and field selectors on any
//! string field by its dotted path (`metadata.name`, `involvedObject.uid`, ...). A real
//! server allows only some fields per kind; this one allows all.

use serde_json::Value;

use super::error::ApiError;

#[derive(Clone, Debug, PartialEq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selector {
    labels: Vec<Requirement>,
    fields: Vec<(String, bool, String)>,
}

/// Splits on commas outside parentheses.
fn terms(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (vec![], 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.into_iter().filter(|t| !t.is_empty()).collect()
}

fn set(values: &str) -> Result<Vec<String>, ApiError> {
    let inner = values
        .trim()
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(|| ApiError::bad_request(format!("invalid label selector set {values:?}")))?;
    Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
}

impl Selector {
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, ApiError> {
        let mut selector = Selector::default();
        for term in terms(labels.unwrap_or_default()) {
            let req = if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotIn(k.trim().into(), vec![v.trim().into()])
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Requirement::In(k.trim().into(), vec![v.trim().into()])
            } else if let Some((k, v)) = term.split_once(" notin ") {
                Requirement::NotIn(k.trim().into(), set(v)?)
            } else if let Some((k, v)) = term.split_once(" in ") {
                Requirement::In(k.trim().into(), set(v)?)
            } else if let Some(k) = term.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else {
                Requirement::Exists(term.into())
            };
            selector.labels.push(req);
        }
        for term in terms(fields.unwrap_or_default()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector {term:?}"
                )));
            };
            selector.fields.push((field.into(), equal, value.into()));
        }
        Ok(selector)
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |k: &str| labels[k].as_str();
        let labels_ok = self.labels.iter().all(|r| match r {
            Requirement::In(k, vs) => label(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            Requirement::NotIn(k, vs) => label(k).is_none_or(|v| vs.iter().all(|x| x != v)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        });
        let fields_ok = self.fields.iter().all(|(field, equal, value)| {
            let actual = field
                .split('.')
                .try_fold(object, |v, key| v.get(key))
                .and_then(Value::as_str);
            (actual.unwrap_or_default() == value) == *equal
        });
        labels_ok && fields_ok
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn label_and_field_selectors_match_as_kubernetes_does() {
        let obj = json!({"metadata": {"name": "a", "namespace": "n",
            "labels": {"tier": "home", "gpu": "4090"}},
            "involvedObject": {"kind": "Pod", "name": "a"}});
        let ok = |l: &str, f: &str| Selector::parse(Some(l), Some(f)).unwrap().matches(&obj);
        assert!(ok("", ""));
        assert!(ok("tier=home", "metadata.name=a"));
        assert!(ok("tier==home,gpu", "metadata.namespace!=x"));
        assert!(ok("tier in (cloud, home),!region", ""));
        assert!(!ok("tier notin (home)", ""));
        assert!(!ok("tier!=home", ""));
        assert!(!ok("", "metadata.name=b"));
        assert!(ok("", "involvedObject.kind=Pod,involvedObject.name!=b"));
        assert!(!ok("", "involvedObject.name=b"));
        assert!(Selector::parse(None, Some("spec.x")).is_err());
    }
}
