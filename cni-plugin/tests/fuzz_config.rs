//! Property-based fuzzing of what the runtime hands the plugin (issue #19
//! "Fuzzing"): the network configuration on stdin and the CNI_* variables.
//!
//! Whatever arrives, the plugin answers with a configuration or a CNI error
//! whose code is one the spec (or riptide's documented >= 100 range) defines
//! for that stage — never a panic. No command here touches the kernel:
//! only parsing runs. `cargo xtask fuzz` (or `PROPTEST_CASES`) runs longer.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use proptest::prelude::*;
use riptide_cni::{
    config,
    env::{CniEnv, Command},
    types::{CniError, code},
};
use serde_json::{Value, json};

fn config_cases() -> ProptestConfig {
    ProptestConfig { failure_persistence: None, ..ProptestConfig::default() }
}

/// Parsing may only fail with the codes of the decode/validate stages.
fn parse_error(e: &CniError) -> Result<(), TestCaseError> {
    let allowed = [code::INCOMPATIBLE_VERSION, code::UNSUPPORTED_FIELD, code::DECODE_FAILURE, code::INVALID_CONFIG];
    prop_assert!(allowed.contains(&e.code), "code {} for {:?}", e.code, e.msg);
    prop_assert!(!e.msg.is_empty());
    // The error is printed as JSON on stdout: it must serialise.
    prop_assert!(serde_json::to_string(e).is_ok());
    Ok(())
}

fn valid_config() -> Value {
    json!({
        "cniVersion": "1.1.0", "name": "riptide", "type": "riptide",
        "nodeName": "node-1", "podCIDR": "10.42.1.0/24", "clusterCIDR": "10.42.0.0/16",
        "stateDir": "/var/lib/cni/riptide/node-1", "mtu": 1500,
        "dns": {"nameservers": ["10.43.0.10"], "search": ["default.svc.cluster.local"]},
        "runtimeConfig": {}
    })
}

/// Values the fields meet in practice, plus the edges of each type.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!("")),
        Just(json!("1.1.0")),
        Just(json!("0.4.0")),
        Just(json!("99.0.0")),
        Just(json!("10.42.1.0/24")),
        Just(json!("10.42.1.7/24")),
        Just(json!("0.0.0.0/0")),
        Just(json!("10.42.0.0/33")),
        Just(json!("fd00::/64")),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(68)),
        Just(json!(65536)),
        Just(json!(u64::MAX)),
        Just(json!(1e300)),
        Just(json!([])),
        Just(json!({})),
        Just(json!({"ips": [{"address": "10.42.1.9/24"}], "interfaces": [{"name": "eth0"}]})),
        Just(json!([{"containerID": "c1", "ifname": "eth0"}])),
        "[ -~]{0,24}".prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
    ]
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("cniVersion"),
        Just("name"),
        Just("type"),
        Just("nodeName"),
        Just("podCIDR"),
        Just("podCIDRFile"),
        Just("clusterCIDR"),
        Just("stateDir"),
        Just("mtu"),
        Just("dns"),
        Just("prevResult"),
        Just("ipam"),
        Just("cni.dev/valid-attachments"),
        Just("runtimeConfig"),
    ]
    .prop_map(str::to_owned)
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        Just(Command::Add),
        Just(Command::Del),
        Just(Command::Check),
        Just(Command::Status),
        Just(Command::Gc),
    ]
}

#[test]
fn the_documented_config_parses_for_every_command() {
    let stdin = serde_json::to_vec(&valid_config()).unwrap();
    for cmd in [Command::Add, Command::Del, Command::Status, Command::Gc] {
        let parsed = config::parse(&stdin, cmd);
        assert!(parsed.is_ok(), "{cmd:?}: {:?}", parsed.err());
    }
}

proptest! {
    #![proptest_config(config_cases())]

    #[test]
    fn random_bytes_are_a_decode_failure(bytes in proptest::collection::vec(any::<u8>(), 0..200), cmd in command()) {
        if let Err(e) = config::parse(&bytes, cmd) {
            parse_error(&e)?;
        }
    }

    #[test]
    fn mutated_configs_parse_or_fail_with_a_spec_code(
        edits in proptest::collection::vec((field_name(), proptest::option::of(field_value())), 1..6),
        cmd in command(),
    ) {
        let mut conf = valid_config();
        let map = conf.as_object_mut().unwrap();
        for (k, v) in edits {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        let stdin = serde_json::to_vec(&conf).unwrap();
        match config::parse(&stdin, cmd) {
            Ok(_) => {}
            Err(e) => parse_error(&e)?,
        }
    }

    #[test]
    fn truncated_configs_never_panic(cut in 0usize..400, cmd in command()) {
        let stdin = serde_json::to_vec(&valid_config()).unwrap();
        let cut = cut.min(stdin.len());
        if let Err(e) = config::parse(&stdin[..cut], cmd) {
            parse_error(&e)?;
        }
    }

    #[test]
    fn the_environment_parses_or_is_invalid_env(
        vars in proptest::collection::vec((
            prop_oneof![Just("CNI_COMMAND"), Just("CNI_CONTAINERID"), Just("CNI_NETNS"), Just("CNI_IFNAME"), Just("CNI_ARGS"), Just("CNI_PATH")],
            prop_oneof![Just("ADD".to_string()), Just("DEL".to_string()), Just("eth0".to_string()), Just("/var/run/netns/x".to_string()),
                Just("K8S_POD_NAME=a;K8S_POD_NAMESPACE=b".to_string()), Just(";;=".to_string()), "[ -~]{0,40}"],
        ), 0..8),
    ) {
        let env: HashMap<&str, String> = vars.into_iter().collect();
        if let Err(e) = CniEnv::from_getter(|k| env.get(k).cloned()) {
            prop_assert!(
                [code::INVALID_ENV, code::INCOMPATIBLE_VERSION, code::DECODE_FAILURE].contains(&e.code),
                "code {} for {:?}", e.code, e.msg
            );
        }
    }
}
