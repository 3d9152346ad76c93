use serde_json::json;

use super::*;

fn fields(policy: &Policy, event_type: &str) -> Vec<String> {
    policy
        .fields_for(event_type)
        .map(|p| p.to_string())
        .collect()
}

fn invalid(toml: &str) -> String {
    match Policy::from_toml_str(toml) {
        Ok(_) => panic!("policy should be refused:\n{toml}"),
        Err(e) => e.to_string(),
    }
}

const LAYERED: &str = r#"
version = 1
subject_pointer = "/buyer/id"

[[protect]]
event_types = ["*"]
fields = ["/customer/email"]

[[protect]]
event_types = ["order.*", "payment.*"]
fields = ["/payment/card/number", "/customer/email"]

[[protect]]
event_types = ["order.eu.*"]
fields = ["/vat_id"]

[[protect]]
event_types = ["order.created"]
fields = ["/shipping_address", "/payment/card/number"]

[[blind_index]]
name = "email"
field = "/customer/email"
normalize = "lowercase"
"#;

#[test]
fn default_policy_is_valid() {
    let policy = Policy::default_policy();
    let expected = [
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
    ];
    assert_eq!(fields(&policy, "order.created"), expected);
    assert_eq!(fields(&policy, "anything.else"), expected);
    assert_eq!(
        policy.subject_pointer().map(Pointer::as_str),
        Some("/customer/id")
    );
    let email = policy.blind_index("email").expect("email index");
    assert_eq!(email.field.as_str(), "/customer/email");
    assert_eq!(email.normalize, Normalize::Lowercase);
    assert_eq!(policy.blind_indexes().len(), 1);
}

#[test]
fn wildcards_union_matching_rules_in_policy_order() {
    let policy = Policy::from_toml_str(LAYERED).expect("valid policy");
    assert_eq!(
        fields(&policy, "order.created"),
        [
            "/customer/email",
            "/payment/card/number",
            "/shipping_address"
        ]
    );
    assert_eq!(
        fields(&policy, "order.shipped"),
        ["/customer/email", "/payment/card/number"]
    );
    assert_eq!(
        fields(&policy, "order.eu.created"),
        ["/customer/email", "/payment/card/number", "/vat_id"]
    );
    assert_eq!(
        fields(&policy, "payment.captured"),
        ["/customer/email", "/payment/card/number"]
    );
    // Prefixes match at a dot boundary only, and only below it.
    assert_eq!(fields(&policy, "orders.created"), ["/customer/email"]);
    assert_eq!(fields(&policy, "order"), ["/customer/email"]);
    assert_eq!(fields(&policy, "refund.issued"), ["/customer/email"]);
}

#[test]
fn without_a_star_rule_unmatched_types_have_no_fields() {
    let policy = Policy::from_toml_str(
        r#"
version = 1
[[protect]]
event_types = ["order.*"]
fields = ["/customer/email", "/customer/email"]
"#,
    )
    .expect("valid policy");
    assert_eq!(fields(&policy, "order.created"), ["/customer/email"]);
    assert_eq!(policy.fields_for("user.created").len(), 0);
}

#[test]
fn fields_for_is_deterministic() {
    let first = Policy::from_toml_str(LAYERED).expect("valid policy");
    let second = Policy::from_toml_str(LAYERED).expect("valid policy");
    for event_type in ["order.created", "order.eu.x", "payment.x", "other"] {
        assert_eq!(fields(&first, event_type), fields(&second, event_type));
    }
}

#[test]
fn subject_pointer_default_custom_and_disabled() {
    let custom = Policy::from_toml_str(LAYERED).expect("valid policy");
    assert_eq!(
        custom.subject_from(&json!({"buyer": {"id": "c-1"}})),
        Some("c-1".into())
    );
    assert_eq!(
        custom.subject_from(&json!({"buyer": {"id": 42}})),
        Some("42".into())
    );
    assert_eq!(custom.subject_from(&json!({"buyer": {"id": ""}})), None);
    assert_eq!(custom.subject_from(&json!({"buyer": {"id": 1.5}})), None);
    assert_eq!(custom.subject_from(&json!({"buyer": {}})), None);

    let base = "version = 1\n[[protect]]\nevent_types = [\"*\"]\nfields = [\"/a\"]\n";
    let default = Policy::from_toml_str(base).expect("valid policy");
    assert_eq!(
        default.subject_pointer().map(Pointer::as_str),
        Some("/customer/id")
    );
    let disabled =
        Policy::from_toml_str(&format!("subject_pointer = \"\"\n{base}")).expect("valid policy");
    assert!(disabled.subject_pointer().is_none());
    assert_eq!(
        disabled.subject_from(&json!({"customer": {"id": "c"}})),
        None
    );
}

#[test]
fn pointers_follow_rfc_6901() {
    let doc = json!({"a/b": {"m~n": [10, {"x": true}]}, "": 1});
    let get = |raw: &str| {
        Pointer::parse(raw)
            .expect("valid pointer")
            .get(&doc)
            .cloned()
    };
    assert_eq!(get("/a~1b/m~0n/0"), Some(json!(10)));
    assert_eq!(get("/a~1b/m~0n/1/x"), Some(json!(true)));
    assert_eq!(get("/"), Some(json!(1)));
    assert_eq!(get("/a~1b/m~0n/01"), None, "leading zero is not an index");
    assert_eq!(get("/a~1b/m~0n/-"), None);
    assert_eq!(get("/a~1b/m~0n/5"), None);
    assert_eq!(get("/missing/deeper"), None);

    let mut built = String::new();
    push_token(&mut built, "a/b");
    push_token(&mut built, "m~n");
    assert_eq!(built, "/a~1b/m~0n");

    for bad in ["", "customer/email", "/a~2", "/a~"] {
        assert!(Pointer::parse(bad).is_err(), "{bad:?} should be refused");
    }
}

#[test]
fn bad_policies_are_refused_with_the_rule_and_the_fix() {
    let rule = |event_types: &str, fields: &str| {
        format!("version = 1\n[[protect]]\nevent_types = {event_types}\nfields = {fields}\n")
    };
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{}surprise = 1\n", rule("[\"*\"]", "[\"/a\"]")),
            "unknown field `surprise`",
        ),
        ("version = 1\n".to_owned(), "no [[protect]] rule"),
        (
            "version = 2\n[[protect]]\nevent_types = [\"*\"]\nfields = [\"/a\"]\n".to_owned(),
            "version 2 is not supported",
        ),
        (rule("[]", "[\"/a\"]"), "rule #1: event_types is empty"),
        (rule("[\"*\"]", "[]"), "rule #1: fields is empty"),
        (
            rule("[\"order*\"]", "[\"/a\"]"),
            "\"order*\" '*' is allowed only",
        ),
        (rule("[\"*.created\"]", "[\"/a\"]"), "'*' is allowed only"),
        (
            rule("[\"or*er.created\"]", "[\"/a\"]"),
            "'*' is allowed only",
        ),
        (rule("[\".*\"]", "[\"/a\"]"), "'*' is allowed only"),
        (
            rule("[\" order.x\"]", "[\"/a\"]"),
            "without surrounding spaces",
        ),
        (rule("[\"\"]", "[\"/a\"]"), "must be non-empty"),
        (
            rule("[\"*\"]", "[\"customer/email\"]"),
            "rule #1: field \"customer/email\" is not a JSON pointer: it must start with '/'",
        ),
        (rule("[\"*\"]", "[\"/a~2b\"]"), "'~' must be followed by 0"),
        (
            format!(
                "subject_pointer = \"customer/id\"\n{}",
                rule("[\"*\"]", "[\"/a\"]")
            ),
            "subject_pointer: \"customer/id\" is not a JSON pointer",
        ),
        (
            format!(
                "{}[[blind_index]]\nname = \"email\"\nfield = \"/b\"\nnormalize = \"none\"\n",
                rule("[\"*\"]", "[\"/a\"]")
            ),
            "field /b is not protected by any [[protect]] rule",
        ),
        (
            format!(
                "{}[[blind_index]]\nname = \"e\"\nfield = \"/a\"\nnormalize = \"none\"\n\
                 [[blind_index]]\nname = \"e\"\nfield = \"/a\"\nnormalize = \"lowercase\"\n",
                rule("[\"*\"]", "[\"/a\"]")
            ),
            "[[blind_index]] #2 (\"e\"): name is used by an earlier",
        ),
        (
            format!(
                "{}[[blind_index]]\nname = \"E-mail\"\nfield = \"/a\"\nnormalize = \"none\"\n",
                rule("[\"*\"]", "[\"/a\"]")
            ),
            "name must be a lowercase letter",
        ),
        (
            format!(
                "{}[[blind_index]]\nname = \"e\"\nfield = \"/a\"\nnormalize = \"upper\"\n",
                rule("[\"*\"]", "[\"/a\"]")
            ),
            "unknown variant `upper`",
        ),
        (
            format!(
                "{}[[blind_index]]\nname = \"e\"\nfield = \"/a\"\n",
                rule("[\"*\"]", "[\"/a\"]")
            ),
            "missing field `normalize`",
        ),
    ];
    for (toml, expected) in cases {
        let message = invalid(&toml);
        assert!(
            message.contains(expected),
            "for policy\n{toml}\nexpected {expected:?} in: {message}"
        );
        assert!(
            message.starts_with("field-protection policy (inline) is not valid"),
            "{message}"
        );
    }
}

#[test]
fn load_names_the_path() {
    let dir = std::env::temp_dir().join(format!("protect-policy-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let good = dir.join("policy.toml");
    std::fs::write(&good, LAYERED).expect("write policy");
    let policy = Policy::load(&good).expect("valid policy file");
    assert_eq!(policy.fields_for("order.created").len(), 3);

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "version = 1\n").expect("write policy");
    let message = Policy::load(&bad).expect_err("invalid").to_string();
    assert!(message.contains(&bad.display().to_string()), "{message}");

    let missing = dir.join("missing.toml");
    let message = Policy::load(&missing).expect_err("missing").to_string();
    assert!(
        message.contains("cannot read field-protection policy"),
        "{message}"
    );
    assert!(message.contains("missing.toml"), "{message}");
    std::fs::remove_dir_all(&dir).expect("clean up");
}
