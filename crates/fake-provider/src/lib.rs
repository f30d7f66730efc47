//! berth-fake-provider: a deterministic sandbox provider, built in as `fake`.
//!
//! The fake exists so that every path through berth that involves a sandbox provider (config validation, probes,
//! capabilities, and later leases and runs) can be exercised in tests and demos without a cloud account. It behaves
//! the same way every time, and its [`FakeFaults`] knobs make it fail on purpose, so tests can check how berth treats
//! a misbehaving provider.

use berth_core::config::SandboxConfig;
use berth_core::environment::Driver;
use berth_core::error::Error;
use berth_core::probe::ProbeResult;
use berth_core::provider::{BoxFuture, ProviderDescriptor, ProviderSpec, SandboxProvider};
use serde_json::{Map, Value, json};

/// The value of `config.provider` that selects the fake.
pub const FAKE_PROVIDER_KEY: &str = "fake";

/// The image a fake sandbox reports when the config names none. It is also the schema's default, so stored configs
/// always carry it.
pub const DEFAULT_IMAGE: &str = "fake:latest";

/// A sandbox provider that needs no outside service: sandboxes are private temporary directories on this machine.
#[derive(Debug)]
pub struct FakeProvider {
    descriptor: ProviderDescriptor,
    faults: FakeFaults,
}

/// Failures the fake injects on purpose. Every knob defaults to "behave".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeFaults {
    /// When set, every probe fails with this summary.
    pub fail_probe: Option<String>,
}

/// Builds a [`FakeProvider`] with fault knobs: `FakeProvider::builder().fail_probe("down").build()`.
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct FakeProviderBuilder {
    faults: FakeFaults,
}

// === impl FakeProvider ===

impl FakeProvider {
    /// A well-behaved fake.
    ///
    /// Fallible only because [`ProviderDescriptor::new`] compiles the config schema; the schema is a constant, so an
    /// error here is a bug in this crate, which the tests catch. Returning it (rather than panicking) lets the
    /// server report it at startup like any other registration failure.
    pub fn new() -> Result<Self, Error> {
        Self::builder().build()
    }

    pub fn builder() -> FakeProviderBuilder {
        FakeProviderBuilder::default()
    }

    pub fn faults(&self) -> &FakeFaults {
        &self.faults
    }

    /// The registration spec of the fake: key, names and config schema.
    pub fn spec() -> ProviderSpec {
        ProviderSpec {
            key: FAKE_PROVIDER_KEY.to_owned(),
            display_name: "Fake sandbox".to_owned(),
            description: "A deterministic sandbox provider for tests and demos: each sandbox is a private temporary \
                          directory on the berth host, and commands run there."
                .to_owned(),
            config_schema: config_schema(),
            supports_reusable_leases: true,
            // Runs on the fake arrive together with the run orchestrator.
            supports_run_execution: false,
        }
    }

    fn probe_now(&self, config: &SandboxConfig) -> ProbeResult {
        if let Some(summary) = &self.faults.fail_probe {
            return ProbeResult::failed(Driver::Sandbox, summary.clone());
        }
        if config.provider != FAKE_PROVIDER_KEY {
            // The registry dispatches on the key, so this is a caller bug; say so rather than pretend.
            return ProbeResult::failed(
                Driver::Sandbox,
                format!(
                    "the fake provider was asked to probe a config for provider `{}`",
                    config.provider
                ),
            );
        }
        let image = config
            .fields
            .get("image")
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_IMAGE)
            .to_owned();
        let mut details = Map::new();
        details.insert("provider".to_owned(), FAKE_PROVIDER_KEY.into());
        details.insert("image".to_owned(), image.clone().into());
        details.insert("reuseLease".to_owned(), config.reuse_lease.into());
        ProbeResult::ok(
            Driver::Sandbox,
            format!("fake sandbox provider ready (image {image})"),
            details,
        )
    }
}

impl SandboxProvider for FakeProvider {
    fn descriptor(&self) -> &ProviderDescriptor {
        &self.descriptor
    }

    fn probe<'a>(&'a self, config: &'a SandboxConfig) -> BoxFuture<'a, ProbeResult> {
        Box::pin(async move { self.probe_now(config) })
    }
}

// === impl FakeProviderBuilder ===

impl FakeProviderBuilder {
    /// Makes every probe fail with `summary`.
    pub fn fail_probe(mut self, summary: impl Into<String>) -> Self {
        self.faults.fail_probe = Some(summary.into());
        self
    }

    /// See [`FakeProvider::new`] for why this is fallible.
    pub fn build(self) -> Result<FakeProvider, Error> {
        Ok(FakeProvider {
            descriptor: ProviderDescriptor::new(FakeProvider::spec())?,
            faults: self.faults,
        })
    }
}

fn config_schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "image": {
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "default": DEFAULT_IMAGE,
                "description": "The image the fake sandbox pretends to run. Only reported back: the fake runs \
                                commands on the berth host, whatever the image."
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use berth_core::config::DriverConfig;
    use berth_core::provider::ProviderCatalog;

    use super::*;

    /// Just enough catalog to parse sandbox configs through the real validation path.
    struct OnlyFake(FakeProvider);

    impl ProviderCatalog for OnlyFake {
        fn provider(&self, key: &str) -> Option<&ProviderDescriptor> {
            (key == FAKE_PROVIDER_KEY).then(|| self.0.descriptor())
        }

        fn provider_keys(&self) -> Vec<String> {
            vec![FAKE_PROVIDER_KEY.to_owned()]
        }
    }

    fn sandbox_config(config: Value) -> SandboxConfig {
        let catalog = OnlyFake(FakeProvider::new().unwrap());
        match DriverConfig::parse(Driver::Sandbox, &config, &catalog).unwrap() {
            DriverConfig::Sandbox(sandbox) => sandbox,
            other => panic!("expected a sandbox config, got {other:?}"),
        }
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        // The fake's probe never awaits anything, so a single poll finishes it.
        let mut future = std::pin::pin!(future);
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut context) {
            std::task::Poll::Ready(output) => output,
            std::task::Poll::Pending => panic!("the fake's probe should finish in one poll"),
        }
    }

    #[test]
    fn descriptor_describes_the_builtin_fake() {
        let fake = FakeProvider::new().unwrap();
        let spec = fake.descriptor().spec();
        assert_eq!(fake.descriptor().key(), "fake");
        assert_eq!(spec.display_name, "Fake sandbox");
        assert!(spec.description.contains("deterministic"));
        assert!(spec.description.contains("tests and demos"));
        assert!(spec.description.contains("temporary directory"));
        assert!(spec.supports_reusable_leases);
        assert!(!spec.supports_run_execution);
        assert_eq!(spec.config_schema["additionalProperties"], false);
        assert_eq!(
            spec.config_schema["properties"]["image"]["default"],
            "fake:latest"
        );
        assert_eq!(spec.config_schema["properties"]["image"]["maxLength"], 200);
        assert_eq!(fake.faults(), &FakeFaults::default());
    }

    #[test]
    fn image_defaults_and_schema_is_strict() {
        let config = sandbox_config(json!({"provider": "fake"}));
        assert_eq!(config.fields["image"], "fake:latest");
        assert!(!config.reuse_lease);

        let catalog = OnlyFake(FakeProvider::new().unwrap());
        for bad in [
            json!({"provider": "fake", "image": ""}),
            json!({"provider": "fake", "image": 7}),
            json!({"provider": "fake", "image": "x".repeat(201)}),
            json!({"provider": "fake", "cpus": 2}),
        ] {
            assert!(
                DriverConfig::parse(Driver::Sandbox, &bad, &catalog).is_err(),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn probe_reports_ready_with_camel_case_details() {
        let fake = FakeProvider::new().unwrap();
        let config = sandbox_config(json!({"provider": "fake", "reuseLease": true}));
        let result = block_on(fake.probe(&config));
        assert!(result.ok, "{result:?}");
        assert_eq!(result.driver, Driver::Sandbox);
        assert_eq!(
            result.summary,
            "fake sandbox provider ready (image fake:latest)"
        );
        assert_eq!(
            Value::Object(result.details),
            json!({"provider": "fake", "image": "fake:latest", "reuseLease": true})
        );

        let custom = sandbox_config(json!({"provider": "fake", "image": "demo:1"}));
        let result = block_on(fake.probe(&custom));
        assert_eq!(result.summary, "fake sandbox provider ready (image demo:1)");
        assert_eq!(result.details["reuseLease"], false);
    }

    #[test]
    fn probe_fault_fails_with_the_given_summary() {
        let fake = FakeProvider::builder()
            .fail_probe("fake outage injected")
            .build()
            .unwrap();
        assert_eq!(
            fake.faults().fail_probe.as_deref(),
            Some("fake outage injected")
        );
        let config = sandbox_config(json!({"provider": "fake"}));
        let result = block_on(fake.probe(&config));
        assert!(!result.ok);
        assert_eq!(result.driver, Driver::Sandbox);
        assert_eq!(result.summary, "fake outage injected");
        assert!(result.details.is_empty());
    }

    #[test]
    fn probe_refuses_configs_for_other_providers() {
        let fake = FakeProvider::new().unwrap();
        let config = SandboxConfig {
            provider: "e2b".to_owned(),
            reuse_lease: false,
            timeout_ms: None,
            fields: Map::new(),
        };
        let result = block_on(fake.probe(&config));
        assert!(!result.ok);
        assert!(result.summary.contains("`e2b`"), "{}", result.summary);
    }
}
