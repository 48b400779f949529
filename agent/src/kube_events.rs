//! Kubernetes Events (core/v1) the agent records on objects, for what a
//! user looks for in `kubectl describe service`: a Service cut to the
//! per-Service backend cap on this node. Sent from a task of their own, so
//! a slow or unreachable apiserver never holds up the run loop; a failed
//! send is logged, never retried (the state is also in `riptide status`
//! and the metrics).

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{MicroTime, Time},
};
use kube::{Api, Client, api::PostParams};

/// Event type.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Normal,
    Warning,
}

/// Records `reason`/`message` on `svc` as coming from the agent of `node`.
pub fn publish(client: &Client, svc: &crate::slim::SlimService, node: &str, kind: Kind, reason: &str, message: &str) {
    let ns = if svc.namespace().is_empty() { "default".to_owned() } else { svc.namespace().to_owned() };
    let now = k8s_openapi::jiff::Timestamp::now();
    let ev = Event {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("{}.{:x}", svc.name(), now.as_nanosecond())),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            name: Some(svc.name().to_owned()),
            namespace: Some(ns.clone()),
            uid: svc.uid.as_ref().map(ToString::to_string),
            resource_version: svc.resource_version.clone(),
            field_path: None,
        },
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        type_: Some(match kind {
            Kind::Normal => "Normal",
            Kind::Warning => "Warning",
        }
        .into()),
        source: Some(EventSource { component: Some("riptide-agent".into()), host: Some(node.to_owned()) }),
        reporting_component: Some("riptide.io/agent".into()),
        reporting_instance: Some(node.to_owned()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        action: Some("Programming".into()),
        count: Some(1),
        ..Default::default()
    };
    if let Err(e) = crate::watch::declared::<Event>(&["create"]) {
        tracing::warn!(error = %e, "not recording the Event");
        return;
    }
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    let (reason, service) = (reason.to_owned(), format!("{ns}/{}", svc.name()));
    tokio::spawn(async move {
        if let Err(e) = api.create(&PostParams::default(), &ev).await {
            tracing::warn!(service = %service, reason = %reason, error = %e, "recording the Event failed");
        }
    });
}
