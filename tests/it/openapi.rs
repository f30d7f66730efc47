//! The OpenAPI document at `/api/openapi.json` describes exactly the routes the server has.
//!
//! The router's routes are read from its source (axum cannot list them at run time): every `.route(...)` in
//! `crates/server/src/api/mod.rs`, where all routes live. The test fails when a route is missing from the document,
//! when the document names one the router does not have, and when the running server answers a documented route
//! with its "no such route" fallback.

use std::collections::BTreeSet;
use std::path::Path;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::support::server::TestServer;

/// `(METHOD, path)` for every route the router in `api/mod.rs` registers, `/api` routes with their prefix.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let source_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/server/src/api/mod.rs");
    let source = std::fs::read_to_string(&source_path).unwrap();
    // The `/api` router is built first (`let api = Router::new()...;`), then the root router nests it.
    let api_start = source
        .find("let api = Router::new()")
        .expect("the /api router");
    let api_end = api_start + source[api_start..].find(';').unwrap();
    let mut routes = BTreeSet::new();
    for (section, prefix) in [
        (&source[api_start..api_end], "/api"),
        (&source[api_end..], ""),
    ] {
        for call in section.split(".route(").skip(1) {
            let path = call.split('"').nth(1).unwrap();
            // The handlers of this one route: up to the next `.route(`, `.fallback` or the end of the chain.
            let methods = call.split(".fallback").next().unwrap();
            for method in ["get", "post", "patch", "put", "delete"] {
                if methods.contains(&format!("{method}(")) {
                    routes.insert((method.to_uppercase(), format!("{prefix}{path}")));
                }
            }
        }
    }
    assert!(
        routes.len() > 20,
        "the source parse found too few routes: {routes:?}"
    );
    routes
}

fn routes_in_document(document: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in ["get", "post", "patch", "put", "delete"] {
            if item.get(method).is_some() {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

#[tokio::test]
async fn the_document_covers_every_route_and_names_no_other() {
    let server = TestServer::start().await;
    // No token needed: the document describes the API and holds nothing of anyone's.
    let (status, document) = server
        .raw(Method::GET, "/api/openapi.json", None, None, Vec::new())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        document["openapi"]
    );

    let in_source = routes_in_source();
    let documented = routes_in_document(&document);
    let undocumented: Vec<_> = in_source.difference(&documented).collect();
    let phantom: Vec<_> = documented.difference(&in_source).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the OpenAPI document: {undocumented:?}"
    );
    assert!(
        phantom.is_empty(),
        "the OpenAPI document names routes the router lacks: {phantom:?}"
    );

    // The running server has each documented route: never its fallback, whatever else it answers without a token.
    for (method, path) in &documented {
        let concrete: String = path
            .split('/')
            .map(|segment| {
                if segment.starts_with('{') {
                    uuid::Uuid::now_v7().to_string()
                } else {
                    segment.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let (status, body) = server
            .raw(
                method.clone(),
                &concrete,
                None,
                Some("application/json"),
                b"{}".to_vec(),
            )
            .await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            status != StatusCode::METHOD_NOT_ALLOWED && !message.starts_with("no route for"),
            "{method} {concrete}: {status} {body}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn the_document_describes_auth_errors_and_bodies() {
    let server = TestServer::start().await;
    let (_, document) = server
        .raw(Method::GET, "/api/openapi.json", None, None, Vec::new())
        .await;
    let schemes = &document["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["runCredential"]["scheme"], "bearer");
    let schemas = document["components"]["schemas"].as_object().unwrap();
    let error = &schemas["Error"];
    assert_eq!(error["required"], serde_json::json!(["error"]), "{error}");

    // Every reference resolves to a schema the document defines.
    let rendered = document.to_string();
    for reference in rendered.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap();
        assert!(
            schemas.contains_key(name),
            "a $ref to a missing schema: {name}"
        );
    }

    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|status| status.starts_with('2')),
                "{method} {path} documents no success"
            );
            let secured = operation["security"]
                .as_array()
                .is_some_and(|list| !list.is_empty());
            if secured {
                let unauthorized =
                    &responses["401"]["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(
                    unauthorized, "#/components/schemas/Error",
                    "{method} {path}"
                );
            } else {
                assert!(
                    ["/healthz", "/readyz", "/api/openapi.json"].contains(&path.as_str()),
                    "{method} {path} is documented without auth"
                );
            }
            if operation.get("requestBody").is_some() {
                for status in ["400", "413", "415", "422"] {
                    assert!(
                        responses.contains_key(status),
                        "{method} {path} lacks {status}"
                    );
                }
            }
        }
    }
    // Request bodies are strict, as the server is.
    assert_eq!(schemas["CreateRunRequest"]["additionalProperties"], false);
    assert!(
        schemas["CreateRunRequest"]["required"]
            .as_array()
            .unwrap()
            .contains(&Value::from("command"))
    );
    server.stop().await;
}
