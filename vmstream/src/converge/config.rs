//! The convergence settings of one migration: which throttle strategy, its auto-converge
//! settings, hot-page deferral, and the pause to aim for. The CLI builds them from `vmstream send`'s options;
//! the source turns them into the [`crate::converge::DowntimePolicy`]'s parts.

use crate::converge::{
    AimLowConfig, AutoConverge, AutoConvergeConfig, DeferConfig, DeferError, DirectStaged,
    DirectStagedConfig, HotPageDeferral, NoThrottle, SettingError, Strategy, ThrottleStrategy,
};
use crate::telemetry::settings::Settings;

/// Throttle strategy and hot-page deferral of a migration.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvergeConfig {
    /// The throttle strategy.
    pub strategy: Strategy,
    /// Auto-converge's settings (used by [`Strategy::Qemu`]).
    pub auto_converge: AutoConvergeConfig,
    /// Hot-page deferral, or `None` when off.
    pub deferral: Option<DeferConfig>,
    /// The pause to aim for below the downtime limit (`--downtime-target`).
    pub aim_low: AimLowConfig,
}

impl Default for ConvergeConfig {
    /// No throttling, QEMU's auto-converge defaults, no deferral, the default target pause.
    fn default() -> Self {
        ConvergeConfig {
            strategy: Strategy::None,
            auto_converge: AutoConvergeConfig::default(),
            deferral: None,
            aim_low: AimLowConfig::default(),
        }
    }
}

impl ConvergeConfig {
    /// The chosen strategy, its settings checked.
    pub fn strategy(&self) -> Result<Box<dyn ThrottleStrategy>, SettingError> {
        Ok(match self.strategy {
            Strategy::None => Box::new(NoThrottle),
            Strategy::Qemu => {
                self.auto_converge.validate()?;
                Box::new(AutoConverge::new(self.auto_converge))
            }
            Strategy::DirectStaged => {
                let cfg = DirectStagedConfig::default();
                cfg.validate()?;
                Box::new(DirectStaged::new(cfg))
            }
        })
    }

    /// Hot-page deferral over `guest_pages` pages, or `None` when off.
    pub fn deferral(&self, guest_pages: u64) -> Result<Option<HotPageDeferral>, DeferError> {
        self.deferral
            .map(|cfg| HotPageDeferral::new(cfg, guest_pages))
            .transpose()
    }

    /// The statistics' settings these set (the strategy, its percentages, the deferral);
    /// the others are `None`.
    pub fn settings(&self) -> Settings {
        let auto_converge = (self.strategy == Strategy::Qemu).then(|| {
            let c = &self.auto_converge;
            format!(
                "initial {}%, increment {}%, max {}%, threshold {}%",
                c.initial * 100.0,
                c.increment * 100.0,
                c.max * 100.0,
                c.trigger_threshold * 100.0
            )
        });
        let defer_hot = self
            .deferral
            .map(|d| format!("{}% of {} B segments", d.percent, d.segment_bytes));
        Settings {
            converge: Some(self.strategy),
            auto_converge,
            defer_hot,
            ..Settings::default()
        }
    }
}
