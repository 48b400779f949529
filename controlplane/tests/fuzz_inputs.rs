//! Property-based fuzzing of the apiserver's input parsers (issue #19
//! "Fuzzing"): the protobuf decoder, label and field selectors, the three
//! patch kinds, defaulting and validation of every served kind.
//!
//! Each property feeds random and mutated inputs and asserts that the code
//! answers with a value or an `ApiError` — never a panic — plus the
//! invariants a caller relies on (a decoded body is an object, a parsed
//! selector survives a print/parse round trip, an error is a 4xx).
//!
//! The case count is short in `cargo xtask test`; `cargo xtask fuzz` (or
//! `PROPTEST_CASES=100000`) runs the same properties longer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use riptide_controlplane::apiserver::{defaults, patch, protobuf, selectors, status::ApiError, validation};
use riptide_controlplane::registry::RESOURCES;
use serde_json::{Value, json};

fn config() -> ProptestConfig {
    // The default of 256 cases keeps the default test run short; the
    // variable lets `cargo xtask fuzz` ask for more.
    ProptestConfig { failure_persistence: None, ..ProptestConfig::default() }
}

/// A rejected input is the client's fault, never a server error.
fn client_error(e: &ApiError) -> Result<(), TestCaseError> {
    prop_assert!((400..500).contains(&e.code), "{} {}: {}", e.code, e.reason, e.message);
    Ok(())
}

// ---------------------------------------------------------------- protobuf

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn field_bytes(num: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(num << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn field_int(num: u64, v: u64, out: &mut Vec<u8>) {
    varint(num << 3, out);
    varint(v, out);
}

/// A valid `k8s\0` envelope around `raw` for `apiVersion`/`kind`.
fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
    let mut type_meta = Vec::new();
    field_bytes(1, api_version.as_bytes(), &mut type_meta);
    field_bytes(2, kind.as_bytes(), &mut type_meta);
    let mut body = b"k8s\0".to_vec();
    field_bytes(1, &type_meta, &mut body);
    field_bytes(2, raw, &mut body);
    body
}

/// A small but complete Pod in the wire format kubectl sends.
fn pod_message(name: &str, image: &str, port: u64) -> Vec<u8> {
    let mut meta = Vec::new();
    field_bytes(1, name.as_bytes(), &mut meta);
    field_bytes(3, b"default", &mut meta);
    let mut label = Vec::new();
    field_bytes(1, b"app", &mut label);
    field_bytes(2, b"web", &mut label);
    field_bytes(11, &label, &mut meta);
    let mut cport = Vec::new();
    field_int(3, port, &mut cport);
    field_bytes(4, b"TCP", &mut cport);
    let mut container = Vec::new();
    field_bytes(1, b"c", &mut container);
    field_bytes(2, image.as_bytes(), &mut container);
    field_bytes(3, b"/bin/true", &mut container);
    field_bytes(6, &cport, &mut container);
    let mut spec = Vec::new();
    field_bytes(2, &container, &mut spec);
    field_bytes(3, b"Always", &mut spec);
    let mut pod = Vec::new();
    field_bytes(1, &meta, &mut pod);
    field_bytes(2, &spec, &mut pod);
    envelope("v1", "Pod", &pod)
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..12)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1usize..8).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

fn mutate(mut buf: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        if buf.is_empty() {
            break;
        }
        let len = buf.len();
        match m {
            Mutation::Flip(i, b) => buf[i % len] ^= b | 1,
            Mutation::Truncate(i) => buf.truncate(i % len),
            Mutation::Insert(i, bytes) => {
                let at = i % (len + 1);
                buf.splice(at..at, bytes.iter().copied());
            }
            Mutation::Remove(i, n) => {
                let at = i % len;
                buf.drain(at..(at + n).min(len));
            }
        }
    }
    buf
}

#[test]
fn protobuf_decodes_the_valid_pod() {
    let v = protobuf::decode(&pod_message("web-1", "localhost/app:1", 8080)).unwrap();
    assert_eq!(v.pointer("/metadata/name"), Some(&json!("web-1")));
    assert_eq!(v.pointer("/spec/containers/0/ports/0/containerPort"), Some(&json!(8080)));
    assert_eq!(v.pointer("/metadata/labels/app"), Some(&json!("web")));
}

#[test]
fn protobuf_rejects_a_length_past_the_end_and_a_huge_varint() {
    let mut body = b"k8s\0".to_vec();
    // Field 2 claims u64::MAX bytes: an overflow-checked length, not a panic.
    varint(2 << 3 | 2, &mut body);
    varint(u64::MAX, &mut body);
    client_error(&protobuf::decode(&body).unwrap_err()).unwrap();
    // An 11-byte varint (more than 64 bits).
    let mut body = b"k8s\0".to_vec();
    body.extend_from_slice(&[0x0a]);
    body.extend_from_slice(&[0xff; 11]);
    client_error(&protobuf::decode(&body).unwrap_err()).unwrap();
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn protobuf_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut body = b"k8s\0".to_vec();
        body.extend_from_slice(&bytes);
        match protobuf::decode(&body) {
            Ok(v) => prop_assert!(v.is_object()),
            Err(e) => client_error(&e)?,
        }
        if let Err(e) = protobuf::decode(&bytes) {
            client_error(&e)?;
        }
    }

    #[test]
    fn protobuf_never_panics_on_mutated_pods(
        name in "[a-z0-9-]{0,20}",
        image in "[ -~]{0,30}",
        port in any::<u64>(),
        muts in proptest::collection::vec(mutation(), 1..6),
    ) {
        let body = mutate(pod_message(&name, &image, port), &muts);
        match protobuf::decode(&body) {
            Ok(v) => prop_assert!(v.is_object()),
            Err(e) => client_error(&e)?,
        }
    }
}

// ---------------------------------------------------------------- selectors

/// Strings built from the selector grammar's own tokens, so the parser's
/// deeper branches are reached far more often than with random text.
fn selector_text() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("app".to_string()),
        Just("tier".to_string()),
        Just("example.com/role".to_string()),
        Just("web".to_string()),
        Just("=".to_string()),
        Just("==".to_string()),
        Just("!=".to_string()),
        Just("!".to_string()),
        Just(",".to_string()),
        Just(" in ".to_string()),
        Just(" notin ".to_string()),
        Just("(".to_string()),
        Just(")".to_string()),
        Just(">".to_string()),
        Just("<".to_string()),
        Just("9223372036854775808".to_string()),
        Just("-1".to_string()),
        Just("metadata.name".to_string()),
        Just("spec.nodeName".to_string()),
        "[ -~]{0,4}",
    ];
    proptest::collection::vec(token, 0..12).prop_map(|t| t.concat())
}

fn labelled(labels: &[(String, String)]) -> Value {
    let map: serde_json::Map<String, Value> = labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    json!({"metadata": {"name": "x", "namespace": "default", "labels": map}, "spec": {"nodeName": "n1"}})
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn label_selectors_parse_or_fail_cleanly_and_round_trip(
        s in selector_text(),
        labels in proptest::collection::vec(("(app|tier|example.com/role)", "(web|db|1|10)"), 0..4),
    ) {
        match selectors::LabelSelector::parse(&s) {
            Ok(sel) => {
                let obj = labelled(&labels);
                let printed = sel.to_string_form();
                let again = selectors::LabelSelector::parse(&printed);
                prop_assert!(again.is_ok(), "{s:?} printed as {printed:?} does not parse");
                let again = again.unwrap();
                prop_assert_eq!(sel.matches(&obj), again.matches(&obj), "{:?} vs {:?}", s, printed);
            }
            Err(e) => client_error(&e)?,
        }
    }

    #[test]
    fn field_selectors_parse_or_fail_cleanly(s in selector_text()) {
        match selectors::FieldSelector::parse(&s) {
            Ok(sel) => {
                let _ = sel.matches(&labelled(&[]));
            }
            Err(e) => client_error(&e)?,
        }
    }

    #[test]
    fn selector_objects_never_panic(v in json_value()) {
        let sel = selectors::LabelSelector::from_object(&v);
        let _ = sel.matches(&v);
        let _ = sel.to_string_form();
    }
}

#[test]
fn unknown_selector_operators_are_errors() {
    for s in ["app~web", "app in web", "app notin (", "app)(", "app in (a,b", "app=(x)"] {
        let e = selectors::LabelSelector::parse(s).expect_err(s);
        assert_eq!(e.code, 400, "{s}: {}", e.message);
    }
}

// ---------------------------------------------------------------- JSON values

/// Arbitrary JSON, biased towards Kubernetes-shaped keys so that patches and
/// validation meet the fields they look at.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("metadata".to_string()),
        Just("name".to_string()),
        Just("namespace".to_string()),
        Just("labels".to_string()),
        Just("spec".to_string()),
        Just("containers".to_string()),
        Just("ports".to_string()),
        Just("port".to_string()),
        Just("selector".to_string()),
        Just("matchLabels".to_string()),
        Just("matchExpressions".to_string()),
        Just("operator".to_string()),
        Just("values".to_string()),
        Just("key".to_string()),
        Just("$patch".to_string()),
        Just("$retainKeys".to_string()),
        Just("$deleteFromPrimitiveList/finalizers".to_string()),
        Just("$setElementOrder/containers".to_string()),
        Just("clusterIP".to_string()),
        Just("externalIPs".to_string()),
        // Service status validation (LoadBalancer ingress).
        Just("status".to_string()),
        Just("loadBalancer".to_string()),
        Just("ingress".to_string()),
        Just("ip".to_string()),
        Just("ipMode".to_string()),
        Just("hostname".to_string()),
        Just("resourceVersion".to_string()),
        "[a-zA-Z$/]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![Just("replace".to_string()), Just("delete".to_string()), Just("merge".to_string()), Just("192.0.2.1".to_string()), Just("VIP".to_string()), "[ -~]{0,12}"]
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Addresses, near-addresses and names.
fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| std::net::Ipv4Addr::from(o).to_string()),
        any::<[u16; 8]>().prop_map(|o| std::net::Ipv6Addr::from(o).to_string()),
        "[0-9]{1,4}\\.[0-9]{1,4}\\.[0-9]{1,4}\\.[0-9]{1,4}",
        "[0-9a-f:.]{0,20}",
        "[a-z0-9.-]{0,20}",
    ]
}

fn json_patch_ops() -> impl Strategy<Value = Value> {
    let op = prop_oneof![
        Just("add"),
        Just("remove"),
        Just("replace"),
        Just("move"),
        Just("copy"),
        Just("test"),
        Just("bogus")
    ];
    let path = prop_oneof![
        Just("".to_string()),
        Just("/".to_string()),
        Just("/metadata/labels/app".to_string()),
        Just("/spec/containers/0".to_string()),
        Just("/spec/containers/-".to_string()),
        Just("/spec/containers/18446744073709551616".to_string()),
        Just("/a~1b/~0c".to_string()),
        "(/[a-z0-9~-]{0,6}){0,4}",
    ];
    proptest::collection::vec((op, path.clone(), path, json_value()), 0..5).prop_map(|ops| {
        Value::Array(
            ops.into_iter()
                .map(|(op, path, from, value)| json!({"op": op, "path": path, "from": from, "value": value}))
                .collect(),
        )
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn patches_never_panic(original in json_value(), p in json_value(), ops in json_patch_ops()) {
        let kinds = ["Pod", "Service", "Deployment", "ConfigMap", "Node", "Unknown"];
        for kind in kinds {
            if let Err(e) = patch::strategic_merge(kind, &original, &p) {
                client_error(&e)?;
            }
        }
        let merged = patch::merge_patch(&original, &p);
        // RFC 7386: a patch that is not an object replaces the target.
        if !p.is_object() {
            prop_assert_eq!(&merged, &p);
        }
        if let Err(e) = patch::json_patch(&original, &ops) {
            client_error(&e)?;
        }
        if let Err(e) = patch::json_patch(&original, &p) {
            client_error(&e)?;
        }
    }

    #[test]
    fn empty_patches_keep_the_object(original in json_value()) {
        prop_assert_eq!(patch::json_patch(&original, &json!([])).ok(), Some(original.clone()));
        if original.is_object() {
            prop_assert_eq!(patch::merge_patch(&original, &json!({})), original.clone());
        }
    }

    #[test]
    fn service_addresses_validate_only_ips(
        external in proptest::collection::vec(address(), 0..4),
        ingress in proptest::collection::vec((proptest::option::of(address()), proptest::option::of(address()), proptest::option::of("VIP|Proxy|[A-Za-z]{0,6}")), 0..4),
    ) {
        let ingress: Vec<Value> = ingress
            .iter()
            .map(|(ip, host, mode)| json!({"ip": ip, "hostname": host, "ipMode": mode}))
            .map(|mut e| {
                if let Value::Object(m) = &mut e {
                    m.retain(|_, v| !v.is_null());
                }
                e
            })
            .collect();
        let svc = json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "default"},
            "spec": {"ports": [{"port": 80}], "externalIPs": external},
            "status": {"loadBalancer": {"ingress": ingress}},
        });
        let res = RESOURCES.iter().find(|r| r.kind == "Service").unwrap();
        match validation::validate(res, &svc) {
            Err(e) => client_error(&e)?,
            Ok(()) => {
                // Admitted: every address parses, as the agent will read it.
                // An empty ingress `ip` is an absent one, as upstream's
                // `len(ingress.IP) > 0` and Go's omitempty treat it.
                let ingress_ips = ingress.iter().filter_map(|e| e["ip"].as_str()).filter(|ip| !ip.is_empty());
                for ip in external.iter().map(String::as_str).chain(ingress_ips) {
                    prop_assert!(ip.parse::<std::net::IpAddr>().is_ok(), "validation passed {ip:?}");
                }
            }
        }
    }

    #[test]
    fn defaulting_and_validation_never_panic(body in json_value(), name in "[a-z0-9.-]{0,70}") {
        for res in RESOURCES {
            let mut obj = body.clone();
            if let Value::Object(m) = &mut obj {
                m.insert("apiVersion".into(), json!(res.api_version()));
                m.insert("kind".into(), json!(res.kind));
                let meta = m.entry("metadata").or_insert_with(|| json!({}));
                if let Value::Object(meta) = meta {
                    meta.insert("name".into(), json!(name));
                    if res.namespaced {
                        meta.insert("namespace".into(), json!("default"));
                    }
                }
            }
            if let Err(e) = validation::typed_check(res, &obj) {
                client_error(&e)?;
                continue;
            }
            defaults::apply(res, &mut obj);
            if let Err(e) = validation::validate(res, &obj) {
                client_error(&e)?;
            }
        }
    }
}
