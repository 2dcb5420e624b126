//! `vmstream plot STATS.json -o FILE.svg`: its arguments, and the plot
//! ([`crate::telemetry::plot`]) written or its error printed.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::telemetry::plot::plot_file;

/// Arguments of `vmstream plot`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlotArgs {
    /// Statistics JSON written by `vmstream send --stats-json` (or a bare timeline).
    #[arg(value_name = "STATS.json")]
    pub stats: PathBuf,
    /// The SVG file to write.
    #[arg(short = 'o', long, value_name = "FILE.svg")]
    pub output: PathBuf,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1200)]
    pub width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = 760)]
    pub height: u32,
    /// Title (default: the statistics file name).
    #[arg(long)]
    pub title: Option<String>,
}

/// Runs `vmstream plot`; prints errors and returns the exit code.
pub fn run(args: &PlotArgs) -> ExitCode {
    let title = args.title.clone().unwrap_or_else(|| {
        args.stats
            .file_name()
            .map_or("migration".into(), |n| n.to_string_lossy().into_owned())
    });
    match plot_file(&args.stats, &args.output, &title, args.width, args.height) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmstream plot: {e}");
            ExitCode::FAILURE
        }
    }
}
