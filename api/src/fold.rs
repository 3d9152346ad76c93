//! Point-in-time state of a stream: its events folded in order.
//!
//! By default each event's payload is applied as a JSON merge patch (RFC
//! 7386) to the state so far. Reducers per event type change that, from a
//! TOML file (`--api-reducers FILE`):
//!
//! ```toml
//! [reducers]
//! "order.snapshot" = "replace"   # the payload becomes the whole state
//! "audit.*" = "ignore"           # not applied, not listed
//! "*" = "merge"                  # the default
//! ```
//!
//! Patterns are exact types, prefixes ending in `.*`, or `*`; an exact
//! match wins over a prefix, a longer prefix over a shorter one.

use std::collections::HashMap;
use std::path::Path;

use audit_ledger::query::TypePattern;
use serde::Deserialize;
use serde_json::{Map, Value};

/// How one event changes the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reducer {
    /// RFC 7386 merge patch of the payload into the state.
    Merge,
    /// The payload replaces the state.
    Replace,
    /// The event does not change the state.
    Ignore,
}

/// Reducers by event type.
#[derive(Debug, Clone)]
pub struct Reducers {
    exact: HashMap<String, Reducer>,
    /// Longest prefix first.
    prefixes: Vec<(String, Reducer)>,
    default: Reducer,
}

impl Default for Reducers {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            prefixes: Vec::new(),
            default: Reducer::Merge,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid reducers file {origin}: {reason}")]
pub struct ReducersError {
    pub origin: String,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReducersFile {
    #[serde(default)]
    reducers: HashMap<String, Reducer>,
}

impl Reducers {
    pub fn load(path: &Path) -> Result<Self, ReducersError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ReducersError {
            origin: origin.clone(),
            reason: format!("{e}; check --api-reducers (AUDIT_API_REDUCERS)"),
        })?;
        Self::from_toml_str(&text, &origin)
    }

    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ReducersError> {
        let error = |reason: String| ReducersError {
            origin: origin.to_owned(),
            reason,
        };
        let file: ReducersFile = toml::from_str(text).map_err(|e| {
            error(format!(
                "{e}; expected a [reducers] table of event type patterns to \"merge\", \"replace\" or \"ignore\""
            ))
        })?;
        let mut reducers = Self::default();
        for (pattern, reducer) in file.reducers {
            match pattern
                .parse::<TypePattern>()
                .map_err(|e| error(e.to_string()))?
            {
                TypePattern::Exact(t) => {
                    reducers.exact.insert(t, reducer);
                }
                TypePattern::Prefix(p) => reducers.prefixes.push((p, reducer)),
                TypePattern::Any => reducers.default = reducer,
            }
        }
        reducers
            .prefixes
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Ok(reducers)
    }

    pub fn for_type(&self, event_type: &str) -> Reducer {
        if let Some(r) = self.exact.get(event_type) {
            return *r;
        }
        self.prefixes
            .iter()
            .find(|(p, _)| event_type.starts_with(p.as_str()))
            .map(|(_, r)| *r)
            .unwrap_or(self.default)
    }

    /// Applies one event's payload to `state` (which starts as `null`).
    /// Returns whether the event was applied.
    pub fn apply(&self, state: &mut Value, event_type: &str, payload: &Value) -> bool {
        match self.for_type(event_type) {
            Reducer::Merge => {
                merge_patch(state, payload);
                true
            }
            Reducer::Replace => {
                *state = payload.clone();
                true
            }
            Reducer::Ignore => false,
        }
    }
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes a
/// key, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The examples of RFC 7386, appendix A.
    #[test]
    fn merge_patch_follows_rfc_7386() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, expected) in cases {
            let mut state = target.clone();
            merge_patch(&mut state, &patch);
            assert_eq!(state, expected, "{target} + {patch}");
        }
    }

    #[test]
    fn reducers_pick_the_most_specific_pattern() {
        let r = Reducers::from_toml_str(
            r#"
            [reducers]
            "order.*" = "replace"
            "order.item.*" = "merge"
            "order.note" = "ignore"
            "*" = "ignore"
            "#,
            "test",
        )
        .unwrap();
        assert_eq!(r.for_type("order.created"), Reducer::Replace);
        assert_eq!(r.for_type("order.item.added"), Reducer::Merge);
        assert_eq!(r.for_type("order.note"), Reducer::Ignore);
        assert_eq!(r.for_type("payment.done"), Reducer::Ignore);
        assert_eq!(Reducers::default().for_type("x"), Reducer::Merge);

        let mut state = Value::Null;
        assert!(r.apply(&mut state, "order.created", &json!({"a": 1, "b": 2})));
        assert!(r.apply(&mut state, "order.item.added", &json!({"b": null, "c": 3})));
        assert!(!r.apply(&mut state, "order.note", &json!({"x": 1})));
        assert_eq!(state, json!({"a": 1, "c": 3}));
    }

    #[test]
    fn bad_reducer_files_are_refused() {
        for text in [
            "[reducers]\n\"a\" = \"sum\"",
            "[reducers]\n\"a*\" = \"merge\"",
            "[other]\n",
        ] {
            assert!(Reducers::from_toml_str(text, "t").is_err(), "{text}");
        }
    }
}
