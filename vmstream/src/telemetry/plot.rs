//! The guest-impact timeline drawn as SVG, for `vmstream plot STATS.json -o FILE.svg`.
//!
//! Upper panel: bytes the guest dirtied and bytes sent per round as bars (MiB, left axis)
//! and the guest's transactions per second as a line (right axis). Lower panel: the
//! throttle in percent. The downtime (pause to resume) is shaded in both.
//!
//! The reader is tolerant: it takes the [`Timeline`] from a top-level `timeline` key, or a
//! bare timeline, or rebuilds rounds and downtime from the migration statistics'
//! `per_round` and `downtime_ms` when no timeline was recorded.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use crate::memory::PAGE_SIZE;
use crate::telemetry::timeline::{Timeline, TimelineRound};

const MIB: f64 = (1u64 << 20) as f64;
const DIRTY: RGBColor = RGBColor(228, 120, 36);
const SENT: RGBColor = RGBColor(46, 104, 196);
const TPS: RGBColor = RGBColor(28, 150, 70);
const THROTTLE: RGBColor = RGBColor(200, 40, 40);
const DOWNTIME: RGBColor = RGBColor(120, 120, 120);
/// Widths of the axis label areas, pixels.
const LEFT_AXIS: u32 = 70;
const RIGHT_AXIS: u32 = 80;

/// Why a plot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The statistics are not valid JSON or the timeline has the wrong shape.
    #[error("statistics JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Neither a timeline nor per-round statistics were found.
    #[error("no `timeline` or `per_round` data to plot")]
    NoData,
    /// Image size out of range.
    #[error("image size {0}x{1} is out of range (200..=10000 pixels each way)")]
    Size(u32, u32),
    /// Drawing failed.
    #[error("drawing: {0}")]
    Draw(String),
}

fn draw_err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError::Draw(format!("{e:?}"))
}

/// Reads `stats`, draws it, writes the SVG to `out`.
pub fn plot_file(
    stats: &Path,
    out: &Path,
    title: &str,
    width: u32,
    height: u32,
) -> Result<(), PlotError> {
    let text = std::fs::read_to_string(stats).map_err(|source| PlotError::Io {
        path: stats.to_path_buf(),
        source,
    })?;
    let timeline = load_timeline(&text)?;
    let svg = render_svg(&timeline, title, width, height)?;
    std::fs::write(out, svg).map_err(|source| PlotError::Io {
        path: out.to_path_buf(),
        source,
    })
}

/// The timeline in statistics JSON text (see the module documentation for the fallbacks).
pub fn load_timeline(json: &str) -> Result<Timeline, PlotError> {
    let v: Value = serde_json::from_str(json)?;
    if let Some(t) = v.get("timeline").filter(|t| !t.is_null()) {
        return Ok(serde_json::from_value(t.clone())?);
    }
    // A bare timeline has arrays there; the statistics have `rounds` as a count.
    let array = |k: &str| v.get(k).is_some_and(Value::is_array);
    if array("samples") || array("rounds") {
        return Ok(serde_json::from_value(v)?);
    }
    timeline_from_round_stats(&v).ok_or(PlotError::NoData)
}

/// Rebuilds a timeline without TPS samples from the migration statistics: rounds back to
/// back from time 0, the dirtied bytes as dirtied pages per second times the duration
/// (4 KiB pages), the pause at the start of the final round.
pub fn timeline_from_round_stats(v: &Value) -> Option<Timeline> {
    let rounds = v.get("per_round")?.as_array()?;
    let num = |r: &Value, k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let mut t = Timeline::default();
    let mut start = 0.0;
    for (i, r) in rounds.iter().enumerate() {
        let duration_ms = num(r, "duration_ms").max(0.0);
        let paused = r.get("paused").and_then(Value::as_bool).unwrap_or(false);
        if paused && t.pause_ms.is_none() {
            t.pause_ms = Some(start);
        }
        t.rounds.push(TimelineRound {
            round: r.get("round").and_then(Value::as_u64).unwrap_or(i as u64),
            start_ms: start,
            duration_ms,
            dirty_bytes: (num(r, "dirty_pages_per_s") * duration_ms / 1e3 * PAGE_SIZE as f64)
                as u64,
            sent_bytes: num(r, "wire_bytes") as u64,
            deferred_bytes: 0,
            throttle: 0.0,
            disk_write_limit: 0,
            paused,
        });
        start += duration_ms;
    }
    if let (Some(p), Some(d)) = (t.pause_ms, v.get("downtime_ms").and_then(Value::as_f64)) {
        t.resume_ms = Some(p + d.max(0.0));
    }
    (!t.rounds.is_empty()).then_some(t)
}

/// Draws `t` as an SVG document.
pub fn render_svg(t: &Timeline, title: &str, width: u32, height: u32) -> Result<String, PlotError> {
    if !(200..=10_000).contains(&width) || !(200..=10_000).contains(&height) {
        return Err(PlotError::Size(width, height));
    }
    let t = &sanitize(t);
    let (lo, hi) = t.span_ms().ok_or(PlotError::NoData)?;
    let (x0, x1) = pad(lo / 1e3, hi / 1e3);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = root.titled(title, ("sans-serif", 22)).map_err(draw_err)?;
        let split = (root.dim_in_pixel().1 as f64 * 0.66) as u32;
        let (upper, lower) = root.split_vertically(split);
        draw_upper(&upper, t, x0..x1)?;
        draw_lower(&lower, t, x0..x1)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// Largest time drawn, ms either side of the start (about 115 days): beyond it, or not
/// finite, a point is dropped. Keeps every coordinate small enough for the chart's integer
/// pixel arithmetic.
const MAX_MS: f64 = 1e10;
/// Largest transaction rate drawn.
const MAX_TPS: f64 = 1e12;

/// A copy of `t` fit to draw: points at non-finite or absurd times dropped, durations, rates
/// and throttles clamped to their ranges (NaN to 0).
fn sanitize(t: &Timeline) -> Timeline {
    let time_ok = |v: f64| v.is_finite() && v.abs() <= MAX_MS;
    let clamp = |v: f64, hi: f64| if v.is_nan() { 0.0 } else { v.clamp(0.0, hi) };
    let mut out = t.clone();
    out.samples.retain(|s| time_ok(s.t_ms));
    for s in &mut out.samples {
        s.tps = clamp(s.tps, MAX_TPS);
        s.throttle = clamp(s.throttle, 1.0);
    }
    out.rounds.retain(|r| time_ok(r.start_ms));
    for r in &mut out.rounds {
        r.duration_ms = clamp(r.duration_ms, MAX_MS - r.start_ms.max(0.0));
        r.throttle = clamp(r.throttle, 1.0);
    }
    out.pause_ms = t.pause_ms.filter(|&p| time_ok(p));
    out.resume_ms = t.resume_ms.filter(|&p| time_ok(p));
    out
}

/// A non-empty range around `lo..hi`.
fn pad(lo: f64, hi: f64) -> (f64, f64) {
    if hi - lo < 1e-3 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi + (hi - lo) * 0.02)
    }
}

/// Decimals that tell apart the ticks of an axis spanning `span`: plotters puts about ten
/// on an axis, so whole numbers repeat on a short one (a 3 s migration's time axis was
/// labelled `0, 1, 2, 2, 2, 3`).
fn label_decimals(span: f64) -> usize {
    let step = span / 10.0;
    if step >= 1.0 || step <= 0.0 || !step.is_finite() {
        0
    } else {
        ((-step.log10()).ceil() as usize).min(4)
    }
}

/// The shaded downtime interval in seconds, at least 0.4% of the axis wide so a few ms stay
/// visible on a minutes-long plot.
fn downtime_band(t: &Timeline, x: &std::ops::Range<f64>) -> Option<(f64, f64, f64)> {
    let (p, r) = t.downtime()?;
    let min = (x.end - x.start) * 0.004;
    let (a, b) = (p / 1e3, r / 1e3);
    Some((a, b.max(a + min), r - p))
}

fn draw_upper(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    t: &Timeline,
    x: std::ops::Range<f64>,
) -> Result<(), PlotError> {
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let max_bytes = t
        .rounds
        .iter()
        .map(|r| r.dirty_bytes.max(r.sent_bytes) as f64 / MIB)
        .fold(0.0, f64::max);
    let max_tps = t.samples.iter().map(|s| finite(s.tps)).fold(0.0, f64::max);
    // Head room above bars and line for the legend.
    let y_bytes = 0.0..(max_bytes * 1.4).max(1.0);
    let y_tps = 0.0..(max_tps * 1.5).max(1.0);
    let mut chart = ChartBuilder::on(area)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(LEFT_AXIS)
        .right_y_label_area_size(RIGHT_AXIS)
        .build_cartesian_2d(x.clone(), y_bytes.clone())
        .map_err(draw_err)?
        .set_secondary_coord(x.clone(), y_tps.clone());
    chart
        .configure_mesh()
        .x_desc("time since migration start (s)")
        .y_desc("MiB per round")
        .x_label_formatter(&|v| format!("{v:.*}", label_decimals(x.end - x.start)))
        .y_label_formatter(&|v| format!("{v:.*}", label_decimals(y_bytes.end)))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(draw_err)?;
    chart
        .configure_secondary_axes()
        .y_desc("guest transactions/s")
        .y_label_formatter(&|v| format!("{v:.*}", label_decimals(y_tps.end)))
        .draw()
        .map_err(draw_err)?;
    if let Some((a, b, ms)) = downtime_band(t, &x) {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a, y_bytes.start), (b, y_bytes.end)],
                DOWNTIME.mix(0.3).filled(),
            )))
            .map_err(draw_err)?
            .label(format!("downtime {ms:.1} ms"))
            .legend(|(x, y)| {
                Rectangle::new([(x, y - 6), (x + 14, y + 6)], DOWNTIME.mix(0.3).filled())
            });
    }
    // Each round's interval: dirtied bytes on its left half, sent bytes on its right half.
    let min_w = (x.end - x.start) * 0.003;
    let bars = |pick: fn(&TimelineRound) -> u64, right: bool| {
        t.rounds.iter().map(move |r| {
            let s = r.start_ms / 1e3;
            let half = (r.duration_ms / 2e3).max(min_w);
            let a = if right { s + half } else { s };
            Rectangle::new([(a, 0.0), (a + half, pick(r) as f64 / MIB)], {
                let c = if right { SENT } else { DIRTY };
                c.mix(0.85).filled()
            })
        })
    };
    chart
        .draw_series(bars(|r| r.dirty_bytes, false))
        .map_err(draw_err)?
        .label("dirtied during round (MiB)")
        .legend(|(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], DIRTY.filled()));
    chart
        .draw_series(bars(|r| r.sent_bytes, true))
        .map_err(draw_err)?
        .label("sent in round (MiB)")
        .legend(|(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], SENT.filled()));
    if !t.samples.is_empty() {
        chart
            .draw_secondary_series(LineSeries::new(
                t.samples.iter().map(|s| (s.t_ms / 1e3, finite(s.tps))),
                TPS.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label("guest TPS (right axis)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], TPS.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(draw_err)
}

fn draw_lower(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    t: &Timeline,
    x: std::ops::Range<f64>,
) -> Result<(), PlotError> {
    // No right axis here, but the same right margin so both panels' time axes align.
    let mut chart = ChartBuilder::on(area)
        .margin(10)
        .margin_right(10 + RIGHT_AXIS)
        .x_label_area_size(35)
        .y_label_area_size(LEFT_AXIS)
        .build_cartesian_2d(x.clone(), 0.0..122.0)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("time since migration start (s)")
        .y_desc("throttle (%)")
        .x_label_formatter(&|v| format!("{v:.*}", label_decimals(x.end - x.start)))
        // Above 100 is room for the legend only.
        .y_label_formatter(&|v| {
            if *v <= 100.0 {
                format!("{v:.0}")
            } else {
                String::new()
            }
        })
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(draw_err)?;
    if let Some((a, b, _)) = downtime_band(t, &x) {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a, 0.0), (b, 100.0)],
                DOWNTIME.mix(0.3).filled(),
            )))
            .map_err(draw_err)?;
    }
    // The throttle is piecewise constant: a step line through the samples, or through the
    // round starts when there are no samples.
    let points: Vec<(f64, f64)> = if t.samples.is_empty() {
        t.rounds
            .iter()
            .flat_map(|r| {
                let s = r.start_ms / 1e3;
                [(s, r.throttle), (s + r.duration_ms / 1e3, r.throttle)]
            })
            .collect()
    } else {
        t.samples
            .iter()
            .map(|s| (s.t_ms / 1e3, s.throttle))
            .collect()
    };
    let mut steps = Vec::with_capacity(points.len() * 2);
    for (i, &(tx, p)) in points.iter().enumerate() {
        let p = if p.is_finite() { p * 100.0 } else { 0.0 };
        if i > 0 {
            steps.push((tx, steps.last().map_or(p, |&(_, q)| q)));
        }
        steps.push((tx, p));
    }
    chart
        .draw_series(LineSeries::new(steps, THROTTLE.stroke_width(2)))
        .map_err(draw_err)?
        .label("throttle (%)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], THROTTLE.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(draw_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_timeline_key_bare_timeline_and_round_stats() {
        let t = load_timeline(
            r#"{"outcome":"committed","timeline":{"pause_ms":5.0,"rounds":[{"round":0}]}}"#,
        )
        .unwrap();
        assert_eq!(t.pause_ms, Some(5.0));
        assert_eq!(t.rounds.len(), 1);
        let t = load_timeline(r#"{"samples":[{"t_ms":1,"tps":2,"throttle":0.5}]}"#).unwrap();
        assert_eq!(t.samples[0].throttle, 0.5);
        let t = load_timeline(
            r#"{"downtime_ms":12.5,"per_round":[
                {"round":0,"duration_ms":1000,"wire_bytes":100,"dirty_pages_per_s":10},
                {"round":1,"duration_ms":500,"wire_bytes":50,"paused":true}]}"#,
        )
        .unwrap();
        assert_eq!(t.rounds[1].start_ms, 1000.0);
        assert_eq!(t.rounds[0].dirty_bytes, 10 * 4096);
        assert_eq!(t.rounds[1].sent_bytes, 50);
        assert_eq!(t.downtime(), Some((1000.0, 1012.5)));
        assert!(matches!(load_timeline("{}"), Err(PlotError::NoData)));
        assert!(matches!(load_timeline("{"), Err(PlotError::Json(_))));
        assert!(matches!(
            load_timeline(r#"{"timeline":{"rounds":7}}"#),
            Err(PlotError::Json(_))
        ));
    }

    #[test]
    fn empty_timeline_and_bad_sizes_are_errors() {
        assert!(matches!(
            render_svg(&Timeline::default(), "x", 800, 600),
            Err(PlotError::NoData)
        ));
        let t = Timeline {
            pause_ms: Some(1.0),
            ..Default::default()
        };
        assert!(matches!(
            render_svg(&t, "x", 10, 600),
            Err(PlotError::Size(10, 600))
        ));
        // A single instant still draws.
        let svg = render_svg(&t, "x", 800, 600).unwrap();
        assert!(svg.starts_with("<svg"));
    }

    /// The text of every `<text>` element of `svg`.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                Some(
                    t.split_once('>')?
                        .1
                        .split_once("</text>")?
                        .0
                        .trim()
                        .to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn label_decimals_follow_the_tick_step() {
        assert_eq!(label_decimals(45.0), 0);
        assert_eq!(label_decimals(10.0), 0);
        assert_eq!(label_decimals(9.0), 1);
        assert_eq!(label_decimals(3.0), 1);
        assert_eq!(label_decimals(0.6), 2);
        assert_eq!(label_decimals(f64::INFINITY), 0);
        assert_eq!(label_decimals(0.0), 0);
        assert_eq!(label_decimals(1e-12), 4);
    }

    #[test]
    fn tick_labels_of_short_axes_are_distinct() {
        // Seconds on the time axis, MiB on the bytes axis: whole numbers repeated there
        // (`0, 1, 2, 2, 2, 3`).
        for (span_ms, mib) in [(600.0, 0.5), (3000.0, 3.0), (45_000.0, 400.0)] {
            let t = Timeline {
                rounds: vec![crate::telemetry::timeline::TimelineRound {
                    round: 0,
                    start_ms: 0.0,
                    duration_ms: span_ms,
                    sent_bytes: (mib * MIB) as u64,
                    ..Default::default()
                }],
                pause_ms: Some(span_ms),
                ..Default::default()
            };
            let numbers: Vec<String> = texts(&render_svg(&t, "x", 800, 600).unwrap())
                .into_iter()
                .filter(|s| s.parse::<f64>().is_ok())
                .collect();
            // Each axis's ticks come in a row, ascending: a repeat is a neighbour.
            assert!(numbers.len() >= 12, "{span_ms} ms: {numbers:?}");
            assert!(
                numbers.windows(2).all(|w| w[0] != w[1]),
                "{span_ms} ms: {numbers:?}"
            );
            // The time axis's labels, with the decimals its span needs.
            let d = label_decimals(span_ms / 1e3 * 1.02);
            let time = numbers
                .iter()
                .filter(|s| s.split_once('.').map_or(0, |(_, f)| f.len()) == d)
                .count();
            assert!(time >= 8, "{span_ms} ms: {numbers:?}");
        }
    }
}
