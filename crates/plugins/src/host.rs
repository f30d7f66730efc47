//! Every installed plugin: found and checked once at start-up, each supervised, and what each offers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::manifest::{DriverKind, Manifest};
use crate::provider::PluginSandboxProvider;
use crate::supervisor::{Deadlines, HostSettings, Plugin};

/// A plugin directory that was not loaded, and why: shown in the log and in capabilities, never fatal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub dir: PathBuf,
    pub message: String,
}

/// The installed plugins.
#[derive(Debug, Default)]
pub struct PluginHost {
    plugins: Vec<Plugin>,
    problems: Vec<Problem>,
    shutdown: CancellationToken,
    supervisors: TaskTracker,
    deadlines: Deadlines,
}

impl PluginHost {
    /// Loads the plugins in `dirs` (in order) and starts each. `taken_keys` are the provider keys already in use
    /// (the built-in providers): a plugin offering one of those, or a key an earlier plugin offers, is refused.
    pub fn start(dirs: &[PathBuf], taken_keys: &[String], settings: &HostSettings) -> Self {
        let mut host = Self {
            deadlines: settings.deadlines,
            ..Self::default()
        };
        let mut keys: BTreeMap<String, String> = taken_keys
            .iter()
            .map(|key| (key.clone(), "a built-in provider".to_owned()))
            .collect();
        for dir in dirs {
            let manifest = match Manifest::load(dir) {
                Ok(manifest) => manifest,
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "plugin skipped");
                    host.problems.push(Problem {
                        dir: dir.clone(),
                        message: error.to_string(),
                    });
                    continue;
                }
            };
            let refusal = if host.plugins.iter().any(|plugin| plugin.id() == manifest.id) {
                Some(format!("plugin id {:?} is already installed", manifest.id))
            } else {
                manifest.drivers.iter().find_map(|driver| {
                    keys.get(&driver.driver_key).map(|owner| {
                        format!(
                            "plugin {:?}: driverKey {:?} is already taken by {owner}",
                            manifest.id, driver.driver_key
                        )
                    })
                })
            };
            if let Some(message) = refusal {
                tracing::warn!(dir = %dir.display(), %message, "plugin refused");
                host.problems.push(Problem {
                    dir: dir.clone(),
                    message,
                });
                continue;
            }
            for driver in &manifest.drivers {
                keys.insert(
                    driver.driver_key.clone(),
                    format!("plugin {:?}", manifest.id),
                );
            }
            tracing::info!(plugin.id = %manifest.id, plugin.version = %manifest.version, dir = %manifest.dir.display(), "plugin installed");
            let plugin = Plugin::start(
                manifest,
                settings.clone(),
                host.shutdown.clone(),
                &host.supervisors,
            );
            host.plugins.push(plugin);
        }
        host
    }

    /// Asks every plugin to shut down and waits (at most `grace`) until their processes are gone.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        self.shutdown.cancel();
        self.supervisors.close();
        if tokio::time::timeout(grace, self.supervisors.wait())
            .await
            .is_err()
        {
            tracing::warn!("plugins still stopping after the grace period");
        }
    }

    pub fn plugins(&self) -> &[Plugin] {
        &self.plugins
    }

    pub fn plugin(&self, id: &str) -> Option<&Plugin> {
        self.plugins.iter().find(|plugin| plugin.id() == id)
    }

    /// Plugin directories that were not loaded, and why.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// Every `sandbox_provider` the plugins offer, ready to register beside the built-in ones.
    pub fn sandbox_providers(&self) -> Vec<Result<Arc<PluginSandboxProvider>, Problem>> {
        self.offered(DriverKind::SandboxProvider)
    }

    /// Every `environment_driver` the plugins offer (`driver: "plugin"`). They speak the same methods as sandbox
    /// providers, so the same host-side type serves both.
    pub fn environment_drivers(&self) -> Vec<Result<Arc<PluginSandboxProvider>, Problem>> {
        self.offered(DriverKind::EnvironmentDriver)
    }

    fn offered(&self, kind: DriverKind) -> Vec<Result<Arc<PluginSandboxProvider>, Problem>> {
        let mut offered = Vec::new();
        for plugin in &self.plugins {
            for driver in &plugin.manifest().drivers {
                if driver.kind != kind {
                    continue;
                }
                offered.push(
                    PluginSandboxProvider::new(plugin.clone(), driver, self.deadlines)
                        .map(Arc::new)
                        .map_err(|error| Problem {
                            dir: plugin.manifest().dir.clone(),
                            message: error.to_string(),
                        }),
                );
            }
        }
        offered
    }
}
