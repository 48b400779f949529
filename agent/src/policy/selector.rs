//! Label selectors of policies (`kube::core::Selector`), with the API's
//! rule for invalid ones: they select nothing.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt as _};

/// A parsed selector; `Nothing` for one that does not parse (unknown
/// operator, `In` without values), which the apiserver would have rejected.
#[derive(Clone, Debug)]
pub(super) enum LabelMatch {
    Selector(Selector),
    Nothing,
}

impl LabelMatch {
    /// Parses `selector`; on failure pushes a warning naming `what`.
    pub(super) fn parse(selector: &LabelSelector, what: &dyn Fn() -> String, warnings: &mut Vec<String>) -> Self {
        match Selector::try_from(selector.clone()) {
            Ok(s) => Self::Selector(s),
            Err(e) => {
                warnings.push(format!("{}: invalid label selector, it selects nothing: {}", what(), e.0));
                Self::Nothing
            }
        }
    }

    pub(super) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Selector(s) => s.matches(labels),
            Self::Nothing => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn req(key: &str, op: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_owned(),
            operator: op.to_owned(),
            values: values.map(|v| v.iter().map(|s| (*s).to_owned()).collect()),
        }
    }

    fn parse(sel: LabelSelector) -> (LabelMatch, Vec<String>) {
        let mut w = Vec::new();
        (LabelMatch::parse(&sel, &|| "test".to_owned(), &mut w), w)
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let (m, w) = parse(LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                req("tier", "In", Some(&["a", "b"])),
                req("env", "NotIn", Some(&["prod"])),
                req("owner", "Exists", None),
                req("legacy", "DoesNotExist", None),
            ]),
        });
        assert!(w.is_empty());
        assert!(m.matches(&labels(&[("app", "web"), ("tier", "a"), ("owner", "x")])));
        assert!(m.matches(&labels(&[("app", "web"), ("tier", "b"), ("env", "dev"), ("owner", "")])));
        assert!(!m.matches(&labels(&[("app", "web"), ("tier", "c"), ("owner", "x")])));
        assert!(!m.matches(&labels(&[("app", "web"), ("tier", "a"), ("env", "prod"), ("owner", "x")])));
        assert!(!m.matches(&labels(&[("app", "web"), ("tier", "a")])));
        assert!(!m.matches(&labels(&[("app", "web"), ("tier", "a"), ("owner", "x"), ("legacy", "1")])));
        assert!(!m.matches(&labels(&[("app", "db"), ("tier", "a"), ("owner", "x")])));
    }

    #[test]
    fn empty_selector_selects_all() {
        let (m, _) = parse(LabelSelector::default());
        assert!(m.matches(&labels(&[])));
        assert!(m.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn invalid_selector_selects_nothing_and_warns() {
        let (m, w) = parse(LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![req("a", "Near", Some(&["b"]))]),
        });
        assert!(!m.matches(&labels(&[("a", "b")])));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("test: invalid label selector"), "{w:?}");
    }
}
