//! Decoding of Kubernetes protobuf request bodies for the few kinds
//! kubectl's typed clients send that way (`kubectl create namespace`,
//! `create configmap`, `create secret`, `create deployment`,
//! `create service`, `run`). client-go's typed clientset always sends
//! `application/vnd.kubernetes.protobuf` and does not fall back to JSON on
//! 415, so those commands need this. The envelope is `k8s\0` + a
//! `runtime.Unknown`; the message layouts follow the field numbers of
//! k8s.io/api's generated.proto for the fields those commands set. Unknown
//! fields are skipped. Responses are always JSON (clients accept it).

use base64::Engine;
use serde_json::{Map, Value, json};

use super::status::ApiError;

#[derive(Clone, Copy)]
enum T {
    Str,
    Bytes,
    Int,
    Bool,
    Msg(&'static [F]),
    RepStr,
    RepMsg(&'static [F]),
    MapStr,
    MapBytes,
    IntOrStr,
}
type F = (u32, &'static str, T);

const META: &[F] = &[(1, "name", T::Str), (2, "generateName", T::Str), (3, "namespace", T::Str),
    (11, "labels", T::MapStr), (12, "annotations", T::MapStr), (14, "finalizers", T::RepStr)];
const KV: &[F] = &[(1, "name", T::Str), (2, "value", T::Str)];
const CPORT: &[F] = &[(1, "name", T::Str), (2, "hostPort", T::Int), (3, "containerPort", T::Int), (4, "protocol", T::Str)];
const CONTAINER: &[F] = &[(1, "name", T::Str), (2, "image", T::Str), (3, "command", T::RepStr), (4, "args", T::RepStr),
    (5, "workingDir", T::Str), (6, "ports", T::RepMsg(CPORT)), (7, "env", T::RepMsg(KV)), (14, "imagePullPolicy", T::Str)];
const POD_SPEC: &[F] = &[(2, "containers", T::RepMsg(CONTAINER)), (3, "restartPolicy", T::Str), (6, "dnsPolicy", T::Str),
    (7, "nodeSelector", T::MapStr), (8, "serviceAccountName", T::Str), (10, "nodeName", T::Str)];
const TEMPLATE: &[F] = &[(1, "metadata", T::Msg(META)), (2, "spec", T::Msg(POD_SPEC))];
const SELECTOR: &[F] = &[(1, "matchLabels", T::MapStr), (2, "matchExpressions", T::RepMsg(SELECTOR_REQ))];
const DEPLOY_SPEC: &[F] = &[(1, "replicas", T::Int), (2, "selector", T::Msg(SELECTOR)), (3, "template", T::Msg(TEMPLATE))];
const SPORT: &[F] = &[(1, "name", T::Str), (2, "protocol", T::Str), (3, "port", T::Int), (4, "targetPort", T::IntOrStr), (5, "nodePort", T::Int)];
const SVC_SPEC: &[F] = &[(1, "ports", T::RepMsg(SPORT)), (2, "selector", T::MapStr), (3, "clusterIP", T::Str), (4, "type", T::Str),
    (5, "externalIPs", T::RepStr), (10, "externalName", T::Str)];

// authentication.k8s.io/v1 and authorization.k8s.io/v1 (`kubectl create
// token`, `auth whoami`, `auth can-i` send these).
const BOUND_REF: &[F] = &[(1, "kind", T::Str), (2, "apiVersion", T::Str), (3, "name", T::Str), (4, "uid", T::Str)];
const TOKEN_SPEC: &[F] = &[(1, "audiences", T::RepStr), (3, "boundObjectRef", T::Msg(BOUND_REF)), (4, "expirationSeconds", T::Int)];
const RES_ATTRS: &[F] = &[(1, "namespace", T::Str), (2, "verb", T::Str), (3, "group", T::Str), (4, "version", T::Str),
    (5, "resource", T::Str), (6, "subresource", T::Str), (7, "name", T::Str)];
const URL_ATTRS: &[F] = &[(1, "path", T::Str), (2, "verb", T::Str)];
const SSAR_SPEC: &[F] = &[(1, "resourceAttributes", T::Msg(RES_ATTRS)), (2, "nonResourceAttributes", T::Msg(URL_ATTRS))];
const SAR_SPEC: &[F] = &[(1, "resourceAttributes", T::Msg(RES_ATTRS)), (2, "nonResourceAttributes", T::Msg(URL_ATTRS)),
    (3, "user", T::Str), (4, "groups", T::RepStr), (6, "uid", T::Str)];

// rbac.authorization.k8s.io/v1 (`kubectl create role|clusterrole|rolebinding|clusterrolebinding`).
const POLICY_RULE: &[F] = &[(1, "verbs", T::RepStr), (2, "apiGroups", T::RepStr), (3, "resources", T::RepStr),
    (4, "resourceNames", T::RepStr), (5, "nonResourceURLs", T::RepStr)];
const SELECTOR_REQ: &[F] = &[(1, "key", T::Str), (2, "operator", T::Str), (3, "values", T::RepStr)];
const AGGREGATION: &[F] = &[(1, "clusterRoleSelectors", T::RepMsg(SELECTOR))];
const SUBJECT: &[F] = &[(1, "kind", T::Str), (2, "apiGroup", T::Str), (3, "name", T::Str), (4, "namespace", T::Str)];
const ROLE_REF: &[F] = &[(1, "apiGroup", T::Str), (2, "kind", T::Str), (3, "name", T::Str)];

fn kind_schema(kind: &str) -> Option<&'static [F]> {
    Some(match kind {
        "Namespace" => &[(1, "metadata", T::Msg(META))],
        "ConfigMap" => &[(1, "metadata", T::Msg(META)), (2, "data", T::MapStr), (3, "binaryData", T::MapBytes), (4, "immutable", T::Bool)],
        "Secret" => &[(1, "metadata", T::Msg(META)), (2, "data", T::MapBytes), (3, "type", T::Str), (4, "stringData", T::MapStr), (5, "immutable", T::Bool)],
        "Deployment" => &[(1, "metadata", T::Msg(META)), (2, "spec", T::Msg(DEPLOY_SPEC))],
        "Service" => &[(1, "metadata", T::Msg(META)), (2, "spec", T::Msg(SVC_SPEC))],
        "Pod" => &[(1, "metadata", T::Msg(META)), (2, "spec", T::Msg(POD_SPEC))],
        "ServiceAccount" => &[(1, "metadata", T::Msg(META))],
        "TokenRequest" => &[(1, "metadata", T::Msg(META)), (2, "spec", T::Msg(TOKEN_SPEC))],
        "TokenReview" => &[(1, "metadata", T::Msg(META)), (2, "spec", T::Msg(&[(1, "token", T::Str), (2, "audiences", T::RepStr)]))],
        "SelfSubjectReview" => &[(1, "metadata", T::Msg(META))],
        "SelfSubjectAccessReview" => &[(1, "metadata", T::Msg(META)), (2, "spec", T::Msg(SSAR_SPEC))],
        "SubjectAccessReview" | "LocalSubjectAccessReview" => &[(1, "metadata", T::Msg(META)), (2, "spec", T::Msg(SAR_SPEC))],
        "Role" => &[(1, "metadata", T::Msg(META)), (2, "rules", T::RepMsg(POLICY_RULE))],
        "ClusterRole" => &[(1, "metadata", T::Msg(META)), (2, "rules", T::RepMsg(POLICY_RULE)), (3, "aggregationRule", T::Msg(AGGREGATION))],
        "RoleBinding" | "ClusterRoleBinding" => &[(1, "metadata", T::Msg(META)), (2, "subjects", T::RepMsg(SUBJECT)), (3, "roleRef", T::Msg(ROLE_REF))],
        "SelfSubjectRulesReview" => &[(1, "metadata", T::Msg(META)), (2, "spec", T::Msg(&[(1, "namespace", T::Str)]))],
        _ => return None,
    })
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

fn bad() -> ApiError {
    ApiError::bad_request("malformed protobuf body")
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, ApiError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.pos).ok_or_else(bad)?;
            self.pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad())
    }
    fn bytes(&mut self) -> Result<&'a [u8], ApiError> {
        let len = usize::try_from(self.varint()?).map_err(|_| bad())?;
        // A crafted length can be near usize::MAX: the end must not overflow.
        let end = self.pos.checked_add(len).ok_or_else(bad)?;
        let s = self.b.get(self.pos..end).ok_or_else(bad)?;
        self.pos = end;
        Ok(s)
    }
    fn fixed(&mut self, n: usize) -> Result<(), ApiError> {
        self.pos = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(bad)?;
        Ok(())
    }
    fn skip(&mut self, wire: u64) -> Result<(), ApiError> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.fixed(8),
            2 => self.bytes().map(|_| ()),
            5 => self.fixed(4),
            _ => Err(bad()),
        }
    }
}

fn utf8(b: &[u8]) -> Result<String, ApiError> {
    String::from_utf8(b.to_vec()).map_err(|_| bad())
}

fn decode_msg(b: &[u8], schema: &[F]) -> Result<Value, ApiError> {
    let mut out = Map::new();
    let mut r = Reader { b, pos: 0 };
    while r.pos < b.len() {
        let key = r.varint()?;
        let (num, wire) = (u32::try_from(key >> 3).map_err(|_| bad())?, key & 7);
        let Some((_, name, t)) = schema.iter().find(|(n, _, _)| *n == num) else {
            r.skip(wire)?;
            continue;
        };
        let name = (*name).to_string();
        match t {
            T::Str => {
                // gogo-protobuf writes every string; Go's "" means unset.
                let v = utf8(r.bytes()?)?;
                if !v.is_empty() {
                    out.insert(name, json!(v));
                }
            }
            T::Bytes => {
                out.insert(name, json!(base64::engine::general_purpose::STANDARD.encode(r.bytes()?)));
            }
            T::Int => {
                // int32/int64 as varint (two's complement for negatives).
                let v = r.varint()?;
                // Zero is Go's unset for plain ints; replicas is a pointer.
                if v != 0 || name == "replicas" {
                    #[allow(clippy::cast_possible_wrap)]
                    out.insert(name, json!(v as i64));
                }
            }
            T::Bool => {
                out.insert(name, json!(r.varint()? != 0));
            }
            T::Msg(s) => {
                out.insert(name, decode_msg(r.bytes()?, s)?);
            }
            T::RepStr => {
                let s = utf8(r.bytes()?)?;
                push(&mut out, name, json!(s));
            }
            T::RepMsg(s) => {
                let m = decode_msg(r.bytes()?, s)?;
                push(&mut out, name, m);
            }
            T::MapStr | T::MapBytes => {
                let entry = decode_msg(r.bytes()?, &[(1, "k", T::Str), (2, "v", if matches!(t, T::MapStr) { T::Str } else { T::Bytes })])?;
                let k = entry.get("k").and_then(Value::as_str).unwrap_or("").to_string();
                let v = entry.get("v").cloned().unwrap_or(json!(""));
                if let Value::Object(m) = out.entry(name).or_insert_with(|| json!({})) {
                    m.insert(k, v);
                }
            }
            T::IntOrStr => {
                let v = decode_msg(r.bytes()?, &[(1, "type", T::Int), (2, "intVal", T::Int), (3, "strVal", T::Str)])?;
                let val = if v.get("type").and_then(Value::as_i64) == Some(1) { v.get("strVal").cloned().unwrap_or(json!("")) } else { v.get("intVal").cloned().unwrap_or(json!(0)) };
                out.insert(name, val);
            }
        }
    }
    Ok(Value::Object(out))
}

fn push(out: &mut Map<String, Value>, name: String, v: Value) {
    if let Value::Array(a) = out.entry(name).or_insert_with(|| json!([])) {
        a.push(v);
    }
}

/// Decode a `k8s\0`-prefixed protobuf body into the JSON object.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let rest = body.strip_prefix(b"k8s\0").ok_or_else(bad)?;
    let unknown = decode_msg(rest, &[(1, "typeMeta", T::Msg(&[(1, "apiVersion", T::Str), (2, "kind", T::Str)])), (2, "raw", T::Bytes)])?;
    let kind = unknown.pointer("/typeMeta/kind").and_then(Value::as_str).unwrap_or("").to_string();
    let api_version = unknown.pointer("/typeMeta/apiVersion").and_then(Value::as_str).unwrap_or("").to_string();
    let schema = kind_schema(&kind).ok_or_else(|| {
        ApiError::unsupported_media(format!("protobuf bodies for {kind} are not supported; send application/json"))
    })?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(unknown.get("raw").and_then(Value::as_str).unwrap_or(""))
        .map_err(|_| bad())?;
    let mut obj = decode_msg(&raw, schema)?;
    if let Value::Object(m) = &mut obj {
        m.insert("apiVersion".into(), json!(api_version));
        m.insert("kind".into(), json!(kind));
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn crafted_lengths_are_errors_not_panics() {
        // Field 1 (typeMeta), length-delimited, length 2^64-1.
        let mut b = b"k8s\0\x0a".to_vec();
        b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert_eq!(decode(&b).map_err(|e| e.code).err(), Some(400));
        // An unknown fixed64 field that runs past the end.
        assert_eq!(decode(b"k8s\0\x19\x01").map_err(|e| e.code).err(), Some(400));
        // A varint that never ends.
        assert_eq!(decode(b"k8s\0\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff").map_err(|e| e.code).err(), Some(400));
    }

    #[test]
    fn random_bodies_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            let mut body = b"k8s\0".to_vec();
            let mut y = x;
            for _ in 0..len {
                y ^= y << 13;
                y ^= y >> 7;
                y ^= y << 17;
                body.push(y.to_le_bytes()[0]);
            }
            let _ = decode(&body);
        }
    }
}
