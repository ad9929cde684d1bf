use super::*;

fn limits() -> Limits {
    Limits {
        default_key_size: 256,
        min_key_size: 64,
        max_key_size: 1024,
        max_key_per_request: 100,
        max_sae_id_count: 2,
    }
}

fn body(text: &str) -> Result<KeyRequest, ValidationError> {
    parse_key_request(text.as_bytes(), &limits())
}

#[test]
fn empty_body_and_empty_object_mean_defaults() {
    let expected = KeyRequest {
        number: 1,
        size_bits: 256,
        additional_slaves: vec![],
        unknown_fields: vec![],
    };
    assert_eq!(body(""), Ok(expected.clone()));
    assert_eq!(body("  \n"), Ok(expected.clone()));
    assert_eq!(body("{}"), Ok(expected.clone()));
    assert_eq!(parse_enc_query(None, &limits()), Ok(expected.clone()));
    assert_eq!(parse_enc_query(Some(""), &limits()), Ok(expected));
}

#[test]
fn full_request_is_accepted() {
    let req = body(
        r#"{"number":3,"size":512,"additional_slave_SAE_IDs":["carol"],
            "extension_mandatory":[],"extension_optional":[{"x":1}]}"#,
    )
    .expect("valid");
    assert_eq!(req.number, 3);
    assert_eq!(req.size_bits, 512);
    assert_eq!(req.additional_slaves, vec!["carol".to_owned()]);
}

#[test]
fn number_validation() {
    for bad in [
        "0",
        "101",
        "-1",
        "1.5",
        "\"2\"",
        "true",
        "99999999999999999999",
    ] {
        let err = body(&format!(r#"{{"number":{bad}}}"#)).expect_err(bad);
        assert!(
            matches!(
                err,
                ValidationError::NumberOutOfRange { .. } | ValidationError::WrongType { .. }
            ),
            "{bad}: {err:?}"
        );
    }
    assert_eq!(body(r#"{"number":100}"#).map(|r| r.number), Ok(100));
}

#[test]
fn size_validation_uses_the_standard_message() {
    let err = body(r#"{"size":257}"#).expect_err("not multiple of 8");
    assert_eq!(err.to_string(), "size shall be a multiple of 8");
    for bad in ["0", "56", "1032"] {
        assert_eq!(
            body(&format!(r#"{{"size":{bad}}}"#)),
            Err(ValidationError::SizeOutOfRange { min: 64, max: 1024 }),
            "{bad}"
        );
    }
    assert!(matches!(
        body(r#"{"size":-8}"#),
        Err(ValidationError::WrongType { field: "size", .. })
    ));
    assert_eq!(body(r#"{"size":64}"#).map(|r| r.size_bits), Ok(64));
}

#[test]
fn additional_slaves_validation() {
    assert_eq!(
        body(r#"{"additional_slave_SAE_IDs":[]}"#),
        Err(ValidationError::EmptyAdditionalSlaves)
    );
    assert_eq!(
        body(r#"{"additional_slave_SAE_IDs":[" "]}"#),
        Err(ValidationError::BlankSaeId)
    );
    assert_eq!(
        body(r#"{"additional_slave_SAE_IDs":["a","a"]}"#),
        Err(ValidationError::DuplicateSaeId("a".into()))
    );
    assert!(matches!(
        body(r#"{"additional_slave_SAE_IDs":["a","b","c"]}"#),
        Err(ValidationError::TooManySaeIds { count: 3, max: 2 })
    ));
    assert!(matches!(
        body(r#"{"additional_slave_SAE_IDs":"a"}"#),
        Err(ValidationError::WrongType { .. })
    ));
    assert!(matches!(
        body(r#"{"additional_slave_SAE_IDs":[1]}"#),
        Err(ValidationError::WrongType { .. })
    ));
}

#[test]
fn mandatory_extensions_are_refused_with_the_standard_message() {
    let err = body(r#"{"extension_mandatory":[{"abc_route_type":"direct"}]}"#).expect_err("ext");
    assert_eq!(
        err.to_string(),
        "not all extension_mandatory parameters are supported"
    );
    assert!(matches!(
        body(r#"{"extension_mandatory":{"a":1}}"#),
        Err(ValidationError::WrongType { .. })
    ));
    assert!(matches!(
        body(r#"{"extension_optional":[1]}"#),
        Err(ValidationError::WrongType { .. })
    ));
}

#[test]
fn bad_json_is_refused() {
    for bad in ["{", "[]", "42", "\"x\"", "{\"number\":1,}", "null"] {
        assert!(
            matches!(body(bad), Err(ValidationError::BadJson(_))),
            "{bad}"
        );
    }
}

#[test]
fn enc_query_validation() {
    let l = limits();
    assert_eq!(
        parse_enc_query(Some("number=2&size=128"), &l).map(|r| (r.number, r.size_bits)),
        Ok((2, 128))
    );
    assert_eq!(
        parse_enc_query(Some("size=12"), &l),
        Err(ValidationError::SizeNotMultipleOf8)
    );
    for bad in ["number=abc", "number=-1", "number=", "size=1e3"] {
        assert!(
            matches!(
                parse_enc_query(Some(bad), &l),
                Err(ValidationError::WrongType { .. })
            ),
            "{bad}"
        );
    }
    assert!(matches!(
        parse_enc_query(Some("number=0"), &l),
        Err(ValidationError::NumberOutOfRange { .. })
    ));
    assert_eq!(
        parse_enc_query(Some("colour=red"), &l),
        Err(ValidationError::UnknownQueryParameter("colour".into()))
    );
    assert_eq!(
        parse_enc_query(Some("number=1&number=2"), &l),
        Err(ValidationError::RepeatedQueryParameter("number".into()))
    );
    assert!(matches!(
        parse_enc_query(Some("number=%zz"), &l),
        Err(ValidationError::BadQuery(_))
    ));
}

/// The fast path of `parse_key_ids` answers every body exactly as the general path does, and
/// takes the bodies it is for.
#[test]
fn key_ids_fast_path_answers_as_the_general_path() {
    let (a, b) = (
        "550e8400-e29b-41d4-a716-446655440000",
        "018f0000-0000-7000-8000-000000000001",
    );
    let plain = [
        format!(r#"{{"key_IDs":[{{"key_ID":"{a}"}},{{"key_ID":"{b}"}}]}}"#),
        format!(r#" {{ "key_IDs" : [ {{ "key_ID" : "{a}" }} ] }} "#),
        format!(r#"{{"key_IDs":[{{"key_ID":"{a}","note":"x"}}],"other":[1,{{"x":null}}]}}"#),
        format!(r#"{{"key_IDs":[{{"key_ID":"{a}"}},{{"key_ID":"{a}"}}]}}"#),
        format!(r#"{{"key_IDs":[{{"key_ID":"nope"}},{{"key_ID":"{a}"}}]}}"#),
        format!(r#"{{"key_IDs":[{{"key_ID":"{a}"}},{{}}]}}"#),
        format!(r#"{{"key_IDs":[{{"key_ID":"x","key_ID":"{a}"}}]}}"#),
        format!(r#"{{"key_IDs":[{{"key_ID":"{a}"}},{{"KEY_ID":"{b}"}}]}}"#),
        r#"{"key_IDs":[]}"#.to_owned(),
    ];
    let general_only = [
        String::new(),
        "   ".to_owned(),
        "not json".to_owned(),
        format!(r#"[{{"key_ID":"{a}"}}]"#),
        format!(r#"[[{{"key_ID":"{a}"}}]]"#),
        format!(r#"{{"key_IDs":[["{a}"]]}}"#),
        format!(r#"{{"key_IDs":["{a}"]}}"#),
        format!(r#"{{"key_IDs":{{"key_ID":"{a}"}}}}"#),
        r#"{"key_IDs":null}"#.to_owned(),
        r#"{"key_IDs":[{"key_ID":7}]}"#.to_owned(),
        format!(r#"{{"key_IDs":[{{"key_ID":"{a}","key_ID_extension":{{"x":1}}}}]}}"#),
        format!(r#"{{"key_IDs":[{{"key_ID":"\u0035{}"}}]}}"#, &a[1..]),
        format!(r#"{{"key_IDs":[{{"key_ID":"{a}"}}],"key_IDs":[{{"key_ID":"{b}"}}]}}"#),
        format!(r#"{{"key_IDs":[{{"key_ID":"{a}"}}],"big":1e400}}"#),
        format!(r#"{{"key_IDs":[{{"key_ID":"{a}"}}]}} trailing"#),
        format!(r#"{{"key_IDs":[{{"key_ID":"{a}"}}]"#),
    ];
    for body in plain.iter().chain(&general_only) {
        for max in [0, 1, 10] {
            assert_eq!(
                parse_key_ids(body.as_bytes(), max),
                parse_key_ids_general(body.as_bytes(), max),
                "{body}, max {max}"
            );
        }
    }
    for body in &plain {
        assert!(plain::key_ids(body.as_bytes()).is_some(), "fast: {body}");
    }
    for body in &general_only {
        assert!(plain::key_ids(body.as_bytes()).is_none(), "general: {body}");
    }
}

#[test]
fn key_ids_validation() {
    let id = "550e8400-e29b-41d4-a716-446655440000";
    let upper = id.to_uppercase();
    let parsed = parse_key_ids(
        format!(r#"{{"key_IDs":[{{"key_ID":"{upper}"}}]}}"#).as_bytes(),
        10,
    )
    .expect("upper case accepted");
    assert_eq!(parsed[0].to_string(), id);
    assert_eq!(
        parse_key_ids(br#"{"key_IDs":[]}"#, 10),
        Err(ValidationError::NoKeyIds)
    );
    assert_eq!(
        parse_key_ids(br#"{}"#, 10),
        Err(ValidationError::Missing("key_IDs"))
    );
    assert!(matches!(
        parse_key_ids(br#"{"key_IDs":[{"key_ID":"nope"}]}"#, 10),
        Err(ValidationError::BadKeyId(_))
    ));
    assert!(matches!(
        parse_key_ids(
            br#"{"key_IDs":[{"key_ID":"{550e8400-e29b-41d4-a716-446655440000}"}]}"#,
            10
        ),
        Err(ValidationError::BadKeyId(_))
    ));
    assert!(matches!(
        parse_key_ids(br#"{"key_IDs":[{"key_ID":7}]}"#, 10),
        Err(ValidationError::WrongType { .. })
    ));
    assert!(matches!(
        parse_key_ids(
            format!(r#"{{"key_IDs":[{{"key_ID":"{id}"}},{{"key_ID":"{upper}"}}]}}"#).as_bytes(),
            10
        ),
        Err(ValidationError::DuplicateKeyId(_))
    ));
    assert!(matches!(
        parse_key_ids(
            format!(r#"{{"key_IDs":[{{"key_ID":"{id}"}}]}}"#).as_bytes(),
            0
        ),
        Err(ValidationError::TooManyKeyIds { .. })
    ));
    assert!(matches!(
        parse_key_ids(b"not json", 10),
        Err(ValidationError::BadJson(_))
    ));
}

#[test]
fn dec_query_validation() {
    let id = "550e8400-e29b-41d4-a716-446655440000";
    assert_eq!(
        parse_dec_query(Some(&format!("key_ID={id}"))).map(|u| u.to_string()),
        Ok(id.to_owned())
    );
    assert_eq!(
        parse_dec_query(None),
        Err(ValidationError::Missing("key_ID"))
    );
    assert!(matches!(
        parse_dec_query(Some("key_ID=xyz")),
        Err(ValidationError::BadKeyId(_))
    ));
    assert!(matches!(
        parse_dec_query(Some(&format!("key_ID={id}&key_ID={id}"))),
        Err(ValidationError::RepeatedQueryParameter(_))
    ));
    assert!(matches!(
        parse_dec_query(Some(&format!("key_ID={id}&number=1"))),
        Err(ValidationError::UnknownQueryParameter(_))
    ));
}

#[test]
fn unknown_fields_are_named_without_their_values() {
    let req = body(
        r#"{"number":2,"additional_slave_SAEs_IDs":["carol"],"sise":"SECRET-VALUE",
            "extension_optional":[]}"#,
    )
    .expect("unknown fields are ignored, not refused");
    assert_eq!(req.number, 2);
    assert!(req.additional_slaves.is_empty());
    assert_eq!(req.unknown_fields, ["additional_slave_SAEs_IDs", "sise"]);
    assert!(!format!("{:?}", req.unknown_fields).contains("SECRET"));

    let known = body(
        r#"{"number":1,"size":256,"additional_slave_SAE_IDs":["carol"],
            "extension_mandatory":[],"extension_optional":[]}"#,
    )
    .expect("valid");
    assert!(
        known.unknown_fields.is_empty(),
        "{:?}",
        known.unknown_fields
    );
}

#[test]
fn unknown_field_names_are_bounded() {
    let long = "x".repeat(500);
    let mut fields: Vec<String> = (0..50).map(|i| format!("\"f{i:02}\":1")).collect();
    fields.push(format!("\"{long}\":1"));
    let req = body(&format!("{{{}}}", fields.join(","))).expect("valid");
    assert_eq!(req.unknown_fields.len(), MAX_UNKNOWN_FIELDS);
    let req = body(&format!("{{\"{long}\":1}}")).expect("valid");
    assert_eq!(req.unknown_fields[0].chars().count(), MAX_FIELD_NAME_CHARS);
}
