//! Label and field selectors (k8s.io/apimachinery/pkg/labels, pkg/fields).

use serde_json::Value;

use super::status::ApiError;

#[derive(Debug, Clone, PartialEq)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
    /// `key>n` / `key<n`: the label's value parsed as an integer.
    Gt(String, i64),
    Lt(String, i64),
    /// What an invalid `matchExpressions` operator selects: nothing
    /// (upstream's conversion fails, and a failed selector matches no object).
    Never,
}

/// A parsed label selector; empty matches everything.
#[derive(Debug, Clone, Default)]
pub struct LabelSelector(Vec<Req>);

/// Split on commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn set_values(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?` of at most 63 characters
/// (a label name, or a label value when non-empty).
fn label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
fn label_key(k: &str) -> bool {
    match k.split_once('/') {
        Some((prefix, name)) => {
            !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|l| {
                    !l.is_empty() && l.len() <= 63 && l.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                })
                && label_name(name)
        }
        None => label_name(k),
    }
}

fn label_value(v: &str) -> bool {
    v.is_empty() || label_name(v)
}

impl LabelSelector {
    /// The string form (`k=v`, `k!=v`, `k in (a,b)`, `k notin (a)`, `k`,
    /// `!k`, `k>1`, `k<1`); anything else, including an invalid key or
    /// value, is a 400 as in `labels.Parse`.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = |why: &str| ApiError::bad_request(format!("unable to parse requirement: {why}: invalid label selector {s:?}"));
        let key = |k: &str| {
            let k = k.trim();
            if label_key(k) { Ok(k.to_string()) } else { Err(bad(&format!("invalid label key {k:?}"))) }
        };
        let value = |v: &str| {
            let v = v.trim();
            if label_value(v) { Ok(v.to_string()) } else { Err(bad(&format!("invalid label value {v:?}"))) }
        };
        let values = |v: &str| -> Result<Vec<String>, ApiError> {
            set_values(v).ok_or_else(|| bad("expected a parenthesised set of values"))?.iter().map(|x| value(x)).collect()
        };
        let int = |v: &str| v.trim().parse::<i64>().map_err(|_| bad(&format!("{:?} is not an integer", v.trim())));
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let p = part.trim();
            if p.is_empty() {
                continue;
            }
            if let Some(k) = p.strip_prefix('!') {
                reqs.push(Req::NotExists(key(k)?));
            } else if let Some((k, v)) = p.split_once("!=") {
                reqs.push(Req::NotEq(key(k)?, value(v)?));
            } else if let Some((k, v)) = p.split_once("==") {
                reqs.push(Req::Eq(key(k)?, value(v)?));
            } else if let Some((k, v)) = p.split_once('=') {
                reqs.push(Req::Eq(key(k)?, value(v)?));
            } else if let Some((k, v)) = p.split_once('>') {
                reqs.push(Req::Gt(key(k)?, int(v)?));
            } else if let Some((k, v)) = p.split_once('<') {
                reqs.push(Req::Lt(key(k)?, int(v)?));
            } else if let Some(idx) = p.find(" notin ") {
                reqs.push(Req::NotIn(key(&p[..idx])?, values(&p[idx + 7..])?));
            } else if let Some(idx) = p.find(" in ") {
                reqs.push(Req::In(key(&p[..idx])?, values(&p[idx + 4..])?));
            } else {
                reqs.push(Req::Exists(key(p)?));
            }
        }
        Ok(Self(reqs))
    }

    /// From a `metav1.LabelSelector` object (matchLabels + matchExpressions).
    pub fn from_object(sel: &Value) -> Self {
        let mut reqs = Vec::new();
        if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in m {
                reqs.push(Req::Eq(k.clone(), v.as_str().unwrap_or("").to_string()));
            }
        }
        if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
            for e in exprs {
                let key = e.get("key").and_then(Value::as_str).unwrap_or("").to_string();
                let values: Vec<String> = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                match e.get("operator").and_then(Value::as_str).unwrap_or("") {
                    "In" => reqs.push(Req::In(key, values)),
                    "NotIn" => reqs.push(Req::NotIn(key, values)),
                    "Exists" => reqs.push(Req::Exists(key)),
                    "DoesNotExist" => reqs.push(Req::NotExists(key)),
                    _ => reqs.push(Req::Never),
                }
            }
        }
        Self(reqs)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v.as_str()),
            Req::NotEq(k, v) => get(k) != Some(v.as_str()),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
            Req::Gt(k, n) => get(k).and_then(|x| x.parse::<i64>().ok()).is_some_and(|x| x > *n),
            Req::Lt(k, n) => get(k).and_then(|x| x.parse::<i64>().ok()).is_some_and(|x| x < *n),
            Req::Never => false,
        })
    }

    /// Render as the string form (used for Scale.status.selector).
    pub fn to_string_form(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|r| match r {
                Req::Eq(k, v) => format!("{k}={v}"),
                Req::NotEq(k, v) => format!("{k}!={v}"),
                Req::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                Req::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                Req::Exists(k) => k.clone(),
                Req::NotExists(k) => format!("!{k}"),
                Req::Gt(k, n) => format!("{k}>{n}"),
                Req::Lt(k, n) => format!("{k}<{n}"),
                // No string form selects nothing; an impossible pair does.
                Req::Never => "riptide.io/never,!riptide.io/never".to_string(),
            })
            .collect();
        parts.join(",")
    }
}

/// A field selector over arbitrary dotted paths (`metadata.name`,
/// `spec.nodeName`, `status.phase`, `involvedObject.uid`, …). A missing
/// field compares as the empty string, as kube-apiserver's field sets do.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut out = Vec::new();
        for part in s.split(',') {
            let p = part.trim();
            if p.is_empty() {
                continue;
            }
            let cant = || ApiError::bad_request(format!("invalid selector: '{s}'; can't understand '{p}'"));
            let (k, eq, v) = if let Some((k, v)) = p.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = p.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = p.split_once('=') {
                (k, true, v)
            } else {
                return Err(cant());
            };
            // A field path; anything else in the key is an operator we do not know (`>=`, `~=`, …).
            let k = k.trim();
            if k.is_empty() || !k.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c)) {
                return Err(cant());
            }
            out.push((k.to_string(), eq, v.trim().to_string()));
        }
        Ok(Self(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The single `metadata.name=X` value, if that is all the selector asks.
    pub fn exact_name(&self) -> Option<&str> {
        self.0.iter().find(|(k, eq, _)| k == "metadata.name" && *eq).map(|(_, _, v)| v.as_str())
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(k, eq, v)| {
            let ptr = format!("/{}", k.replace('.', "/"));
            let actual = match obj.pointer(&ptr) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (actual == *v) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn label_selectors() {
        let o = json!({"metadata": {"labels": {"app": "web", "tier": "fe"}}});
        for (s, want) in [
            ("app=web", true),
            ("app==web,tier=fe", true),
            ("app!=web", false),
            ("app in (web,db)", true),
            ("tier notin (fe)", false),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("", true),
            ("app.kubernetes.io/name in (web)", false),
            ("tier>1", false),
        ] {
            assert_eq!(LabelSelector::parse(s).map(|l| l.matches(&o)).ok(), Some(want), "{s}");
        }
        let n = json!({"metadata": {"labels": {"gen": "5"}}});
        assert!(LabelSelector::parse("gen>4").is_ok_and(|l| l.matches(&n)));
        assert!(LabelSelector::parse("gen<5").is_ok_and(|l| !l.matches(&n)));
    }

    #[test]
    fn unknown_selector_operators_are_400() {
        for s in ["app~=web", "app>=1", "app in web", "app notin (a", "a b", "app=we b", "-x", "app=web,tier=>fe", "gen>x"] {
            assert_eq!(LabelSelector::parse(s).map_err(|e| e.code).err(), Some(400), "{s}");
        }
        for s in ["metadata.name>=a", "spec.nodeName~=x", "status.phase", "a b=c"] {
            assert_eq!(FieldSelector::parse(s).map_err(|e| e.code).err(), Some(400), "{s}");
        }
        let weird = LabelSelector::from_object(&json!({"matchExpressions": [{"key": "a", "operator": "Near"}]}));
        assert!(!weird.matches(&json!({"metadata": {"labels": {"a": "1"}}})));
    }

    #[test]
    fn field_selectors() {
        let o = json!({"metadata": {"name": "a", "namespace": "d"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        assert!(FieldSelector::parse("metadata.name=a,spec.nodeName=n1").is_ok_and(|f| f.matches(&o)));
        assert!(FieldSelector::parse("status.phase!=Running").is_ok_and(|f| !f.matches(&o)));
        assert!(FieldSelector::parse("spec.schedulerName=").is_ok_and(|f| f.matches(&o)));
    }
}
