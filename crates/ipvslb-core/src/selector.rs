//! Kubernetes label selectors (`matchLabels` and `matchExpressions`) as plain data.

use std::collections::BTreeMap;

/// A label selector. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// Labels that must be present with these values.
    pub match_labels: BTreeMap<String, String>,
    /// Further requirements, all of which must hold.
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// The label's value is one of these.
    In(String, Vec<String>),
    /// The label is absent or its value is none of these.
    NotIn(String, Vec<String>),
    /// The label is present.
    Exists(String),
    /// The label is absent.
    DoesNotExist(String),
}

impl Selector {
    /// Whether `labels` satisfy every term.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

/// The selector as `kubectl get -l` writes it (`team=a,zone in (x,y),!off`).
impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut terms: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        terms.extend(self.match_expressions.iter().map(|r| match r {
            Requirement::In(k, v) => format!("{k} in ({})", v.join(",")),
            Requirement::NotIn(k, v) => format!("{k} notin ({})", v.join(",")),
            Requirement::Exists(k) => k.clone(),
            Requirement::DoesNotExist(k) => format!("!{k}"),
        }));
        if terms.is_empty() {
            f.write_str("everything")
        } else {
            f.write_str(&terms.join(","))
        }
    }
}

impl Requirement {
    /// Whether `labels` satisfy this requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_empty_selector_matches_everything() {
        assert!(Selector::default().matches(&labels(&[])));
        assert!(Selector::default().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_and_expressions_must_all_hold() {
        let s = Selector {
            match_labels: labels(&[("role", "lb")]),
            match_expressions: vec![
                Requirement::In("zone".into(), vec!["a".into(), "b".into()]),
                Requirement::NotIn("tier".into(), vec!["test".into()]),
                Requirement::DoesNotExist("off".into()),
            ],
        };
        assert!(s.matches(&labels(&[("role", "lb"), ("zone", "a")])));
        assert!(!s.matches(&labels(&[("role", "lb"), ("zone", "c")])));
        assert!(!s.matches(&labels(&[("role", "lb"), ("zone", "a"), ("tier", "test")])));
        assert!(!s.matches(&labels(&[("role", "lb"), ("zone", "a"), ("off", "")])));
        assert!(!s.matches(&labels(&[("zone", "a")])));
        let exists = Selector {
            match_expressions: vec![Requirement::Exists("x".into())],
            ..Selector::default()
        };
        assert!(exists.matches(&labels(&[("x", "")])));
        assert!(!exists.matches(&labels(&[])));
        assert_eq!(
            s.to_string(),
            "role=lb,zone in (a,b),tier notin (test),!off"
        );
        assert_eq!(exists.to_string(), "x");
    }
}
