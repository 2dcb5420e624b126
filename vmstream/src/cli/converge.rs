//! Command-line options of the convergence strategies, for `#[command(flatten)]` into
//! `vmstream send`'s arguments.

use std::time::Duration;

use crate::converge::{AimLowConfig, AutoConvergeConfig, ConvergeConfig, DeferConfig, Strategy};
use crate::units::{parse_duration, parse_size};

/// `--converge`, auto-converge settings, `--defer-hot` and `--downtime-target`.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct ConvergeArgs {
    /// Guest throttling while iterating: none, qemu (auto-converge) or direct-staged.
    #[arg(long, value_name = "STRATEGY", default_value = "none")]
    pub converge: Strategy,
    /// qemu: first throttle, percent.
    #[arg(long, value_name = "PERCENT", default_value_t = 20,
          value_parser = clap::value_parser!(u8).range(1..=99))]
    pub cpu_throttle_initial: u8,
    /// qemu: throttle step after the first, percent.
    #[arg(long, value_name = "PERCENT", default_value_t = 10,
          value_parser = clap::value_parser!(u8).range(1..=99))]
    pub cpu_throttle_increment: u8,
    /// qemu: largest throttle, percent.
    #[arg(long, value_name = "PERCENT", default_value_t = 99,
          value_parser = clap::value_parser!(u8).range(1..=99))]
    pub max_cpu_throttle: u8,
    /// qemu: a period is high when it dirtied more than this percent of what it sent.
    #[arg(long, value_name = "PERCENT", default_value_t = 50,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub throttle_trigger_threshold: u8,
    /// Hold back the dirty pages of the hottest PERCENT of memory segments each round
    /// (0 = off).
    #[arg(long, value_name = "PERCENT", default_value_t = 0.0, value_parser = parse_percent)]
    pub defer_hot: f64,
    /// Segment size for --defer-hot (K/M/G suffixes).
    #[arg(long, value_name = "BYTES", default_value = "2M", value_parser = parse_size)]
    pub defer_segment: u64,
    /// Once the pause fits --downtime-limit, keep iterating while each round shrinks the
    /// expected pause by a quarter and the guest is not throttled, until it fits this
    /// (ms/s; at most the limit; equal to it: switch over as soon as the pause fits)
    /// [default: 30ms, or the limit if lower]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub downtime_target: Option<Duration>,
}

/// A percentage in `[0, 100]`.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} is not in 0..=100"))
    }
}

impl ConvergeArgs {
    /// The convergence settings these options give.
    pub fn to_config(&self) -> ConvergeConfig {
        ConvergeConfig {
            strategy: self.converge,
            auto_converge: AutoConvergeConfig {
                initial: self.cpu_throttle_initial as f64 / 100.0,
                increment: self.cpu_throttle_increment as f64 / 100.0,
                max: self.max_cpu_throttle as f64 / 100.0,
                trigger_threshold: self.throttle_trigger_threshold as f64 / 100.0,
                ..Default::default()
            },
            deferral: (self.defer_hot > 0.0).then(|| DeferConfig {
                segment_bytes: self.defer_segment,
                ..DeferConfig::new(self.defer_hot)
            }),
            aim_low: AimLowConfig {
                target: self.downtime_target,
                ..AimLowConfig::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        c: ConvergeArgs,
    }

    fn parse(args: &[&str]) -> Result<ConvergeArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|c| c.c)
    }

    #[test]
    fn defaults_and_flags() {
        // The options' defaults are the library's.
        assert_eq!(parse(&[]).unwrap().to_config(), ConvergeConfig::default());
        let a = parse(&[
            "--converge",
            "qemu",
            "--cpu-throttle-initial",
            "30",
            "--cpu-throttle-increment",
            "5",
            "--max-cpu-throttle",
            "80",
            "--throttle-trigger-threshold",
            "70",
            "--defer-hot",
            "12.5%",
            "--defer-segment",
            "64K",
            "--downtime-target",
            "50ms",
        ])
        .unwrap();
        assert_eq!(a.converge, Strategy::Qemu);
        let cfg = a.to_config();
        let c = cfg.auto_converge;
        assert_eq!(
            (c.initial, c.increment, c.max, c.trigger_threshold),
            (0.3, 0.05, 0.8, 0.7)
        );
        assert_eq!(cfg.strategy().unwrap().name(), "qemu");
        assert_eq!(cfg.aim_low.target, Some(Duration::from_millis(50)));
        assert_eq!(
            cfg.aim_low.target(Duration::from_millis(300)),
            Ok(Duration::from_millis(50))
        );
        assert!(cfg.aim_low.target(Duration::from_millis(40)).is_err());
        assert_eq!(a.defer_hot, 12.5);
        assert_eq!(a.defer_segment, 64 << 10);
        assert!(cfg.deferral(1024).unwrap().is_some());
        assert!(ConvergeConfig::default().deferral(1024).unwrap().is_none());
        let s = serde_json::to_value(cfg.settings()).unwrap();
        assert_eq!(s["converge"], "qemu");
        assert!(s["defer_hot"].as_str().unwrap().contains("12.5%"));
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            &["--converge", "fast"][..],
            &["--cpu-throttle-initial", "0"],
            &["--max-cpu-throttle", "100"],
            &["--defer-hot", "101"],
            &["--defer-hot", "x"],
            &["--defer-segment", "lots"],
            &["--downtime-target", "soon"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        // A segment that is not a multiple of the page is a typed error when built.
        let a = parse(&["--defer-hot", "5", "--defer-segment", "5000"]).unwrap();
        assert!(matches!(
            a.to_config().deferral(100),
            Err(crate::converge::DeferError::SegmentSize { .. })
        ));
    }
}
