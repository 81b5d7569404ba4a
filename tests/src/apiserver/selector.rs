//! Label and field selectors as the API server parses them from `labelSelector` /
//! `fieldSelector` query parameters, and matching them against stored JSON objects.

use serde_json::Value;

/// A selector that could not be parsed; the server answers 400 BadRequest with this text,
/// as kube-apiserver does.
#[derive(Debug, thiserror::Error)]
#[error("unable to parse requirement: {0}")]
pub struct SelectorError(String);

/// One requirement of a label selector, in the set-based grammar of
/// `k8s.io/apimachinery/pkg/labels`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed `labelSelector`: all requirements must hold (comma means AND).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    /// Parses `a=b,!c,d in (x,y),e notin (z),f!=g,h`.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                // kube-apiserver accepts an empty selector (and stray commas are harmless).
                continue;
            }
            reqs.push(parse_requirement(part)?);
        }
        Ok(Self(reqs))
    }

    /// Whether an object with these labels is selected. Like Kubernetes, `!=` and `notin`
    /// also select objects that do not have the key at all.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
        })
    }

    /// Whether the selector selects everything (no requirements).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Splits on commas that are not inside `( ... )`, so `a in (x,y),b` is two requirements.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_requirement(part: &str) -> Result<LabelReq, SelectorError> {
    let bad = || SelectorError(part.to_string());
    if let Some(key) = part.strip_prefix('!') {
        return Ok(LabelReq::NotExists(valid_key(key.trim()).ok_or_else(bad)?));
    }
    if let Some((key, value)) = part.split_once("!=") {
        return Ok(LabelReq::NotEquals(
            valid_key(key.trim()).ok_or_else(bad)?,
            value.trim().to_string(),
        ));
    }
    if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(LabelReq::Equals(
            valid_key(key.trim()).ok_or_else(bad)?,
            value.trim().to_string(),
        ));
    }
    if let Some(open) = part.find('(') {
        let close = part.rfind(')').filter(|&c| c > open).ok_or_else(bad)?;
        if !part[close + 1..].trim().is_empty() {
            return Err(bad());
        }
        let values: Vec<String> = part[open + 1..close]
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        let mut head = part[..open].split_whitespace();
        let (key, op) = (head.next().ok_or_else(bad)?, head.next().ok_or_else(bad)?);
        if head.next().is_some() {
            return Err(bad());
        }
        let key = valid_key(key).ok_or_else(bad)?;
        return match op {
            "in" => Ok(LabelReq::In(key, values)),
            "notin" => Ok(LabelReq::NotIn(key, values)),
            _ => Err(bad()),
        };
    }
    Ok(LabelReq::Exists(valid_key(part).ok_or_else(bad)?))
}

/// A label key: non-empty, no whitespace and none of the operator characters.
fn valid_key(key: &str) -> Option<String> {
    let ok = !key.is_empty()
        && !key
            .chars()
            .any(|c| c.is_whitespace() || "!=(),".contains(c));
    ok.then(|| key.to_string())
}

/// One term of a `fieldSelector`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldReq {
    field: String,
    value: String,
    negated: bool,
}

/// A parsed `fieldSelector`. Only the fields every resource supports (`metadata.name`,
/// `metadata.namespace`) are known; others are refused like kube-apiserver refuses
/// unsupported field labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<FieldReq>);

impl FieldSelector {
    /// Parses `metadata.name=x,metadata.namespace!=y`.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, value, negated) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, v, false)
            } else {
                return Err(SelectorError(part.to_string()));
            };
            let field = field.trim();
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(SelectorError(format!("field label not supported: {field}")));
            }
            reqs.push(FieldReq {
                field: field.to_string(),
                value: value.trim().to_string(),
                negated,
            });
        }
        Ok(Self(reqs))
    }

    /// Whether the object is selected.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|req| {
            let pointer = match req.field.as_str() {
                "metadata.name" => "/metadata/name",
                _ => "/metadata/namespace",
            };
            let actual = obj.pointer(pointer).and_then(Value::as_str).unwrap_or("");
            (actual == req.value) != req.negated
        })
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "n1", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn kube_proxy_selector() {
        let sel = LabelSelector::parse(
            "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name",
        )
        .expect("parses");
        assert!(sel.matches(&obj(json!({"app": "x"}))));
        assert!(sel.matches(&json!({"metadata": {"name": "no-labels"}})));
        assert!(!sel.matches(&obj(json!({"service.kubernetes.io/headless": ""}))));
        assert!(!sel.matches(&obj(
            json!({"service.kubernetes.io/service-proxy-name": "other"})
        )));
    }

    #[test]
    fn set_based_and_equality() {
        let sel = LabelSelector::parse("a=1, b in (x, y),c notin (z),d!=2,e").expect("parses");
        assert!(sel.matches(&obj(json!({"a": "1", "b": "y", "e": ""}))));
        assert!(sel.matches(&obj(
            json!({"a": "1", "b": "x", "c": "q", "d": "3", "e": "v"})
        )));
        assert!(!sel.matches(&obj(json!({"a": "1", "b": "y", "c": "z", "e": ""}))));
        assert!(!sel.matches(&obj(json!({"a": "1", "b": "w", "e": ""}))));
        assert!(!sel.matches(&obj(json!({"a": "1", "b": "x", "d": "2", "e": ""}))));
        assert!(!sel.matches(&obj(json!({"a": "1", "b": "x"}))));
        assert!(LabelSelector::parse("a in (x").is_err());
        assert!(LabelSelector::parse("a foo (x)").is_err());
        assert!(LabelSelector::parse("=x").is_err());
        assert!(LabelSelector::parse("").expect("empty parses").is_empty());
    }

    #[test]
    fn field_selector() {
        let sel = FieldSelector::parse("metadata.name=n1").expect("parses");
        assert!(sel.matches(&obj(json!({}))));
        assert!(
            !FieldSelector::parse("metadata.name!=n1")
                .expect("parses")
                .matches(&obj(json!({})))
        );
        assert!(FieldSelector::parse("spec.nodeName=x").is_err());
    }
}
