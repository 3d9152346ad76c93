//! Which payload fields are sensitive, per event type.
//!
//! The policy is compiled once at start-up: `fields_for` runs for every event,
//! so it is a hash lookup (exact event types) or a short scan (prefix
//! patterns) returning a precomputed slice, never a merge.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::error::PolicyError;
use super::text::FieldPlan;
use crate::envelope::MAX_IDENTIFIER_LEN;

/// The policy used when no policy file is given. Public so an operator can
/// print it as a starting point for their own.
pub const DEFAULT_POLICY_TOML: &str = r#"version = 1
subject_pointer = "/customer/id"

[[protect]]
event_types = ["*"]
fields = [
    "/customer/name",
    "/customer/email",
    "/customer/phone",
    "/customer/address",
    "/shipping_address",
    "/billing_address",
    "/signed_by",
    "/payment/card/number",
    "/payment/card/expiry",
    "/payment/card/holder",
    "/payment/iban",
]

[[blind_index]]
name = "email"
field = "/customer/email"
normalize = "lowercase"
"#;

const DEFAULT_SUBJECT_POINTER: &str = "/customer/id";
const MAX_BLIND_INDEX_NAME_LEN: usize = 64;

/// An RFC 6901 JSON pointer into an event payload, parsed once.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pointer {
    raw: String,
    tokens: Vec<String>,
}

impl Pointer {
    /// Parses `/a/b~1c`. The empty pointer (the whole payload) is refused:
    /// protecting the whole payload would leave nothing to query.
    pub fn parse(raw: &str) -> Result<Self, PolicyError> {
        let bad = |reason: &'static str| PolicyError::Pointer {
            pointer: raw.to_owned(),
            reason,
        };
        let Some(rest) = raw.strip_prefix('/') else {
            return Err(bad("it must start with '/', e.g. \"/customer/email\""));
        };
        let tokens = rest
            .split('/')
            .map(unescape_token)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("'~' must be followed by 0 (for '~') or 1 (for '/')"))?;
        Ok(Self {
            raw: raw.to_owned(),
            tokens,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The unescaped tokens.
    pub(crate) fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// Each token, with the array index it denotes if it is one.
    pub(crate) fn steps(&self) -> impl Iterator<Item = (&str, Option<usize>)> + '_ {
        self.tokens
            .iter()
            .map(|token| (token.as_str(), array_index(token)))
    }

    pub fn get<'v>(&self, root: &'v Value) -> Option<&'v Value> {
        self.tokens
            .iter()
            .try_fold(root, |value, token| match value {
                Value::Object(map) => map.get(token),
                Value::Array(items) => items.get(array_index(token)?),
                _ => None,
            })
    }

    pub fn get_mut<'v>(&self, root: &'v mut Value) -> Option<&'v mut Value> {
        self.tokens
            .iter()
            .try_fold(root, |value, token| match value {
                Value::Object(map) => map.get_mut(token),
                Value::Array(items) => items.get_mut(array_index(token)?),
                _ => None,
            })
    }
}

impl fmt::Display for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl fmt::Debug for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.raw)
    }
}

fn unescape_token(token: &str) -> Option<String> {
    if !token.contains('~') {
        return Some(token.to_owned());
    }
    let mut out = String::with_capacity(token.len());
    let mut chars = token.chars();
    while let Some(c) = chars.next() {
        match c {
            '~' => match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                _ => return None,
            },
            c => out.push(c),
        }
    }
    Some(out)
}

/// Appends `token` to a pointer being built, escaped per RFC 6901.
pub(crate) fn push_token(pointer: &mut String, token: &str) {
    pointer.push('/');
    if !token.contains(['~', '/']) {
        pointer.push_str(token);
        return;
    }
    for c in token.chars() {
        match c {
            '~' => pointer.push_str("~0"),
            '/' => pointer.push_str("~1"),
            c => pointer.push(c),
        }
    }
}

/// RFC 6901 array index: `0` or digits without a leading zero.
fn array_index(token: &str) -> Option<usize> {
    let well_formed = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'));
    if !well_formed {
        return None;
    }
    token.parse().ok()
}

/// How a blind-indexed value is normalised before hashing, so that queries
/// match regardless of how producers spelled the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// Trim surrounding whitespace, then Unicode lowercase (emails).
    Lowercase,
    /// Hash the value exactly as sent.
    None,
}

/// One searchable protected field: `GET /v1/events?{name}=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlindIndexRule {
    pub name: String,
    pub field: Pointer,
    pub normalize: Normalize,
}

/// A compiled field-protection policy.
#[derive(Debug, Clone)]
pub struct Policy {
    subject_pointer: Option<Pointer>,
    /// Every distinct protected pointer, in order of first appearance.
    pointers: Vec<Pointer>,
    /// Exact event type -> every field protected for it (all matching rules).
    exact: HashMap<String, FieldSet>,
    /// `(prefix, fields)`, longest prefix first; the fields of an entry are
    /// those of every rule matching an event type whose longest matching
    /// prefix is this one (matching prefixes of one event type nest).
    prefixes: Vec<(String, FieldSet)>,
    /// Fields of the `*` rules: event types matching nothing more specific.
    any: FieldSet,
    blind_indexes: Vec<BlindIndexRule>,
}

/// The fields of some event types: indexes into `Policy::pointers`, and
/// compiled for the single pass.
#[derive(Debug, Clone)]
struct FieldSet {
    indexes: Vec<usize>,
    plan: FieldPlan,
}

impl FieldSet {
    fn new(
        indexes: Vec<usize>,
        pointers: &[Pointer],
        blind_indexes: &[BlindIndexRule],
        subject_pointer: Option<&Pointer>,
    ) -> Self {
        let plan = FieldPlan::new(
            indexes.iter().map(|&i| &pointers[i]),
            blind_indexes,
            subject_pointer,
        );
        Self { indexes, plan }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: u32,
    subject_pointer: Option<String>,
    #[serde(default)]
    protect: Vec<ProtectRuleFile>,
    #[serde(default)]
    blind_index: Vec<BlindIndexFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProtectRuleFile {
    event_types: Vec<String>,
    fields: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlindIndexFile {
    name: String,
    field: String,
    normalize: Normalize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    /// The prefix including its trailing dot: `order.*` -> `order.`.
    Prefix(String),
    Any,
}

impl Pattern {
    fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw == "*" {
            return Ok(Self::Any);
        }
        if raw.is_empty() || raw.trim() != raw || raw.chars().any(char::is_control) {
            return Err("must be non-empty, without surrounding spaces or control characters");
        }
        const MISPLACED_STAR: &str =
            "'*' is allowed only alone or after a dot at the end, e.g. \"order.*\"";
        let Some(prefix) = raw.strip_suffix('*') else {
            if raw.contains('*') {
                return Err(MISPLACED_STAR);
            }
            return Ok(Self::Exact(raw.to_owned()));
        };
        if prefix.len() < 2 || !prefix.ends_with('.') || prefix.contains('*') {
            return Err(MISPLACED_STAR);
        }
        Ok(Self::Prefix(prefix.to_owned()))
    }
}

struct Rule {
    patterns: Vec<Pattern>,
    fields: Vec<usize>,
}

impl Policy {
    /// The built-in policy (see [`DEFAULT_POLICY_TOML`]).
    pub fn default_policy() -> Self {
        // Invariant: the built-in policy is valid (test `default_policy_is_valid`).
        Self::from_toml_str(DEFAULT_POLICY_TOML).expect("built-in policy is valid")
    }

    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        parse(&text, &path.display().to_string())
    }

    pub fn from_toml_str(text: &str) -> Result<Self, PolicyError> {
        parse(text, "(inline)")
    }

    /// The fields to protect in events of `event_type`: the union of all
    /// matching rules, each once, in order of first appearance in the policy.
    pub fn fields_for(
        &self,
        event_type: &str,
    ) -> impl ExactSizeIterator<Item = &Pointer> + Clone + '_ {
        self.field_set(event_type)
            .indexes
            .iter()
            .map(move |&index| &self.pointers[index])
    }

    /// The fields of `fields_for(event_type)` with the blind indexes and the
    /// subject pointer, compiled for [`crate::protect::PayloadBatch`].
    pub fn plan_for(&self, event_type: &str) -> &FieldPlan {
        &self.field_set(event_type).plan
    }

    fn field_set(&self, event_type: &str) -> &FieldSet {
        if let Some(fields) = self.exact.get(event_type) {
            return fields;
        }
        let longest_prefix = self
            .prefixes
            .iter()
            .find(|(prefix, _)| event_type.starts_with(prefix.as_str()));
        match longest_prefix {
            Some((_, fields)) => fields,
            None => &self.any,
        }
    }

    /// Where to find the subject of an event that has no `subject_id`.
    pub fn subject_pointer(&self) -> Option<&Pointer> {
        self.subject_pointer.as_ref()
    }

    /// The subject id found at the subject pointer: a non-empty string or an
    /// integer. Read it before protecting the payload, in case it is protected.
    pub fn subject_from(&self, payload: &Value) -> Option<String> {
        subject_at(self.subject_pointer.as_ref()?, payload)
    }

    pub fn blind_indexes(&self) -> &[BlindIndexRule] {
        &self.blind_indexes
    }

    /// The blind index an API filter name refers to.
    pub fn blind_index(&self, name: &str) -> Option<&BlindIndexRule> {
        self.blind_indexes.iter().find(|rule| rule.name == name)
    }

    /// Every protected pointer, whatever the event type.
    pub fn all_fields(&self) -> &[Pointer] {
        &self.pointers
    }
}

/// The subject id at `pointer`, as [`Policy::subject_from`] reads it.
pub(crate) fn subject_at(pointer: &Pointer, payload: &Value) -> Option<String> {
    let subject = match pointer.get(payload)? {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        _ => return None,
    };
    is_valid_subject(&subject).then_some(subject)
}

/// A subject id must be non-empty, at most `MAX_IDENTIFIER_LEN` bytes and
/// free of control characters.
pub(crate) fn is_valid_subject(subject: &str) -> bool {
    !subject.trim().is_empty()
        && subject.len() <= MAX_IDENTIFIER_LEN
        && !subject.chars().any(char::is_control)
}

fn parse(text: &str, origin: &str) -> Result<Policy, PolicyError> {
    let file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError::Syntax {
        origin: origin.to_owned(),
        message: e.to_string(),
    })?;
    compile(file).map_err(|message| PolicyError::Invalid {
        origin: origin.to_owned(),
        message,
    })
}

fn compile(file: PolicyFile) -> Result<Policy, String> {
    if file.version != 1 {
        return Err(format!(
            "version {} is not supported; this build reads version = 1",
            file.version
        ));
    }
    if file.protect.is_empty() {
        return Err("no [[protect]] rule; add at least one \
                    (event_types = [\"*\"], fields = [\"/customer/email\"]) \
                    or run without field protection"
            .to_owned());
    }
    let subject_pointer = match file.subject_pointer.as_deref() {
        None => Some(DEFAULT_SUBJECT_POINTER),
        Some("") => None,
        Some(raw) => Some(raw),
    }
    .map(|raw| {
        Pointer::parse(raw).map_err(|e| {
            format!("subject_pointer: {e}; or set subject_pointer = \"\" to disable it")
        })
    })
    .transpose()?;

    let mut pointers: Vec<Pointer> = Vec::new();
    let mut rules = Vec::with_capacity(file.protect.len());
    for (index, rule) in file.protect.iter().enumerate() {
        rules.push(compile_rule(index + 1, rule, &mut pointers)?);
    }
    let blind_indexes = compile_blind_indexes(&file.blind_index, &pointers)?;

    let union = |matches: &dyn Fn(&Pattern) -> bool| -> Vec<usize> {
        let mut selected = vec![false; pointers.len()];
        for rule in rules.iter().filter(|r| r.patterns.iter().any(matches)) {
            for &field in &rule.fields {
                selected[field] = true;
            }
        }
        (0..pointers.len()).filter(|&i| selected[i]).collect()
    };
    let set = |indexes: Vec<usize>| {
        FieldSet::new(indexes, &pointers, &blind_indexes, subject_pointer.as_ref())
    };
    let mut exact = HashMap::new();
    let mut prefixes = Vec::new();
    for pattern in rules.iter().flat_map(|r| &r.patterns) {
        match pattern {
            Pattern::Exact(event_type) => {
                let fields = union(&|p| match p {
                    Pattern::Exact(other) => other == event_type,
                    Pattern::Prefix(prefix) => event_type.starts_with(prefix.as_str()),
                    Pattern::Any => true,
                });
                exact.insert(event_type.clone(), set(fields));
            }
            Pattern::Prefix(prefix) => {
                let fields = union(&|p| match p {
                    Pattern::Exact(_) => false,
                    Pattern::Prefix(shorter) => prefix.starts_with(shorter.as_str()),
                    Pattern::Any => true,
                });
                prefixes.push((prefix.clone(), fields));
            }
            Pattern::Any => {}
        }
    }
    prefixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
    prefixes.dedup_by(|a, b| a.0 == b.0);
    let prefixes = prefixes
        .into_iter()
        .map(|(prefix, fields)| (prefix, set(fields)))
        .collect();
    let any = set(union(&|p| *p == Pattern::Any));

    Ok(Policy {
        subject_pointer,
        pointers,
        exact,
        prefixes,
        any,
        blind_indexes,
    })
}

fn compile_rule(
    number: usize,
    rule: &ProtectRuleFile,
    pointers: &mut Vec<Pointer>,
) -> Result<Rule, String> {
    let name = format!("[[protect]] rule #{number}");
    if rule.event_types.is_empty() {
        return Err(format!(
            "{name}: event_types is empty; list event types such as \"order.created\", \"order.*\" or \"*\""
        ));
    }
    if rule.fields.is_empty() {
        return Err(format!(
            "{name}: fields is empty; list JSON pointers such as \"/customer/email\" or remove the rule"
        ));
    }
    let mut patterns = Vec::with_capacity(rule.event_types.len());
    for raw in &rule.event_types {
        let pattern = Pattern::parse(raw)
            .map_err(|reason| format!("{name}: event type pattern {raw:?} {reason}"))?;
        patterns.push(pattern);
    }
    let mut fields = Vec::with_capacity(rule.fields.len());
    for raw in &rule.fields {
        let pointer = Pointer::parse(raw).map_err(|e| format!("{name}: field {e}"))?;
        let index = match pointers.iter().position(|p| *p == pointer) {
            Some(index) => index,
            None => {
                pointers.push(pointer);
                pointers.len() - 1
            }
        };
        if !fields.contains(&index) {
            fields.push(index);
        }
    }
    Ok(Rule { patterns, fields })
}

fn compile_blind_indexes(
    entries: &[BlindIndexFile],
    protected: &[Pointer],
) -> Result<Vec<BlindIndexRule>, String> {
    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(entries.len());
    for (number, entry) in entries.iter().enumerate().map(|(i, e)| (i + 1, e)) {
        let name = &entry.name;
        let label = format!("[[blind_index]] #{number} ({name:?})");
        let valid_name = name.len() <= MAX_BLIND_INDEX_NAME_LEN
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid_name {
            return Err(format!(
                "{label}: name must be a lowercase letter followed by lowercase letters, \
                 digits or '_' (at most {MAX_BLIND_INDEX_NAME_LEN}); it is an API query parameter"
            ));
        }
        if !names.insert(name.as_str()) {
            return Err(format!(
                "{label}: name is used by an earlier [[blind_index]]; give each index its own name"
            ));
        }
        let field = Pointer::parse(&entry.field).map_err(|e| format!("{label}: field {e}"))?;
        if !protected.contains(&field) {
            return Err(format!(
                "{label}: field {field} is not protected by any [[protect]] rule; \
                 add it to one (a blind index of a plaintext field protects nothing)"
            ));
        }
        rules.push(BlindIndexRule {
            name: name.clone(),
            field,
            normalize: entry.normalize,
        });
    }
    Ok(rules)
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
