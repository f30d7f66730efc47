use secrecy::ExposeSecret;
use serde_json::json;

use super::*;
use crate::catalog::{ProviderDescriptor, ProviderSpec};

/// Providers, and plugin drivers as (plugin key, descriptor).
struct Catalog(Vec<ProviderDescriptor>, Vec<(String, ProviderDescriptor)>);

impl ProviderCatalog for Catalog {
    fn provider(&self, key: &str) -> Option<&ProviderDescriptor> {
        self.0.iter().find(|descriptor| descriptor.key() == key)
    }

    fn provider_keys(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|descriptor| descriptor.key().to_owned())
            .collect()
    }

    fn plugin_driver(&self, plugin_key: &str, driver_key: &str) -> Option<&ProviderDescriptor> {
        self.1
            .iter()
            .find(|(plugin, descriptor)| plugin == plugin_key && descriptor.key() == driver_key)
            .map(|(_, descriptor)| descriptor)
    }

    fn plugin_driver_keys(&self) -> Vec<String> {
        self.1
            .iter()
            .map(|(plugin, descriptor)| format!("{plugin}/{}", descriptor.key()))
            .collect()
    }
}

/// A schema with secret-ref fields at the top, nested, and in array items.
fn secretive(key: &str) -> ProviderDescriptor {
    ProviderDescriptor::new(ProviderSpec {
        key: key.to_owned(),
        display_name: "Secretive".to_owned(),
        description: "test".to_owned(),
        config_schema: json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "apiKey": {"type": "string", "format": "secret-ref", "minLength": 4},
                "auth": {"type": "object", "properties": {"token": {"type": "string", "format": "secret-ref"}}},
                "users": {"type": "array", "items": {"properties": {"password": {"type": "string", "format": "secret-ref"}}}},
                "region": {"type": "string", "default": "eu"}
            }
        }),
        supports_reusable_leases: true,
        supports_run_execution: true,
    })
    .unwrap()
}

fn catalog() -> Catalog {
    let fake = ProviderDescriptor::new(ProviderSpec {
        key: "fake".to_owned(),
        display_name: "Fake".to_owned(),
        description: "test".to_owned(),
        config_schema: json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {"image": {"type": "string", "minLength": 1, "default": "fake:latest"}}
        }),
        supports_reusable_leases: true,
        supports_run_execution: true,
    })
    .unwrap();
    Catalog(
        vec![fake, secretive("vault")],
        vec![("acme.sandbox".to_owned(), secretive("acme-vm"))],
    )
}

fn paths(errors: &ValidationErrors) -> Vec<&str> {
    errors
        .errors()
        .iter()
        .map(|error| error.path.as_str())
        .collect()
}

fn ssh_base() -> serde_json::Value {
    json!({"host": "example.internal", "username": "agent", "remoteWorkspacePath": "/srv/work"})
}

#[test]
fn local_accepts_only_an_empty_object() {
    assert!(matches!(
        DriverConfig::parse(Driver::Local, &json!({}), &catalog()),
        Ok(DriverConfig::Local(LocalConfig { timeout_ms: None }))
    ));
    let errors = DriverConfig::parse(Driver::Local, &json!({"x": 1}), &catalog()).unwrap_err();
    assert_eq!(paths(&errors), ["config.x"]);
}

#[test]
fn ssh_defaults_are_applied_in_the_stored_shape() {
    let config = DriverConfig::parse(Driver::Ssh, &ssh_base(), &catalog()).unwrap();
    let stored = config.to_stored().unwrap();
    assert_eq!(stored["port"], 22);
    assert_eq!(stored["strictHostKeyChecking"], true);
    assert_eq!(stored["workspaceMode"], "per_run");
    assert!(!stored.contains_key("privateKey"));
}

#[test]
fn ssh_reports_every_problem_at_once() {
    let config = json!({
        "host": "",
        "port": 70000,
        "remoteWorkspacePath": "relative/path",
        "strictHostKeyChecking": "no",
        "workspaceMode": "sometimes",
        "surprise": true
    });
    let errors = DriverConfig::parse(Driver::Ssh, &config, &catalog()).unwrap_err();
    assert_eq!(
        paths(&errors),
        [
            "config.host",
            "config.port",
            "config.username",
            "config.remoteWorkspacePath",
            "config.strictHostKeyChecking",
            "config.workspaceMode",
            "config.surprise"
        ]
    );
}

#[test]
fn ssh_sync_excludes_validate_store_and_match() {
    let mut config = ssh_base();
    config["syncExclude"] = json!(["node_modules", "*.log", "build/cache"]);
    let parsed = DriverConfig::parse(Driver::Ssh, &config, &catalog()).unwrap();
    assert_eq!(
        parsed.to_stored().unwrap()["syncExclude"],
        json!(["node_modules", "*.log", "build/cache"])
    );
    let DriverConfig::Ssh(ssh) = parsed else {
        panic!("not ssh")
    };
    let exclude = &ssh.sync_exclude;
    assert!(exclude.matches("node_modules"));
    assert!(exclude.matches("web/node_modules/react/index.js"));
    assert!(exclude.matches("logs/today.log"));
    assert!(exclude.matches("build/cache/x"));
    assert!(!exclude.matches("cache"), "a pattern with '/' is anchored");
    assert!(!exclude.matches("src/build/cache"));
    assert!(!exclude.matches("src/main.rs"));
    assert!(!exclude.matches("node_modules.txt"));

    for bad in [
        json!(["../up"]),
        json!([""]),
        json!(["a//b"]),
        json!([7]),
        json!("node_modules"),
    ] {
        let mut config = ssh_base();
        config["syncExclude"] = bad.clone();
        let errors = DriverConfig::parse(Driver::Ssh, &config, &catalog()).unwrap_err();
        assert_eq!(paths(&errors), ["config.syncExclude"], "{bad}");
    }
}

#[test]
fn ssh_port_zero_and_fractions_are_rejected() {
    for port in [json!(0), json!(22.5), json!(-1), json!("22")] {
        let mut config = ssh_base();
        config["port"] = port;
        let errors = DriverConfig::parse(Driver::Ssh, &config, &catalog()).unwrap_err();
        assert_eq!(paths(&errors), ["config.port"]);
    }
}

#[test]
fn ssh_rejects_option_injection_and_dot_dot() {
    let mut config = ssh_base();
    config["host"] = json!("-oProxyCommand=evil");
    config["remoteWorkspacePath"] = json!("/srv/../etc");
    let errors = DriverConfig::parse(Driver::Ssh, &config, &catalog()).unwrap_err();
    assert_eq!(
        paths(&errors),
        ["config.host", "config.remoteWorkspacePath"]
    );
}

#[test]
fn inline_secrets_block_storing_until_bound() {
    let mut config = ssh_base();
    config["privateKey"] = json!("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n");
    let mut parsed = DriverConfig::parse(Driver::Ssh, &config, &catalog()).unwrap();
    assert!(parsed.to_stored().is_none());
    let inline = parsed.inline_secrets();
    assert_eq!(inline.len(), 1);
    assert_eq!(inline[0].0, SecretField::SshPrivateKey);
    assert!(inline[0].1.expose_secret().starts_with("-----BEGIN"));
    assert!(!format!("{parsed:?}").contains("BEGIN"));

    let id = SecretId::new();
    parsed.bind_secret(&SecretField::SshPrivateKey, id);
    let stored = parsed.to_stored().unwrap();
    assert_eq!(stored["privateKeySecretRef"], id.to_string());
    assert!(!serde_json::to_string(&stored).unwrap().contains("BEGIN"));
}

#[test]
fn a_secret_value_and_its_reference_are_mutually_exclusive() {
    let mut config = ssh_base();
    config["password"] = json!("hunter2");
    config["passwordSecretRef"] = json!(SecretId::new().to_string());
    let errors = DriverConfig::parse(Driver::Ssh, &config, &catalog()).unwrap_err();
    assert_eq!(paths(&errors), ["config.password"]);
    assert!(!errors.to_string().contains("hunter2"));
}

#[test]
fn merge_replaces_a_reference_with_a_new_inline_secret() {
    let stored = json!({"host": "a", "privateKeySecretRef": "x", "knownHosts": "line"});
    let patch = json!({"privateKey": "new", "knownHosts": null, "port": 2222});
    let merged = merge_config(stored.as_object().unwrap(), patch.as_object().unwrap());
    assert_eq!(
        json!(merged),
        json!({"host": "a", "privateKey": "new", "port": 2222})
    );
}

#[test]
fn sandbox_applies_provider_defaults_and_checks_fields() {
    let config =
        DriverConfig::parse(Driver::Sandbox, &json!({"provider": "fake"}), &catalog()).unwrap();
    let stored = config.to_stored().unwrap();
    assert_eq!(
        json!(stored),
        json!({"provider": "fake", "reuseLease": false, "image": "fake:latest"})
    );

    let errors = DriverConfig::parse(
        Driver::Sandbox,
        &json!({"provider": "fake", "image": 7, "timeoutMs": 0}),
        &catalog(),
    )
    .unwrap_err();
    assert_eq!(paths(&errors), ["config.timeoutMs", "config.image"]);
}

#[test]
fn sandbox_names_unknown_providers_and_the_installed_ones() {
    let errors =
        DriverConfig::parse(Driver::Sandbox, &json!({"provider": "e2b"}), &catalog()).unwrap_err();
    assert_eq!(paths(&errors), ["config.provider"]);
    assert!(
        errors.errors()[0]
            .message
            .contains("installed: fake, vault")
    );
    let errors = DriverConfig::parse(Driver::Sandbox, &json!({}), &catalog()).unwrap_err();
    assert_eq!(paths(&errors), ["config.provider"]);
}

#[test]
fn plugin_keys_are_checked() {
    let ok = json!({"pluginKey": "acme.sandbox", "driverKey": "acme-vm"});
    let parsed = DriverConfig::parse(Driver::Plugin, &ok, &catalog()).unwrap();
    assert_eq!(
        parsed.to_stored().unwrap()["driverConfig"],
        json!({"region": "eu"})
    );
    let unknown = json!({"pluginKey": "acme.sandbox", "driverKey": "other"});
    let errors = DriverConfig::parse(Driver::Plugin, &unknown, &catalog()).unwrap_err();
    assert_eq!(paths(&errors), ["config.driverKey"]);
    assert!(
        errors.errors()[0]
            .message
            .contains("installed: acme.sandbox/acme-vm")
    );
    let bad = json!({"pluginKey": "", "driverKey": "Bad Key", "driverConfig": []});
    let errors = DriverConfig::parse(Driver::Plugin, &bad, &catalog()).unwrap_err();
    assert_eq!(
        paths(&errors),
        [
            "config.pluginKey",
            "config.driverKey",
            "config.driverConfig"
        ]
    );
}

#[test]
fn sync_back_bounds_are_common_to_ssh_and_sandbox_configs() {
    // Absent: the default applies, and the stored shape does not grow a key.
    let ssh = DriverConfig::parse(Driver::Ssh, &ssh_base(), &catalog()).unwrap();
    let DriverConfig::Ssh(parsed) = &ssh else {
        panic!("not ssh")
    };
    assert_eq!(parsed.sync_back_limit_mb(), DEFAULT_SYNC_BACK_MAX_MB);
    assert!(!ssh.to_stored().unwrap().contains_key("syncBackMaxMb"));

    let mut config = ssh_base();
    config["syncBackMaxMb"] = json!(64);
    let ssh = DriverConfig::parse(Driver::Ssh, &config, &catalog()).unwrap();
    assert_eq!(ssh.to_stored().unwrap()["syncBackMaxMb"], 64);
    let DriverConfig::Ssh(parsed) = &ssh else {
        panic!("not ssh")
    };
    assert_eq!(parsed.sync_back_limit_mb(), 64);

    // A common sandbox field: read by the envelope, never handed to the provider's schema (which would refuse it).
    let sandbox = DriverConfig::parse(
        Driver::Sandbox,
        &json!({"provider": "fake", "syncBackMaxMb": 2048}),
        &catalog(),
    )
    .unwrap();
    let DriverConfig::Sandbox(parsed) = &sandbox else {
        panic!("not sandbox")
    };
    assert_eq!(parsed.sync_back_limit_mb(), 2048);
    assert!(!parsed.fields.contains_key("syncBackMaxMb"));
    assert_eq!(
        json!(sandbox.to_stored().unwrap()),
        json!({"provider": "fake", "reuseLease": false, "syncBackMaxMb": 2048, "image": "fake:latest"})
    );
    let DriverConfig::Sandbox(default) =
        DriverConfig::parse(Driver::Sandbox, &json!({"provider": "fake"}), &catalog()).unwrap()
    else {
        panic!("not sandbox")
    };
    assert_eq!(default.sync_back_limit_mb(), 1024);

    for bad in [
        json!(0),
        json!(-1),
        json!(1.5),
        json!("1024"),
        json!(MAX_SYNC_BACK_MAX_MB + 1),
    ] {
        let mut config = ssh_base();
        config["syncBackMaxMb"] = bad.clone();
        let errors = DriverConfig::parse(Driver::Ssh, &config, &catalog()).unwrap_err();
        assert_eq!(paths(&errors), ["config.syncBackMaxMb"], "{bad}");
        let errors = DriverConfig::parse(
            Driver::Sandbox,
            &json!({"provider": "fake", "syncBackMaxMb": bad}),
            &catalog(),
        )
        .unwrap_err();
        assert_eq!(paths(&errors), ["config.syncBackMaxMb"]);
    }
}

#[test]
fn schema_secrets_are_found_bound_and_never_printed() {
    let given = json!({
        "provider": "vault",
        "apiKey": "key-plain-1",
        "auth": {"token": "token-plain-2"},
        "users": [{"password": "pw-plain-3"}, {"password": {"secretRef": "00000000-0000-4000-8000-000000000001"}}]
    });
    let mut parsed = DriverConfig::parse(Driver::Sandbox, &given, &catalog()).unwrap();
    assert!(
        parsed.to_stored().is_none(),
        "inline secrets are not storable"
    );
    let debug = format!("{parsed:?}");
    for plain in ["key-plain-1", "token-plain-2", "pw-plain-3"] {
        assert!(!debug.contains(plain), "{debug}");
    }
    let inline = parsed.inline_secrets();
    let places: Vec<String> = inline.iter().map(|(field, _)| field.value_path()).collect();
    assert_eq!(places, ["apiKey", "auth.token", "users[0].password"]);
    assert_eq!(inline[1].1.expose_secret(), "token-plain-2");
    let refs = parsed.secret_refs();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].0.value_path(), "users[1].password");

    let ids: Vec<SecretId> = (0..3).map(|_| SecretId::new()).collect();
    for ((field, _), id) in inline.iter().zip(&ids) {
        parsed.bind_secret(field, *id);
    }
    let stored = parsed.to_stored().unwrap();
    assert_eq!(stored["apiKey"], json!({"secretRef": ids[0].to_string()}));
    assert_eq!(
        stored["auth"]["token"],
        json!({"secretRef": ids[1].to_string()})
    );
    assert_eq!(stored["region"], "eu");
    let mut found = stored_secret_refs(&stored);
    let mut expected = ids.clone();
    expected.push("00000000-0000-4000-8000-000000000001".parse().unwrap());
    found.sort();
    expected.sort();
    assert_eq!(found, expected);

    // The stored shape parses again (references where strings are expected), and resolves for use.
    let mut reparsed =
        DriverConfig::parse(Driver::Sandbox, &Value::Object(stored), &catalog()).unwrap();
    assert_eq!(reparsed.secret_refs().len(), 4);
    let (field, _) = reparsed.secret_refs().remove(0);
    reparsed.set_resolved_secret(&field, SecretString::from("key-plain-1".to_owned()));
    assert!(reparsed.to_stored().is_none());
    let DriverConfig::Sandbox(sandbox) = &reparsed else {
        unreachable!()
    };
    assert_eq!(sandbox.fields["apiKey"], "key-plain-1");
    assert!(!format!("{reparsed:?}").contains("key-plain-1"));
}

#[test]
fn bad_secret_references_and_values_are_refused_at_their_path() {
    for (config, path) in [
        (
            json!({"provider": "vault", "apiKey": {"secretRef": "nope"}}),
            "config.apiKey.secretRef",
        ),
        (
            json!({"provider": "vault", "apiKey": "abc"}),
            "config.apiKey",
        ),
        (
            json!({"provider": "vault", "apiKey": {"secretRef": "00000000-0000-4000-8000-000000000001", "x": 1}}),
            "config.apiKey",
        ),
        (
            json!({"pluginKey": "acme.sandbox", "driverKey": "acme-vm", "driverConfig": {"auth": {"token": 5}}}),
            "config.driverConfig.auth.token",
        ),
    ] {
        let driver = if config.get("provider").is_some() {
            Driver::Sandbox
        } else {
            Driver::Plugin
        };
        let errors = DriverConfig::parse(driver, &config, &catalog()).unwrap_err();
        assert_eq!(paths(&errors), [path], "{config}");
        assert!(!format!("{errors:?}").contains("abc\""), "{errors:?}");
    }
}

#[test]
fn every_driver_takes_a_default_command_timeout_outside_the_provider_fields() {
    let mut ssh = ssh_base();
    ssh["timeoutMs"] = json!(1500);
    let configs = [
        (Driver::Local, json!({"timeoutMs": 1500})),
        (Driver::Ssh, ssh),
        (
            Driver::Sandbox,
            json!({"provider": "fake", "timeoutMs": 1500}),
        ),
        (
            Driver::Plugin,
            json!({"pluginKey": "acme.sandbox", "driverKey": "acme-vm", "timeoutMs": 1500}),
        ),
    ];
    for (driver, config) in configs {
        let parsed = DriverConfig::parse(driver, &config, &catalog())
            .unwrap_or_else(|errors| panic!("{driver}: {errors}"));
        assert_eq!(parsed.timeout_ms(), Some(1500), "{driver}");
        let stored = parsed.to_stored().unwrap();
        assert_eq!(stored[TIMEOUT_MS_KEY], json!(1500), "{driver}");
        // Read back from the stored shape: the same value (an environment's config round-trips).
        let again = DriverConfig::parse(driver, &Value::Object(stored), &catalog()).unwrap();
        assert_eq!(again.timeout_ms(), Some(1500), "{driver}");
    }
    // A provider's schema (additionalProperties: false) never sees the key; a plugin driver's fields neither.
    let DriverConfig::Sandbox(sandbox) = DriverConfig::parse(
        Driver::Sandbox,
        &json!({"provider": "fake", "timeoutMs": 5}),
        &catalog(),
    )
    .unwrap() else {
        panic!("not a sandbox config")
    };
    assert!(!sandbox.fields.contains_key(TIMEOUT_MS_KEY));
    let DriverConfig::Plugin(plugin) = DriverConfig::parse(
        Driver::Plugin,
        &json!({"pluginKey": "acme.sandbox", "driverKey": "acme-vm", "timeoutMs": 5}),
        &catalog(),
    )
    .unwrap() else {
        panic!("not a plugin config")
    };
    assert!(!plugin.driver_config.contains_key(TIMEOUT_MS_KEY));
    // Absent: no timeout, and no key in the stored shape.
    let local = DriverConfig::parse(Driver::Local, &json!({}), &catalog()).unwrap();
    assert_eq!(local.timeout_ms(), None);
    assert!(local.to_stored().unwrap().is_empty());
}

#[test]
fn default_command_timeouts_out_of_bounds_are_refused_at_their_path() {
    for bad in [
        json!(0),
        json!(-5),
        json!(86_400_001),
        json!(1.5),
        json!("10s"),
        json!(true),
    ] {
        for driver in [Driver::Local, Driver::Sandbox] {
            let mut config = match driver {
                Driver::Sandbox => json!({"provider": "fake"}),
                _ => json!({}),
            };
            config["timeoutMs"] = bad.clone();
            let errors = DriverConfig::parse(driver, &config, &catalog()).unwrap_err();
            assert_eq!(paths(&errors), ["config.timeoutMs"], "{driver} {bad}");
        }
    }
    let max = DriverConfig::parse(
        Driver::Local,
        &json!({"timeoutMs": MAX_TIMEOUT_MS}),
        &catalog(),
    )
    .unwrap();
    assert_eq!(max.timeout_ms(), Some(86_400_000));
}
